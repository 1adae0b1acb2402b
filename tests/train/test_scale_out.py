"""Many GPUs and many machines through accelerate and torchrun only: the bundled accelerate
config files load with accelerate's own loader, sharding engines that cannot run here are
refused before anything loads, and a two-node torchrun job (two "machines" on localhost with a
c10d rendezvous) ends with the adapter a single process trains on the same batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_recipe

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = {
    "ddp.yaml": ("MULTI_GPU", 1),
    "two_node.yaml": ("MULTI_GPU", 2),
    "fsdp_qlora.yaml": ("FSDP", 1),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1),
}


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "data-cache"))


def test_every_bundled_accelerate_config_is_one_accelerate_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "recipes" / "accelerate"
    assert {p.name for p in folder.iterdir()} == set(ACCELERATE_CONFIGS)
    for name, (kind, machines) in ACCELERATE_CONFIGS.items():
        config = load_config_from_file(str(folder / name))
        assert config.distributed_type.value == kind, name
        assert config.num_machines == machines, name
    fsdp = load_config_from_file(str(folder / "fsdp_qlora.yaml")).fsdp_config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and not fsdp["fsdp_use_orig_params"]
    zero3 = load_config_from_file(str(folder / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3


def test_recipe_sharding_files_exist_and_validate():
    """train.deepspeed / train.fsdp_config name files that exist (the key docs name them too)."""
    from lora_cli.recipe.schema import TrainConfig, load_recipe

    docs = {f.name: f.metadata["doc"] for f in TrainConfig.__dataclass_fields__.values()}
    for name in ("recipes/deepspeed/zero2.json", "recipes/deepspeed/zero3.json", "recipes/fsdp/qlora.json"):
        assert (REPO / name).is_file()
    assert "recipes/deepspeed/zero2.json" in docs["deepspeed"]
    assert "recipes/fsdp/qlora.json" in docs["fsdp_config"]
    recipe = load_recipe(REPO / "recipes" / "qlora_fsdp.yaml")
    assert Path(recipe.train.fsdp_config).is_file()


@pytest.mark.parametrize("train_keys, source", [
    ({"fsdp": "full_shard auto_wrap"}, "train.fsdp: FSDP shards the model over CUDA GPUs"),
    ({"deepspeed": str(REPO / "recipes" / "deepspeed" / "zero2.json")}, "train.deepspeed: DeepSpeed shards"),
])
def test_sharding_without_gpus_is_refused_before_loading(cli, tmp_path, tiny_random, train_keys, source):
    res = cli("train", make_recipe(tmp_path, tiny_random, train=train_keys))
    assert res.code == 2, res
    err = " ".join(res.err.split())
    assert source in err and "torchrun --nproc_per_node N" in err
    assert "Traceback" not in res.err + res.out
    assert "base " not in res.out  # refused before the model loaded
    assert not (tmp_path / "run").exists()


def test_fsdp_qlora_needs_a_16bit_storage_dtype(cli, monkeypatch, tmp_path, tiny_random):
    from lora_cli.train.preflight import check_sharding
    from lora_cli.recipe.schema import load_recipe

    # written in the recipe: `lora check` refuses it, no GPU needed to find out
    recipe = REPO / "recipes" / "qlora_fsdp.yaml"
    assert check_sharding(load_recipe(recipe), cuda=True) == []
    res = cli("check", recipe, "--set", "model.dtype=auto")
    assert res.code == 2 and "model.dtype: FSDP with a 4-bit base" in " ".join(res.err.split()), res
    res = cli("check", recipe, "--set", "model.quantization=8bit")
    assert res.code == 2 and "model.quantization: 8bit (LLM.int8) weights cannot be sharded" in " ".join(res.err.split())
    # asked for by an accelerate config instead: preflight finds the same problem
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plain = load_recipe(make_recipe(tmp_path, tiny_random), ["model.quantization=4bit"])
    problems = check_sharding(plain, cuda=True)
    assert len(problems) == 1 and problems[0].startswith("model.dtype: FSDP with a 4-bit base")


@pytest.mark.slow
def test_accelerate_launched_fsdp_is_refused_before_loading_on_cpu(tmp_path, tiny_random):
    """`accelerate launch --config_file recipes/accelerate/fsdp_qlora.yaml` run for real: the
    choice reaches lora through accelerate's environment, and lora refuses before loading."""
    recipe = make_recipe(tmp_path, tiny_random)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "recipes" / "accelerate" / "fsdp_qlora.yaml"), "--num_processes", "1",
                           "--main_process_port", str(_free_port()), "-m", "lora_cli.cli", "train", str(recipe)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "the accelerate launch config (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED): FSDP shards" in out
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_nodes(recipe: Path, cwd: Path, env: dict, attempts: int = 2) -> list[tuple[str, str]]:
    """Start two torchrun "nodes" meeting at a c10d store on a free localhost port; when one
    fails, the other is stopped at once (it would wait for its peer until the rendezvous times
    out). A store that could not start (the port was taken between choosing and binding it) is
    retried once on a new port; any other failure fails the test with both nodes' output."""
    for attempt in range(attempts):
        port = _free_port()
        nodes = [_run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-node-test",
                       # node 1 says it does not host: left to guess, it sees 127.0.0.1 is local, tries to host
                       # too, and when it binds first node 0's store fails with EADDRINUSE (seen in a fresh clone)
                       "--rdzv_conf", f"is_host={1 if rank == 0 else 0}",
                       "-m", "lora_cli.cli", "train", str(recipe)], cwd, env) for rank in range(2)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and any(n.poll() is None for n in nodes):
            if any(n.poll() not in (None, 0) for n in nodes):
                break
            time.sleep(0.5)
        for n in nodes:
            if n.poll() is None:
                n.kill()
        outputs = [n.communicate() for n in nodes]
        if all(n.returncode == 0 for n in nodes):
            return outputs
        errors = "\n----\n".join(err[-3000:] for _, err in outputs)
        store_failed = "RendezvousConnectionError" in errors or "EADDRINUSE" in errors or "address already in use" in errors.lower()
        if not (store_failed and attempt + 1 < attempts):
            raise AssertionError(f"two-node run failed (exit codes {[n.returncode for n in nodes]}):\n{errors}")
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_two_node_torchrun_matches_the_single_process_run(tmp_path, tiny_random, cli):
    """Two torchrun "nodes" of one process each meet through a c10d rendezvous on localhost.
    Each takes half of every batch (accelerate shards the batches of the one seeded sampler),
    so with per-device batch 2 they train on exactly the batches of one process with batch 4."""
    import torch
    from safetensors.torch import load_file

    common = dict(lora={"dropout": 0.0}, train={"max_steps": 3, "gradient_accumulation": 1})
    single = make_recipe(tmp_path / "single", tiny_random, **{**common, "train": {**common["train"], "batch_size": 4}})
    multi = make_recipe(tmp_path / "multi", tiny_random, **{**common, "train": {**common["train"], "batch_size": 2}})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    alone = cli("train", single)  # the single process in this one: one start-up fewer
    assert alone.code == 0, alone

    outputs = _two_nodes(multi, tmp_path, env)
    assert sum(out.count("adapter saved to") for out, _ in outputs) == 1  # one rank of one node wrote

    one = load_file(str(tmp_path / "single" / "run" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "multi" / "run" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    assert any(t.abs().sum() > 0 for n, t in two.items() if "lora_B" in n)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
