"""QLoRA's memory levers: train.optimizer (8-bit and paged AdamW, ...) and lora.adapter_dtype,
checked where they act (the Trainer's optimizer, the adapter's tensors) and where they are
counted (`lora estimate`, against the state the optimizer really allocates)."""

from __future__ import annotations


import pytest
import yaml

from conftest import llama_config_folder, make_recipe


def _recipe(tmp_path, base, **sections):
    from lora_cli.recipe.schema import load_recipe

    return load_recipe(make_recipe(tmp_path, base, **sections))


def test_every_optimizer_is_one_the_trainer_knows_and_estimate_counts():
    from transformers.training_args import OptimizerNames

    from lora_cli.train.estimate import OPTIMIZER_STATE
    from lora_cli.recipe.schema import OPTIMIZERS

    assert set(OPTIMIZERS) <= {o.value for o in OptimizerNames}
    assert set(OPTIMIZERS) == set(OPTIMIZER_STATE)


def test_optimizer_reaches_the_trainer(tmp_path, tiny_random):
    from lora_cli.train.run import training_arguments_kwargs

    recipe = _recipe(tmp_path, tiny_random, train={"optimizer": "paged_adamw_8bit"})
    kwargs = training_arguments_kwargs(recipe, tmp_path / "run", {"bf16": False, "fp16": False}, False)
    assert kwargs["optim"] == "paged_adamw_8bit"


def test_unknown_optimizer_is_a_recipe_error(cli, tmp_path, tiny_random):
    res = cli("check", make_recipe(tmp_path, tiny_random), "--set", "train.optimizer=adam")
    assert res.code == 2, res
    assert "train.optimizer" in res.err and "paged_adamw_8bit" in res.err
    assert "Traceback" not in res.err + res.out


def test_bitsandbytes_optimizer_without_bitsandbytes_is_refused_before_loading(cli, tmp_path, tiny_random, monkeypatch):
    from lora_cli.train import preflight

    real = preflight._importable
    monkeypatch.setattr(preflight, "_importable", lambda *names: "bitsandbytes" not in names and real(*names))
    res = cli("train", make_recipe(tmp_path, tiny_random, train={"optimizer": "adamw_8bit"}))
    assert res.code == 2, res
    assert "train.optimizer: adamw_8bit comes from bitsandbytes" in " ".join(res.err.split())
    assert not (tmp_path / "run").exists()


def _optimizer_state_bytes(optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if hasattr(value, "element_size") and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, adapter_dtype", [
    ("adamw_torch", "float32"),
    ("adamw_torch", "bfloat16"),
    ("adamw_8bit", "float32"),
    ("paged_adamw_8bit", "bfloat16"),
    ("lion_8bit", "float32"),
    ("adafactor", "float32"),
])
def test_estimate_counts_the_state_the_optimizer_allocates(tmp_path, tiny_random, optimizer, adapter_dtype):
    """Two real training steps with each optimizer; the bytes of state it then holds equal the
    estimate's row for the same recipe (the estimate never sees the real model)."""
    from lora_cli.train.estimate import estimate_recipe
    from lora_cli.train.run import run_training

    # r 64 on every linear layer of the 64-wide tiny model: q/o/mlp A and B reach bitsandbytes'
    # 4096-weight threshold for 8-bit state, k/v's B (32 x 64) stays under it (fp32 state),
    # so both of its paths are counted
    recipe = _recipe(tmp_path, tiny_random, lora={"r": 64, "alpha": 128, "target_modules": "all-linear",
                                                 "adapter_dtype": adapter_dtype},
                     train={"optimizer": optimizer, "max_steps": 2})
    seen = {}
    from lora_cli.train import run as train_module

    original = train_module.SafeTrainer.train

    def train_and_measure(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        seen["state"] = _optimizer_state_bytes(self.optimizer)
        seen["dtypes"] = {str(p.dtype) for p in self.model.parameters() if p.requires_grad}
        return result

    train_module.SafeTrainer.train = train_and_measure
    try:
        run_training(recipe)
    finally:
        train_module.SafeTrainer.train = original
    assert seen["dtypes"] == {f"torch.{adapter_dtype}"}
    rows = {name: nbytes for name, nbytes, _ in estimate_recipe(recipe).memory.rows}
    assert rows["optimizer state"] == seen["state"]
    if optimizer == "adamw_8bit":  # the 8-bit path is really taken for the larger tensors
        assert seen["state"] < 2 * rows["gradients"]


@pytest.mark.slow
def test_bfloat16_adapter_trains_saves_and_reloads(tmp_path, tiny_random):
    import torch
    from safetensors import safe_open

    from lora_cli.train.run import run_training

    recipe = _recipe(tmp_path, tiny_random, lora={"adapter_dtype": "bfloat16"}, train={"max_steps": 3})
    result = run_training(recipe)
    with safe_open(str(result.output_dir / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    assert dtypes == {"BF16"}
    assert any(t.abs().sum() > 0 for t in b)  # it learned
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_bfloat16_adapter_with_fp16_precision_is_a_recipe_error(cli, tmp_path, tiny_random):
    res = cli("check", make_recipe(tmp_path, tiny_random, lora={"adapter_dtype": "bfloat16"},
                                   train={"precision": "fp16"}))
    assert res.code == 2, res
    assert "lora.adapter_dtype" in res.err


def _paper_65b(tmp_path):
    """The QLoRA paper's 65B setting: a LLaMA-65B shaped config (nothing loaded), NF4 + double
    quantization, r 64 on every linear layer, bf16 adapters, paged 8-bit AdamW, gradient
    checkpointing, batch 1 x 512 tokens."""
    folder = llama_config_folder(tmp_path / "llama65b", hidden=8192, intermediate=22016, heads=64, layers=80)
    path = make_recipe(tmp_path, folder,
                       lora={"r": 64, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear",
                             "adapter_dtype": "bfloat16"},
                       train={"batch_size": 1, "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True,
                              "precision": "bf16"})
    recipe = yaml.safe_load(path.read_text())
    recipe["model"].update(dtype="bfloat16", quantization="4bit")
    recipe["data"]["max_length"] = 512
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_qlora_paper_65b_setting_fits_a_48gb_card(tmp_path):
    from lora_cli.train.estimate import GiB, estimate_recipe, fits
    from lora_cli.recipe.schema import load_recipe

    path = _paper_65b(tmp_path)
    est = estimate_recipe(load_recipe(path))
    total = est.memory.total_checkpointed
    assert 36 * GiB < total < 43 * GiB  # the paper: ~41 GB on one 48 GB card
    assert 48 in fits(total)
    rows = {name: nbytes for name, nbytes, _ in est.memory.rows}
    assert rows["LoRA weights"] == rows["gradients"] == 2 * est.params.lora_params  # bf16
    assert rows["optimizer state"] < 1.02 * est.params.lora_params * 2  # two 1-byte moments + absmax
    # the same recipe with peft's fp32 adapters and plain AdamW: the old "fits 80 GB" only
    before = estimate_recipe(load_recipe(path, ["lora.adapter_dtype=float32", "train.optimizer=adamw_torch"]))
    assert before.memory.total_checkpointed - total > 7 * GiB
    assert fits(before.memory.total_checkpointed) == [80]


def test_estimate_prints_the_optimizer_it_counted(cli, tmp_path, tiny_random):
    res = cli("estimate", make_recipe(tmp_path, tiny_random, train={"optimizer": "paged_adamw_8bit"}))
    assert res.code == 0, res
    out = " ".join(res.out.split())
    assert "optimizer state" in out and "paged_adamw_8bit: paged 8-bit AdamW" in out
