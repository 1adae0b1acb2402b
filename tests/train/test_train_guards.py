"""What a run does before and around training: preflight refusals, the non-finite loss guard,
eval loss and perplexity, the loss curve, and what is loaded and written."""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pytest

from conftest import demo_rows, make_recipe, write_jsonl
from lora_cli.train import checkpoint as ckpt

DiskUsage = collections.namedtuple("DiskUsage", "total used free")


@pytest.fixture(autouse=True)
def private_data_cache(tmp_path, monkeypatch):
    """Tokenised-data cache per test: ~/.cache/lora is shared with every other test session."""
    monkeypatch.setenv("LORA_CACHE_DIR", str(tmp_path / "data-cache"))


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- preflight

def test_planned_steps_are_the_steps_the_trainer_takes(tmp_path, tiny_random, monkeypatch):
    """One formula for `lora check` and the disk check: 10 rows in batches of 2 are 5 batches,
    and with 3 per optimizer step the epoch ends on a partial step, which the Trainer takes."""
    from lora_cli.train.preflight import planned_steps
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import run_training

    data = write_jsonl(tmp_path / "d.jsonl", demo_rows(10))
    recipe = load_recipe(make_recipe(tmp_path, tiny_random, data, train={
        "max_steps": -1, "epochs": 1, "batch_size": 2, "gradient_accumulation": 3, "save_steps": 0}))
    assert planned_steps(recipe, 10) == 2
    assert run_training(recipe).steps == 2
    # each of 2 processes reads half the batches: 3 batches, one optimizer step
    assert planned_steps(recipe, 10, processes=2) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert planned_steps(recipe, 10) == 1


