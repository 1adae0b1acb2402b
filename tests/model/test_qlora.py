"""Quantized bases (QLoRA 4-bit NF4, 8-bit) and gradient checkpointing on CPU: the adapter really
trains (every lora_B moves off zero in one step), and a QLoRA adapter reloads on a 4-bit base
through plain peft and through lora's own loading path, generating the same text."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import DEMO_DATA, demo_rows, make_recipe, write_jsonl


@pytest.fixture(scope="session")
def tiny_random_128(tmp_path_factory):
    """A random tiny Llama whose linear layers' input sizes are multiples of 64: bitsandbytes'
    CPU 4-bit inference kernel reshapes by blocks of 64 and fails on the 160-wide MLP of
    `tiny_random` (hidden 64), a bitsandbytes limit that real models never hit."""
    from lora_cli.tiny.decoder import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-random-128", DEMO_DATA, hidden=128,
                            steps=0, log=lambda *_: None)


def small_recipe(tmp_path, model, quantization="none", checkpointing=False, lora=None):
    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(4))
    path = make_recipe(tmp_path, model, data,
                       train={"max_steps": 1, "learning_rate": 1e-2, "gradient_checkpointing": checkpointing})
    raw = yaml.safe_load(path.read_text())
    raw["model"]["quantization"] = quantization
    raw["data"]["max_length"] = 64
    raw["lora"] = lora or {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_quantization_config_is_qlora_nf4_with_double_quant():
    import torch

    from lora_cli.model.load import quantization_config
    from lora_cli.recipe.schema import ModelConfig

    assert quantization_config(ModelConfig(name_or_path="x")) is None
    q4 = quantization_config(ModelConfig(name_or_path="x", quantization="4bit", dtype="bfloat16"))
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4" and q4.bnb_4bit_use_double_quant
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16  # compute dtype follows model.dtype
    q4_auto = quantization_config(ModelConfig(name_or_path="x", quantization="4bit"))
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert q4_auto.bnb_4bit_compute_dtype == expected
    q8 = quantization_config(ModelConfig(name_or_path="x", quantization="8bit"))
    assert q8.load_in_8bit and not q8.load_in_4bit


@pytest.mark.slow
@pytest.mark.parametrize("quantization, checkpointing, method", [
    ("none", True, "lora"),  # plain LoRA without checkpointing: test_methods.py checks every B there
    ("4bit", False, "lora"),
    ("4bit", True, "lora"),
    ("4bit", True, "dora"),
    ("8bit", False, "lora"),
])
def test_every_lora_B_moves_in_one_step(quantization, checkpointing, method, tiny_random_128, tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    lora = {"method": method, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    res = cli("train", small_recipe(tmp_path, tiny_random_128, quantization, checkpointing, lora))
    assert res.code == 0, res
    assert f"quantization: {quantization}" in res.out
    assert "wrapped 14 modules" in res.out  # 7 linear layers x 2 blocks, quantized or not
    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    bs = {k: t for k, t in weights.items() if "lora_B" in k}
    assert len(bs) == 14
    zero = [k for k, t in bs.items() if int(torch.count_nonzero(t)) != t.numel()]
    assert not zero, f"lora_B entries still zero after one step: {zero}"
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_qlora_reloads_on_a_4bit_base_and_generates(tiny_random_128, tmp_path, cli):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_cli.infer.generate import build_prompt_ids, generate_batch, generate_response
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference

    res = cli("train", small_recipe(tmp_path, tiny_random_128, "4bit"))
    assert res.code == 0, res
    run = tmp_path / "run"
    assert yaml.safe_load((run / "lora_recipe.yaml").read_text())["model"]["quantization"] == "4bit"
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "LORA"

    # lora's path reads the quantization from the saved recipe: the base comes back in 4-bit.
    model, tokenizer, infos = load_for_inference({"q": run}, device="cpu")
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    settings = GenerationSettings(max_new_tokens=5)
    text = generate_response(model, tokenizer, infos["q"].template, "What is QLoRA?", settings=settings)

    # Plain transformers + peft on the same 4-bit base generate the same answer.
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_random_128, quantization_config=bnb, device_map={"": "cpu"},
                                                dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, str(run)).eval()
    ids = build_prompt_ids(tokenizer, infos["q"].template, "What is QLoRA?")
    assert text == generate_batch(plain, tokenizer, [ids], settings)[0]
    assert isinstance(text, str)
    # And the adapter changes what the 4-bit base computes.
    with torch.no_grad():
        x = torch.tensor([ids])
        with plain.disable_adapter():
            before = plain(input_ids=x).logits[:, -1]
        after = plain(input_ids=x).logits[:, -1]
    assert (after - before).abs().max() > 1e-4


def test_pissa_on_4bit_exits_2_naming_the_key(tmp_path, cli):
    path = small_recipe(tmp_path, "some-org/some-model", "4bit", lora={"r": 4, "init": "pissa"})
    res = cli("train", path, "--dry-run")
    assert res.code == 2, res
    assert "lora.init: pissa needs the full-precision weights" in res.err and "Traceback" not in res.err
