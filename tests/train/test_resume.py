"""Checkpoints are whole or absent, resume continues the same run, and a signal stops a run
with a checkpoint it can be resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_recipe
from lora_cli.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """Tokenised-data cache per test: ~/.cache/lora is shared with every other test session."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "data-cache"))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM):
    """Deliver a real signal to this process when the Trainer finishes `step` (test-only hook)."""
    from lora_cli.train.callbacks import RichProgress

    original = RichProgress.on_step_end

    def on_step_end(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        if state.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(RichProgress, "on_step_end", on_step_end)


# LoRA dropout on, so the resumed run only matches if the RNG state is restored too.
TRAIN = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny_random, cli, monkeypatch):
    whole = make_recipe(tmp_path / "a", tiny_random, train=TRAIN, lora=LORA)
    assert cli("train", whole).code == 0

    cut = make_recipe(tmp_path / "b", tiny_random, train=TRAIN, lora=LORA)
    run_b = tmp_path / "b" / "run"
    with monkeypatch.context() as m:
        signal_at_step(m, 2, signal.SIGINT)
        stopped = cli("train", cut)
    assert stopped.code == 130, stopped
    assert "stopped by SIGINT after step 2" in stopped.err and "--resume" in stopped.err
    assert [p.name for p in ckpt.complete_checkpoints(run_b)] == ["checkpoint-2"]
    assert not (run_b / "adapter_model.safetensors").exists()  # no final adapter for an unfinished run

    # the plain command refuses the non-empty folder and points at --resume
    again = cli("train", cut)
    assert again.code == 2 and "--resume" in again.err

    resumed = cli("train", cut, "--resume")
    assert resumed.code == 0, resumed
    assert "resume  from" in resumed.out and "checkpoint-2" in resumed.out

    run_a = tmp_path / "a" / "run"
    la, lb = losses(run_a), losses(run_b)
    assert sorted(lb) == [1, 2, 3, 4]  # one record per step: no duplicates from the two sessions
    summaries = [r for r in map(json.loads, (run_b / "metrics.jsonl").read_text().splitlines()) if "train_runtime" in r]
    assert len(summaries) == 1 and summaries[0]["step"] == 4
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-7)
    wa, wb = adapter_weights(run_a), adapter_weights(run_b)
    assert wa.keys() == wb.keys()
    import torch

    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-6, atol=1e-7), name
    # lora_B started at zero: equal and trained, not equal because nothing moved
    assert any(wa[n].abs().sum() > 0 for n in wa if "lora_B" in n)


@pytest.mark.slow
def test_loss_logged_across_the_interruption_equals_uninterrupted(tmp_path, tiny_random, cli, monkeypatch):
    """Logging every 2 steps, stopped at step 3: the window 3-4 spans the interruption. The
    Trainer starts a resumed run with an empty window, so step 4 used to log step 4's loss
    alone; the checkpoint now carries the unlogged loss and the resumed run logs the same mean."""
    every2 = {**TRAIN, "logging_steps": 2}
    whole = make_recipe(tmp_path / "a", tiny_random, train=every2, lora=LORA)
    assert cli("train", whole).code == 0
    cut = make_recipe(tmp_path / "b", tiny_random, train=every2, lora=LORA)
    with monkeypatch.context() as m:
        signal_at_step(m, 3, signal.SIGINT)
        assert cli("train", cut).code == 130
    assert ckpt.loss_window(tmp_path / "b" / "run" / "checkpoint-3")["since_step"] == 2
    assert cli("train", cut, "--resume").code == 0
    la, lb = losses(tmp_path / "a" / "run"), losses(tmp_path / "b" / "run")
    assert sorted(la) == sorted(lb) == [2, 4]
    assert lb == la  # exactly: the same float32 sums, divided the same way