def test_unwritable_output_dir_fails_before_loading(tmp_path, tiny_random, cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = make_recipe(tmp_path, tiny_random, output_dir=str(blocker / "run"))
    r = cli("train", recipe)
    assert r.code == 2
    assert "cannot be created because" in r.err and "a-file is a file" in r.err
    assert "base " not in r.out  # nothing was loaded


@pytest.mark.skipif(sys.platform == "win32" or __import__("os").geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_dir(tmp_path, tiny_random, cli):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        r = cli("train", make_recipe(tmp_path, tiny_random, output_dir=str(parent / "run")))
    finally:
        parent.chmod(0o700)
    assert r.code == 2 and "cannot write in" in r.err


def test_a_folder_holding_another_run_is_refused_before_the_libraries_load(tmp_path, tiny_random):
    """A finished run, or any file of someone else's, in output_dir: `lora train` refuses it at
    once (exit 2), without importing torch or the Trainer first, and with --resume or a lock
    held the same checks still hold (covered where they live); the folder is untouched."""
    import subprocess

    recipe = make_recipe(tmp_path, tiny_random)
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")  # a finished run's marker
    probe = ("import sys\nfrom lora_cli.cli import run\ncode = run(sys.argv[1:])\n"
             "print(code, 'HEAVY' if {'torch', 'transformers', 'peft'} & set(sys.modules) else 'LIGHT')\n")
    done = subprocess.run([sys.executable, "-c", probe, "train", str(recipe)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert done.stdout.split()[-2:] == ["2", "LIGHT"], (done.stdout, done.stderr)
    assert "already holds files from another run" in " ".join(done.stderr.split())
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json"]


def test_too_little_disk_refused_before_writing(tmp_path, tiny_random, cli, monkeypatch):
    import lora_cli.train.preflight as preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: DiskUsage(10**9, 10**9 - 4096, 4096))
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 4, "save_steps": 1, "save_total_limit": 2})
    r = cli("train", recipe)
    assert r.code == 2, r
    assert "0.0 MiB free" in r.err and "needs about" in r.err
    assert "3 at once" in r.err  # two kept + the one being staged
    assert "save_total_limit" in r.err
    assert not (tmp_path / "run").exists()


def test_disk_estimate_counts_kept_checkpoints_and_optimizer():
    from lora_cli.train.preflight import CHECKPOINT_OVERHEAD, planned_checkpoints, required_bytes

    assert planned_checkpoints(3, 10) == 4 and planned_checkpoints(None, 10) == 11 and planned_checkpoints(5, 2) == 3
    adapter, tok = 100 << 20, 2 << 20
    need = required_bytes(adapter, tok, 4)
    assert need == 4 * (3 * adapter + tok + CHECKPOINT_OVERHEAD) + adapter + tok


def test_fp16_on_cpu_refused(tmp_path, tiny_random, cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = cli("train", make_recipe(tmp_path, tiny_random), "--set", "train.precision=fp16")
    assert r.code == 2 and "fp16 needs a CUDA GPU" in r.err and "precision: fp32" in r.err


def test_bf16_on_gpu_without_it_refused(tmp_path, tiny_random, cli, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    r = cli("train", make_recipe(tmp_path, tiny_random), "--set", "train.precision=bf16")
    assert r.code == 2 and "bf16 is not supported by this GPU" in r.err


def test_missing_packages_listed_together(tmp_path, tiny_random, cli, monkeypatch):
    for name in ("bitsandbytes", "wandb"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    recipe = make_recipe(tmp_path, tiny_random)
    r = cli("train", recipe, "--set", "model.quantization=4bit", "--set", "train.report_to=[wandb]")
    assert r.code == 2, r
    assert "4bit needs bitsandbytes" in r.err
    assert "train.report_to: wandb is not installed" in r.err
    assert not (tmp_path / "run").exists()


def test_parallel_keys_checked(tmp_path, tiny_random, cli):
    recipe = make_recipe(tmp_path, tiny_random)
    r = cli("check", recipe, "--set", "train.fsdp=full_shard autowrap", "--set", "train.deepspeed=nope.json")
    assert r.code == 2
    assert "unknown option(s) ['autowrap']" in r.err
    assert "both set" in r.err and "nope.json does not exist" in r.err


def test_training_arguments_carry_engines_and_eval(tmp_path, tiny_random):
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import training_arguments_kwargs

    cfg = tmp_path / "fsdp.json"
    cfg.write_text("{}")
    recipe = load_recipe(make_recipe(tmp_path, tiny_random), ["train.fsdp=full_shard auto_wrap",
                                                             f"train.fsdp_config={cfg}", "train.eval_steps=5"])
    kw = training_arguments_kwargs(recipe, tmp_path / "run", {"bf16": False, "fp16": False}, has_eval=True)
    assert kw["fsdp"] == "full_shard auto_wrap" and kw["fsdp_config"] == str(cfg)
    assert kw["eval_strategy"] == "steps" and kw["eval_steps"] == 5 and kw["prediction_loss_only"]
    assert kw["save_total_limit"] is None  # rotation is done over complete checkpoints only
    assert kw["report_to"] == "none" and kw["logging_nan_inf_filter"] is False


# --------------------------------------------------------------------------- during the run

@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_random, cli, monkeypatch):
    from lora_cli.train.callbacks import EXIT_NONFINITE, SafeTrainer

    original = SafeTrainer.compute_loss

    def loss_turns_nan(self, model, inputs, *args, **kwargs):  # test-only: step 3 diverges
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step >= 2 else loss

    monkeypatch.setattr(SafeTrainer, "compute_loss", loss_turns_nan)
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 4, "save_steps": 1})
    r = cli("train", recipe)
    assert r.code == EXIT_NONFINITE, r
    assert "non-finite (NaN or inf) at step 3" in r.err and "last good checkpoint" in r.err
    run = tmp_path / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert not (run / "adapter_model.safetensors").exists()
    logged = {x["step"]: x["loss"] for x in records(run) if "loss" in x}
    assert sorted(logged) == [1, 2, 3] and math.isfinite(logged[2])
    assert math.isnan(logged[3])  # logged as it was, not averaged away

    from safetensors.torch import load_file

    weights = load_file(str(run / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())


@pytest.mark.slow
def test_eval_loss_perplexity_and_curve(tmp_path, tiny_random, cli):
    rows = demo_rows(20)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:16])
    held = write_jsonl(tmp_path / "val.jsonl", rows[16:])
    recipe = make_recipe(tmp_path, tiny_random, train, train={"max_steps": 4, "eval_steps": 2})
    r = cli("train", recipe, "--set", f"data.val_path={held}")
    assert r.code == 0, r
    run = tmp_path / "run"
    evals = [x for x in records(run) if "eval_loss" in x]
    assert [x["step"] for x in evals] == [2, 4]
    for x in evals:
        assert x["eval_perplexity"] == pytest.approx(math.exp(x["eval_loss"]))
        assert 0 < x["eval_loss"] < 20
    train_logs = [x for x in records(run) if "loss" in x]
    assert [x["step"] for x in train_logs] == [1, 2, 3, 4]
    assert all(x["supervised_tokens_per_s"] > 0 for x in train_logs)
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval    4 held-out rows" in r.out and "curve" in r.out


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    from lora_cli.train.metrics import plot_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_losses(metrics, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


# --------------------------------------------------------------------------- what is loaded and written

@pytest.mark.slow
def test_only_safetensors_weights_written(tmp_path, tiny_random, cli):
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 2, "save_steps": 1})  # none at the last step
    assert cli("train", recipe).code == 0
    run = tmp_path / "run"
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert "adapter_model.safetensors" in files and "checkpoint-1/adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith(".bin")]  # no pickled weights, no pickled arguments
    # the only pickles left are optimizer / scheduler / RNG state, which resume loads weights_only
    assert {f for f in files if f.endswith((".pt", ".pth"))} == {
        "checkpoint-1/optimizer.pt", "checkpoint-1/scheduler.pt", "checkpoint-1/rng_state.pth"}


