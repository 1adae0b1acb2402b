"""`lora merge`: merged logits equal base + adapter (B non-zero), for plain LoRA, trained tied
embeddings and a 4-bit-trained adapter; the folder is complete and plain transformers loads it;
broken adapters and existing folders are refused without leaving anything behind."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA, make_recipe
from inference_helpers import logits, random_adapter, unmerged


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    """A random tiny Llama whose lm_head shares the embedding matrix (like Gemma, Qwen-0.5B)."""
    from lora_cli.tiny.decoder import build_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-tied"
    return build_tiny_model(out, DEMO_DATA, hidden=64, steps=0, tie_word_embeddings=True, log=lambda *_: None)


def _reload(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _assert_same(a, b):
    import torch

    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_merged_folder_is_complete_sharded_and_equals_unmerged(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=1,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    res = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged", "--max-shard-size", "100KB")
    assert res.code == 0, res
    out = tmp_path / "merged"
    files = {p.name for p in out.iterdir()}
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= files
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".lora-*"))  # no staging left
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_random}" in card and str(adapter) in card and "LORA (r=4, alpha=8)" in card

    reference = logits(unmerged(tiny_random, adapter))
    merged = _reload(out)
    assert (reference - logits(_reload(tiny_random))).abs().max() > 1e-2  # the adapter changes the output
    _assert_same(logits(merged), reference)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_dtype_picks_saved_precision(tiny_random, tmp_path, cli):
    from safetensors import safe_open

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=2)
    res = cli("merge", "--adapter", adapter, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert res.code == 0, res
    assert "(bfloat16)" in res.out
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    res = cli("merge", "--adapter", adapter, "--out", tmp_path / "x", "--dtype", "int8")
    assert res.code == 2 and "--dtype" in res.err and "'int8' is not one of" in res.err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("options, message", [
    ({"dtype": "int8"}, "--dtype 'int8' is not one of float32, bfloat16, float16"),
    ({"max_shard_size": "5 gigs"}, "--max-shard-size '5 gigs' is not a size"),
])
def test_merge_refuses_bad_options_itself_before_loading(tmp_path, options, message):
    """The checks live in merge_adapter, not only in the CLI: any caller gets them, and they run
    before the adapter is even read (this one does not exist)."""
    from lora_cli.errors import LoraError
    from lora_cli.export.merge import merge_adapter

    with pytest.raises(LoraError, match=message.replace("'", ".")):
        merge_adapter(tmp_path / "no-adapter", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("trained", ["embed_tokens", "lm_head"])
def test_trained_embeddings_survive_merge_of_tied_model(tiny_tied, tmp_path, cli, trained):
    """Training one side of tied embeddings unties them; saved as tied, a reload would copy one
    over the other. The merged config must say tie_word_embeddings: false and keep both."""
    assert json.loads((tiny_tied / "config.json").read_text())["tie_word_embeddings"] is True
    adapter = random_adapter(tiny_tied, tmp_path / "adapter", seed=3, modules_to_save=[trained])
    res = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert res.code == 0, res
    assert "saved untied" in res.out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = _reload(tmp_path / "merged")
    assert not merged.lm_head.weight.equal(merged.model.embed_tokens.weight)
    _assert_same(logits(merged), logits(unmerged(tiny_tied, adapter)))


def test_4bit_trained_adapter_merges_into_full_precision_base(tiny_random, tmp_path, cli):
    import torch
    from safetensors.torch import load_file, save_file

    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 1})
    res = cli("train", recipe, "--set", "model.quantization=4bit")
    assert res.code == 0, res
    run = tmp_path / "run"
    # One step barely moves B; make it large so a merge into rounded 4-bit weights would show.
    weights = load_file(run / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(4)
    weights = {k: torch.randn(v.shape, generator=gen) * 0.5 if "lora_B" in k else v for k, v in weights.items()}
    save_file(weights, run / "adapter_model.safetensors")

    res = cli("merge", "--adapter", run, "--out", tmp_path / "merged")
    assert res.code == 0, res
    assert "trained on a 4bit base" in res.out and "full precision" in res.out
    assert "4bit quantized base" in (tmp_path / "merged" / "README.md").read_text()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    _assert_same(logits(_reload(tmp_path / "merged")), logits(unmerged(tiny_random, run)))


def test_nan_adapter_refuses_and_writes_nothing(tiny_random, tmp_path, cli):
    import torch
    from safetensors.torch import load_file, save_file

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=5)
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, adapter / "adapter_model.safetensors")
    res = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert res.code == 2, res
    assert "non-finite" in res.err and "nothing was written" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left


def test_existing_out_is_kept_without_force(tiny_random, tmp_path, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=6)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("merge", "--adapter", adapter, "--out", out)
    assert res.code == 2 and "already exists" in res.err and "--force" in res.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces only what `lora merge` wrote: a folder holding the user's file is kept
    res = cli("merge", "--adapter", adapter, "--out", out, "--force")
    assert res.code == 2 and "--force refused" in res.err and "keep.txt" in res.err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli("merge", "--adapter", adapter, "--out", out, "--force").code == 0  # an empty folder is fine
    res = cli("merge", "--adapter", adapter, "--out", out, "--force")  # and so is its own output
    assert res.code == 0, res
    assert (out / "model.safetensors").is_file()


def test_prompt_tuning_adapter_is_refused(tiny_random, tmp_path, cli):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "prompt")
    res = cli("merge", "--adapter", tmp_path / "prompt", "--out", tmp_path / "merged")
    assert res.code == 2
    assert "PROMPT_TUNING adapter learns virtual tokens" in res.err and "cannot be merged" in res.err
    assert not (tmp_path / "merged").exists()


def test_not_an_adapter_folder(tmp_path, cli):
    res = cli("merge", "--adapter", tmp_path, "--out", tmp_path / "merged")
    assert res.code == 2 and "no adapter_config.json" in res.err
    res = cli("merge", "--adapter", tmp_path, "--out", tmp_path / "m", "--max-shard-size", "big")
    assert res.code == 2 and "--max-shard-size 'big'" in res.err


def test_ia3_adapter_merges_too(tiny_random, tmp_path, cli):
    """(IA)^3 scales activations; its vectors fold into the weights like LoRA's B·A does."""
    import torch
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random),
                           IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]))
    with torch.no_grad():  # peft starts the vectors at 1 (identity); move them off it
        for name, p in model.named_parameters():
            if "ia3_" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "ia3")
    res = cli("merge", "--adapter", tmp_path / "ia3", "--out", tmp_path / "merged")
    assert res.code == 0, res
    assert "| method | IA3 |" in (tmp_path / "merged" / "README.md").read_text()
    reference = logits(unmerged(tiny_random, tmp_path / "ia3"))
    assert (reference - logits(_reload(tiny_random))).abs().max() > 1e-2
    _assert_same(logits(_reload(tmp_path / "merged")), reference)