@pytest.mark.slow
def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_random, cli, monkeypatch):
    from transformers import Trainer

    recipe = make_recipe(tmp_path, tiny_random, train={**TRAIN, "max_steps": 6})
    run = tmp_path / "run"
    original = Trainer._save_rng_state

    def failing(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(28, "No space left on device")
        return original(self, output_dir)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_rng_state", failing)
        failed = cli("train", recipe)
    assert failed.code == 2, failed
    assert "could not write the checkpoint of step 4" in failed.err
    assert "checkpoint-2 is intact" in failed.err and "--resume" in failed.err
    assert (run / "checkpoint-2" / ckpt.MARKER).is_file()
    assert not (run / "checkpoint-4").exists()  # the half-written one never took the name
    assert ckpt.newest_complete(run).name == "checkpoint-2"

    # the intact checkpoint is usable as an adapter and as a resume point
    gen = cli("generate", "--adapter", run / "checkpoint-2", "--max-new-tokens", "2", "hi")
    assert gen.code == 0, gen
    resumed = cli("train", recipe, "--resume")
    assert resumed.code == 0, resumed
    assert (run / "adapter_model.safetensors").is_file()
    assert not (run / ckpt.STAGING).exists()
    assert losses(run).keys() == set(range(1, 7))


@pytest.mark.slow
def test_rotation_keeps_newest_complete(tmp_path, tiny_random, cli):
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 4, "save_steps": 1, "save_total_limit": 2})
    assert cli("train", recipe).code == 0
    run = tmp_path / "run"
    # no checkpoint at the last step: the final adapter is written once, in output_dir
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(run.glob(".lora-trash-*")) and not list(run.glob(".lora-staged-*"))
    marker = json.loads((run / "checkpoint-3" / ckpt.MARKER).read_text())
    assert marker["step"] == 3 and "adapter_model.safetensors" in marker["files"]
    done = cli("train", recipe, "--resume")
    assert done.code == 2 and "already finished" in done.err


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe(tmp_path, tiny_random, cli, monkeypatch):
    recipe = make_recipe(tmp_path, tiny_random, train=TRAIN)
    with monkeypatch.context() as m:
        signal_at_step(m, 2)
        assert cli("train", recipe).code == 143
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    r = cli("train", recipe, "--resume", "--set", "train.learning_rate=0.5", "--set", "train.logging_steps=2")
    assert r.code == 2
    assert "differs from the one this run started with" in r.err
    assert "train.learning_rate: 0.001 -> 0.5" in r.err
    assert "logging_steps" not in r.err  # bookkeeping keys may change
    assert "lora_recipe.yaml --resume" in r.err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_resume_errors(tmp_path, tiny_random, cli):
    recipe = make_recipe(tmp_path, tiny_random)
    r = cli("train", recipe, "--resume")
    assert r.code == 2 and "does not exist, so there is no run to resume" in r.err
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)  # cut off while being written: no marker
    r = cli("train", recipe, "--resume")
    assert r.code == 2 and "no complete checkpoint" in r.err and "checkpoint-3" in r.err
    r = cli("train", recipe, "--resume-from", run / "checkpoint-3")
    assert r.code == 2 and "not a complete checkpoint" in r.err
    r = cli("train", recipe, "--resume", run / "checkpoint-3")  # the spelling of the same
    assert r.code == 2 and "not a complete checkpoint" in r.err
    r = cli("train", recipe, "--resume", "--overwrite")
    assert r.code == 2 and "cannot be combined" in r.err


def test_newest_complete_ignores_incomplete(tmp_path):
    for step, complete in [(2, True), (10, True), (12, False), (9, True)]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / ckpt.MARKER).write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert [ckpt.checkpoint_step(p) for p in ckpt.complete_checkpoints(tmp_path)] == [2, 9, 10]
    assert ckpt.newest_complete(tmp_path).name == "checkpoint-10"
    assert ckpt.resolve_resume(tmp_path, ckpt.Resume()).name == "checkpoint-10"
    assert ckpt.resolve_resume(tmp_path, ckpt.Resume(tmp_path / "checkpoint-9")).name == "checkpoint-9"
    removed = ckpt.rotate(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-12").is_dir()  # incomplete folders are never rotated or trusted


def test_recipe_differences_lists_keys_that_matter():
    saved = {"model": {"name_or_path": "m"}, "train": {"learning_rate": 1e-4, "save_steps": 5}, "output_dir": "a"}
    now = {"model": {"name_or_path": "m"}, "train": {"learning_rate": 2e-4, "save_steps": 9}, "output_dir": "b",
           "lora": {"new_key": 1}}
    assert ckpt.recipe_differences(saved, now) == ["train.learning_rate: 0.0001 -> 0.0002"]


@pytest.mark.slow
def test_sigterm_subprocess_leaves_checkpoint_and_resumes(tmp_path, tiny_random, cli):
    """The real command in its own process, sent SIGTERM once step 1 is logged."""
    # long enough that the signal lands long before the end (steps take milliseconds here)
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 20, "save_steps": 0})
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli.cli", "train", str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "SIGTERM received" in out
    # the printed command resumes this very run: its own saved recipe
    assert "stopped by SIGTERM after step" in err and f"lora train {run / 'lora_recipe.yaml'} --resume" in err
    saved = ckpt.newest_complete(run)
    assert saved is not None
    step = ckpt.checkpoint_step(saved)
    assert 1 <= step < 20
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["global_step"] == step

    r = cli("train", recipe, "--resume-from", saved)
    assert r.code == 0, r
    assert sorted(losses(run)) == list(range(1, 21))
    assert (run / "adapter_model.safetensors").is_file()