class _Payload:
    """Unpickling this object runs code: exactly what weights_only refuses."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_weights_load_only_with_weights_only(tmp_path, tiny_random):
    import shutil

    import torch
    from safetensors.torch import load_file

    from lora_cli.model.load import load_base_model
    from lora_cli.recipe.schema import ModelConfig

    state = load_file(str(tiny_random / "model.safetensors"))
    clean, evil = tmp_path / "clean", tmp_path / "evil"
    for folder in (clean, evil):
        shutil.copytree(tiny_random, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(state, clean / "pytorch_model.bin")
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": _Payload(marker)}, evil / "pytorch_model.bin")

    model = load_base_model(ModelConfig(name_or_path=str(clean)))  # plain tensors load fine
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    with pytest.raises(Exception):
        load_base_model(ModelConfig(name_or_path=str(evil)))
    assert not marker.exists()


def test_trust_remote_code_off_unless_recipe_says(tmp_path, tiny_random, monkeypatch):
    import transformers

    from lora_cli.model.load import load_base_model
    from lora_cli.recipe.schema import ModelConfig, load_recipe

    seen = []

    def fake(name, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    assert load_recipe(make_recipe(tmp_path, tiny_random)).model.trust_remote_code is False
    for flag in (False, True):
        with pytest.raises(Exception):
            load_base_model(ModelConfig(name_or_path=str(tiny_random), trust_remote_code=flag))
    assert seen == [False, True]


def test_qlora_storage_dtype_follows_sharding():
    """FSDP / ZeRO-3 QLoRA stores the 4-bit weights in the model dtype (peft/bitsandbytes recipe)."""
    import torch

    from lora_cli.model.load import quantization_config
    from lora_cli.recipe.schema import ModelConfig

    cfg = ModelConfig(name_or_path="m", quantization="4bit", dtype="bfloat16")
    assert quantization_config(cfg, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    assert quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8
