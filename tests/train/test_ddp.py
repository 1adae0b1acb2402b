"""`lora train` unchanged under torchrun: 2 processes on CPU (gloo DDP) agree, only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """Tokenised-data cache per test: ~/.cache/lora is shared with every other test session."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "data-cache"))


def torchrun(cwd: Path, dump: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_TEST_RANK_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "ddp_worker.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, tiny_random):
    import torch
    from safetensors.torch import load_file

    # LoRA dropout on: the resumed run below only matches if every rank's RNG state is restored
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 3, "save_steps": 2},
                         lora={"dropout": 0.1})
    dump = tmp_path / "ranks"
    dump.mkdir()
    proc = torchrun(tmp_path, dump, "train", recipe)

    # both ranks trained the same weights (gradients all-reduced), and they moved
    run = tmp_path / "run"
    _, saved = ranks_agree_and_rank0_is_saved(dump, run)
    # each rank left the process group before exiting (an open one can abort a rank at exit)
    assert [(dump / f"rank{r}.group-open-at-exit").read_text() for r in (0, 1)] == ["False", "False"]

    # only rank 0 printed and wrote: one record per step, one "saved" line
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert proc.stdout.count("adapter saved to") == 1
    assert proc.stdout.count("base    ") == 1
    # the checkpoint holds each rank's RNG state, so a resumed DDP run continues the same way
    ckpt = run / "checkpoint-2"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (ckpt / "lora_checkpoint_complete.json").is_file()
    # per-device batch 2 x 2 ranks: an epoch of 16 rows is 4 steps, so 3 steps = 0.75 epochs
    assert rows[-1]["epoch"] == pytest.approx(0.75)

    # resume under torchrun from checkpoint-2: the same weights and losses as the whole run
    assert not (run / "checkpoint-3").exists()  # the last step writes the final adapter only
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    resumed = torchrun(tmp_path, dump, "train", recipe, "--resume")
    assert resumed.stdout.count("resume  from") == 1 and "checkpoint-2" in resumed.stdout
    again = load_file(str(run / "adapter_model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(again[name], tensor), name
    rows_again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows_again if "loss" in r] == [(r["step"], r["loss"]) for r in rows if "loss" in r]


def ranks_agree_and_rank0_is_saved(dump, run) -> tuple[dict, dict]:
    """Both ranks trained the same weights (gradients all-reduced), the adapter moved, and the
    saved adapter is rank 0's weights. Returns (rank 0's state, the saved tensors)."""
    import torch
    from safetensors.torch import load_file

    rank0, rank1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(t.abs().sum() > 0 for n, t in rank0.items() if "lora_B" in n)
    saved = load_file(str(run / "adapter_model.safetensors"))
    assert {n.replace(".default", "") for n in rank0} == set(saved)
    for name, tensor in rank0.items():
        assert torch.equal(saved[name.replace(".default", "")], tensor)
    return rank0, saved
