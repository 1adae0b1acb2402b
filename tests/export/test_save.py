"""`lora save`: a clean adapter folder, from a run or a checkpoint, that plain peft loads."""

from __future__ import annotations

import pytest
from conftest import make_recipe
from inference_helpers import logits, random_adapter


@pytest.fixture(scope="module")
def run(tiny_random, tmp_path_factory):
    """A 2-step run with a checkpoint after each step."""
    from lora_cli.cli import run as lora

    tmp = tmp_path_factory.mktemp("save-run")
    recipe = make_recipe(tmp, tiny_random, train={"max_steps": 2, "save_steps": 1, "save_total_limit": None})
    assert lora(["train", str(recipe)]) == 0
    return tmp / "run"


def _plain_peft(base, folder):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(folder)).eval()


@pytest.mark.parametrize("source", ["run", "checkpoint-1"])
def test_clean_folder_from_run_or_checkpoint(run, tiny_random, tmp_path, cli, source):
    import torch

    src = run if source == "run" else run / source
    res = cli("save", src, "--out", tmp_path / "clean")
    assert res.code == 0, res
    files = {p.name for p in (tmp_path / "clean").iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "lora_recipe.yaml", "README.md",
                     "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     ".lora-owner.json"}  # which command wrote the folder, and which files: --force reads it
    card = (tmp_path / "clean" / "README.md").read_text()
    assert f"base_model: {tiny_random}" in card and "library_name: peft" in card
    assert "## Recipe" in card and "max_steps: 2" in card
    # the same weights as the source, loaded by plain peft
    torch.testing.assert_close(logits(_plain_peft(tiny_random, tmp_path / "clean")), logits(_plain_peft(tiny_random, src)))


def test_exported_adapter_loads_with_plain_peft_as_lora_loads_it(tiny_random, tmp_path, cli):
    """Non-zero B, so equal logits mean the adapter really was applied the same way."""
    import torch

    from lora_cli.model.load import load_for_inference

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=31)
    res = cli("save", adapter, "--out", tmp_path / "clean")
    assert res.code == 0, res
    assert (tmp_path / "clean" / "tokenizer.json").is_file()  # a bare adapter gets its base's tokenizer
    plain = logits(_plain_peft(tiny_random, tmp_path / "clean"))
    ours, _, _ = load_for_inference({"a": tmp_path / "clean"}, device="cpu")
    torch.testing.assert_close(plain, logits(ours))
    from transformers import AutoModelForCausalLM

    assert (plain - logits(AutoModelForCausalLM.from_pretrained(tiny_random))).abs().max() > 1e-2


def test_save_refuses_what_it_cannot_export(run, tmp_path, cli):
    res = cli("save", run, "--out", tmp_path / "clean")
    assert res.code == 0, res
    weights = (tmp_path / "clean" / "adapter_model.safetensors").read_bytes()
    res = cli("save", run / "checkpoint-1", "--out", tmp_path / "clean")
    assert res.code == 2 and "already exists" in res.err and "--force" in res.err
    assert (tmp_path / "clean" / "adapter_model.safetensors").read_bytes() == weights
    res = cli("save", tmp_path / "nowhere", "--out", tmp_path / "x")
    assert res.code == 2 and "nowhere does not exist" in res.err and not (tmp_path / "x").exists()
    assert f"adapters here: {tmp_path / 'clean'}" in " ".join(res.err.split())  # what exists instead
    empty_run = tmp_path / "run-without-final"
    (empty_run / "checkpoint-3").mkdir(parents=True)
    res = cli("save", empty_run, "--out", tmp_path / "x")
    assert res.code == 2 and "try " in res.err and "checkpoint-3" in res.err
