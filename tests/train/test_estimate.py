"""`lora estimate`: counts from the config alone must equal what peft reports on the real model."""

from __future__ import annotations

import os

import pytest
import yaml

from conftest import REPO, demo_rows, llama_config_folder, make_recipe, write_jsonl


def flat(text: str) -> str:
    """Output with line wrapping undone: the console may wrap long lines at any width."""
    return " ".join(text.split())

TINY = dict(vocab_size=320, max_position_embeddings=128)


def _configs():
    from transformers import BloomConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    llama = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, **TINY)
    return {
        "llama": LlamaConfig(**llama, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**llama, tie_word_embeddings=True),
        "gpt2": GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=320, n_positions=128,
                           bos_token_id=0, eos_token_id=0),
        "bloom": BloomConfig(hidden_size=64, n_layer=3, n_head=4, vocab_size=320, bos_token_id=0, eos_token_id=0),
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=True, **TINY),
        "mistral": MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, sliding_window=None, **TINY),
    }


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """One small random model per architecture, saved as a model folder (built from config, offline)."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("arch")
    folders = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


# (architecture, lora section, model dtype): lists, presets, regexes, modules_to_save, biases, tying
CASES = {
    "llama-list": ("llama", {"target_modules": ["q_proj", "v_proj"]}, "float32"),
    "llama-all-linear": ("llama", {"target_modules": "all-linear"}, "bfloat16"),
    "llama-regex-layer1-modules-to-save": ("llama", {"target_modules": r".*\.1\..*(q_proj|down_proj)",
                                                     "modules_to_save": ["embed_tokens", "lm_head"]}, "bfloat16"),
    "llama-tied-embed-to-save": ("llama-tied", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                                "modules_to_save": ["embed_tokens"]}, "float32"),
    "gpt2-conv1d-tied-wte": ("gpt2", {"target_modules": ["c_attn"], "modules_to_save": ["wte"]}, "float32"),
    "bloom-source-regex": ("bloom", {"target_modules": r".*\.1.*query_key_value",
                                     "modules_to_save": ["word_embeddings"]}, "bfloat16"),
    "qwen2-all-linear-bias-all": ("qwen2", {"target_modules": "all-linear", "bias": "all"}, "float32"),
    "mistral-lora-only-bias": ("mistral", {"target_modules": ["q_proj", "v_proj", "gate_proj"],
                                           "bias": "lora_only"}, "bfloat16"),
}


def _recipe(tmp_path, folder, lora: dict, dtype: str = "float32", quantization: str = "none"):
    from lora_cli.recipe.schema import load_recipe

    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(8))
    path = make_recipe(tmp_path, folder, data, lora={"r": 4, "alpha": 8, "dropout": 0.0, **lora})
    return path, load_recipe(path, [f"model.dtype={dtype}", f"model.quantization={quantization}"])


def _real_adapter(recipe):
    """The adapter exactly as `lora train` builds it: real weights, the product's loading path."""
    from lora_cli.model.adapters import add_adapter
    from lora_cli.model.load import load_base_model

    return add_adapter(load_base_model(recipe.model, device="cpu"), recipe)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_and_file_size_equal_peft(tmp_path, tiny_models, case):
    from lora_cli.train.estimate import estimate_recipe

    arch, lora, dtype = CASES[case]
    _, recipe = _recipe(tmp_path, tiny_models[arch], lora, dtype)

    est = estimate_recipe(recipe)
    real = _real_adapter(recipe)

    assert (est.params.trainable, est.params.total) == real.get_nb_trainable_parameters()
    assert est.params.lora_params == sum(p.numel() for n, p in real.named_parameters() if ".lora_" in n)
    real.save_pretrained(tmp_path / "adapter")
    assert est.params.adapter_bytes == os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")


def test_regex_selects_only_the_named_layer(tmp_path, tiny_models):
    from lora_cli.train.estimate import estimate_recipe

    arch, lora, dtype = CASES["llama-regex-layer1-modules-to-save"]
    _, recipe = _recipe(tmp_path, tiny_models[arch], lora, dtype)
    est = estimate_recipe(recipe)

    assert {g.name: g.count for g in est.params.groups} == {"q_proj": 1, "down_proj": 1}
    # q_proj 64->64 and down_proj 96->64 at r=4; embed_tokens and lm_head are 320 x 64 each
    assert est.params.lora_params == 4 * (64 + 64) + 4 * (96 + 64)
    assert est.params.full_params == 2 * 320 * 64


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_weights_match_bitsandbytes_storage(tmp_path, tiny_random, quantization):
    """4-bit: NF4 + double quantization, packed 4-bit weights, 8-bit absmax per 64 weights, fp32
    absmax per 256 blocks. 8-bit: int8 weights and one fp32 scale per output row. Everything
    else stays in the model's dtype (no fp32 upcast: adapters.add_adapter). Checked against the
    bytes bitsandbytes really holds (it quantizes on CPU here)."""
    from lora_cli.train.estimate import build_meta_model, weights_row

    _, recipe = _recipe(tmp_path, tiny_random, {"target_modules": ["q_proj", "v_proj"]}, "bfloat16", quantization)
    real = _real_adapter(recipe)
    measured = 0
    quantized_layers = 0
    for p in real.parameters():
        if p.requires_grad:
            continue
        kind = type(p).__name__
        if kind == "Params4bit":
            qs = p.quant_state
            assert qs.blocksize == 64 and qs.nested and qs.state2.blocksize == 256
            measured += p.numel() * p.element_size() + qs.absmax.numel() * qs.absmax.element_size() \
                + qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            quantized_layers += 1
        elif kind == "Int8Params":
            assert p.dtype.itemsize == 1
            measured += p.numel() + p.SCB.numel() * p.SCB.element_size()
            quantized_layers += 1
        else:
            assert p.dtype.itemsize == 2  # bf16, as loaded
            measured += p.numel() * p.element_size()

    model, _, quantized = build_meta_model(recipe)
    _, estimated, how = weights_row(recipe, model, quantized)
    assert len(quantized) == quantized_layers == 14  # 2 layers x 7 projections; lm_head stays unquantized
    assert estimated == measured
    assert ("NF4" if quantization == "4bit" else "int8") in how


def test_memory_rows_follow_the_trainable_parameters(tmp_path, tiny_random):
    from lora_cli.train.estimate import GiB, estimate_recipe, fits

    _, recipe = _recipe(tmp_path, tiny_random, {"target_modules": "all-linear"}, "bfloat16")
    est = estimate_recipe(recipe)
    rows = {name: nbytes for name, nbytes, _ in est.memory.rows}
    lora_fp32 = 4 * est.params.trainable  # peft keeps adapters of a bf16 base in fp32
    assert rows["LoRA weights"] == rows["gradients"] == lora_fp32
    assert rows["optimizer state"] == 2 * lora_fp32
    assert rows["base weights (frozen)"] == 2 * est.params.total - 2 * est.params.trainable
    assert 0 < est.memory.activations_checkpointed < est.memory.activations
    assert est.memory.total == sum(rows.values()) + est.memory.activations
    assert fits(int(15 * GiB)) == [24, 40, 48, 80]  # 16 GB cards keep 10% spare
    assert fits(int(100 * GiB)) == []


def test_seven_b_config_qlora_memory_is_plausible(tmp_path):
    """A Llama-2-7B shaped config, nothing loaded: NF4 base near 3.9 GB, 4.127 bits a weight."""
    from lora_cli.train.estimate import GiB, estimate_recipe

    folder = llama_config_folder(tmp_path / "llama7b", hidden=4096, intermediate=11008, heads=32, layers=32)
    _, recipe = _recipe(tmp_path, folder, {"r": 16, "target_modules": ["q_proj", "v_proj"]}, "auto", "4bit")
    est = estimate_recipe(recipe)
    assert est.params.total == 6_738_415_616 + est.params.trainable  # Llama-2-7B's parameter count
    assert est.params.trainable == 32 * 2 * 16 * (4096 + 4096)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    base = dict((n, b) for n, b, _ in est.memory.rows)["base weights (frozen)"]
    unquantized = (6_738_415_616 - linear) * 2  # embeddings, lm_head, norms in bf16 (dtype auto on a GPU)
    assert base == linear // 2 + linear // 64 + 4 * (linear // 64 // 256) + unquantized
    assert 3.6 * GiB < base < 3.8 * GiB


def test_budget_gives_the_largest_rank_under_it(tmp_path, tiny_models, cli):
    from lora_cli.train.estimate import estimate_recipe, largest_rank_within
    from lora_cli.recipe.schema import load_recipe

    arch, lora, dtype = CASES["llama-regex-layer1-modules-to-save"]
    path, recipe = _recipe(tmp_path, tiny_models[arch], lora, dtype)
    est = estimate_recipe(recipe)
    budget = 60_000
    rank = largest_rank_within(est.params, budget)

    def real_trainable(r: int) -> int:
        sized = load_recipe(path, [f"model.dtype={dtype}", f"lora.r={r}"])
        return _real_adapter(sized).get_nb_trainable_parameters()[0]

    assert real_trainable(rank) <= budget < real_trainable(rank + 1)

    res = cli("estimate", path, "--budget", "60k")
    assert res.code == 0, res
    assert f"largest rank r={rank}" in flat(res.out)
    assert f"--set lora.r={rank} --set lora.alpha={2 * rank}" in flat(res.out)


def test_cli_prints_counts_size_and_fit(cli, tmp_path, tiny_random):
    from lora_cli.train.estimate import estimate_recipe

    path, recipe = _recipe(tmp_path, tiny_random, {"target_modules": ["q_proj", "v_proj"]})
    est = estimate_recipe(recipe)
    res = cli("estimate", path)
    assert res.code == 0, res
    out = flat(res.out)
    assert f"trainable {est.params.trainable:,d} || all {est.params.total:,d}" in out
    assert f"({est.params.adapter_bytes:,d} bytes)" in out
    assert "fits 16 GB, 24 GB, 40 GB, 48 GB, 80 GB" in out


@pytest.mark.parametrize("budget, message", [
    ("10", "--budget 10 is below the smallest adapter: r=1 needs"),
    ("lots", "--budget 'lots' is not a parameter count"),
])
def test_bad_budget_is_a_clear_error(cli, tmp_path, tiny_random, budget, message):
    path, _ = _recipe(tmp_path, tiny_random, {"target_modules": ["q_proj"]})
    res = cli("estimate", path, "--budget", budget)
    assert res.code == 2
    assert message in flat(res.err)


def test_model_without_config_is_a_clear_error(cli, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    path, _ = _recipe(tmp_path, empty, {})
    res = cli("estimate", path)
    assert res.code == 2
    assert "cannot read the config of model.name_or_path" in flat(res.err)
    assert "Traceback" not in res.err


@pytest.mark.parametrize("method, init", [("dora", "gaussian"), ("rslora", "pissa"), ("lora", "olora")])
def test_counts_equal_peft_for_methods_and_inits(tmp_path, tiny_random, method, init):
    """DoRA adds a magnitude vector per module; PiSSA / OLoRA start from the base's SVD / QR,
    which meta tensors lack, yet the shapes and so the counts are the same."""
    from lora_cli.train.estimate import estimate_recipe
    from lora_cli.recipe.schema import load_recipe

    path, _ = _recipe(tmp_path, tiny_random, {"target_modules": "attention"})
    recipe = load_recipe(path, [f"lora.method={method}", f"lora.init={init}"])
    est = estimate_recipe(recipe)
    real = _real_adapter(recipe)
    assert (est.params.trainable, est.params.total) == real.get_nb_trainable_parameters()
    if method == "dora":
        assert est.params.full_params == sum(p.numel() for n, p in real.named_parameters() if "magnitude" in n) > 0


@pytest.mark.parametrize("method, extra", [
    ("prompt_tuning", {"lora.prompt_init_text": "Answer the question."}),
    ("prompt_tuning", {}),
    ("prefix_tuning", {}),
])
def test_prompt_learning_counts_and_file_size(tmp_path, tiny_random, method, extra):
    """Prompt-learning adapters save a virtual-token table, which peft copies off the device to
    save; on meta tensors that copy fails, so the estimate sizes the table itself."""
    from lora_cli.train.estimate import estimate_recipe
    from lora_cli.recipe.schema import load_recipe

    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(8))
    path = make_recipe(tmp_path, tiny_random, data, lora={"method": method, "num_virtual_tokens": 6})
    # make_recipe writes LoRA keys these methods do not read (and so refuse); drop them
    raw = yaml.safe_load(path.read_text())
    raw["lora"] = {"method": method, "num_virtual_tokens": 6}
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path, [f"{k}={v}" for k, v in extra.items()])
    est = estimate_recipe(recipe)
    real = _real_adapter(recipe)
    assert (est.params.trainable, est.params.total) == real.get_nb_trainable_parameters()
    real.save_pretrained(tmp_path / "adapter")
    assert est.params.adapter_bytes == os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_bundled_recipe_estimates(cli, request, recipe_file):
    # a base of the kind the recipe's model.task needs (seq2seq: an encoder-decoder)
    task = (yaml.safe_load(recipe_file.read_text()).get("model") or {}).get("task")
    base = request.getfixturevalue("tiny_t5" if task == "seq2seq" else "tiny_random")
    res = cli("estimate", recipe_file, "--set", f"model.name_or_path={base}")
    assert res.code == 0, res
    assert "trainable" in res.out and "Traceback" not in res.err


# --------------------------------------------------------------------------- what backward keeps

def saved_bytes(model, tokens: int, autocast: bool) -> int:
    """Bytes autograd keeps for backward after one training forward pass of one row, as
    saved_tensors_hooks sees them: each storage once, the model's own weights left out."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, tokens))
    model.train()
    with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.fixture(scope="module")
def llama_256(tmp_path_factory):
    """A Llama-3-shaped model (grouped KV heads, gated MLP) small enough to count on CPU; its
    sizes are multiples of 64, as bitsandbytes' 4-bit blocks need."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama256")
    config = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _counting_recipe(tmp_path, folder, **keys):
    from lora_cli.recipe.schema import recipe_from_dict

    raw = {"model": {"name_or_path": str(folder), "dtype": "bfloat16"},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"path": str(write_jsonl(tmp_path / "d.jsonl", demo_rows(2))), "max_length": 64},
           "train": {"kernels": "none", "precision": "bf16"}, "output_dir": str(tmp_path / "run")}
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return recipe_from_dict(raw)


def _predicted(recipe, model, tokens: int, **facts) -> int:
    """lora_cli.train.activations' count for one row without a mask (what saved_bytes runs)."""
    import dataclasses

    from lora_cli.train.activations import forward_saved_bytes
    from lora_cli.train.estimate import activation_shapes, saving_of, with_weight_copies

    saving = with_weight_copies(saving_of(recipe, layout="padded", attention="sdpa"), model)
    saving = dataclasses.replace(saving, dense_mask="", dropout_mask=2, **facts)  # CPU dropout: a bf16 mask
    return forward_saved_bytes(*activation_shapes(model.get_base_model().config, model), saving, tokens)


SETTINGS = {  # name: (recipe keys, autocast)
    "bf16 base, fp32 adapters": ({}, True),
    "bf16 base, bf16 adapters": ({"lora__adapter_dtype": "bfloat16"}, True),
    "4-bit base": ({"model__quantization": "4bit"}, True),
    "fp32": ({"model__dtype": "float32", "train__precision": "fp32"}, False),
    "lora dropout": ({"lora__dropout": 0.1}, True),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_activation_model_counts_what_backward_keeps(tmp_path, llama_256, setting):
    """The estimate's activations equal, within 5%, the bytes saved_tensors_hooks sees on CPU
    (bf16 autocast stands in for the GPU's), at two lengths, in each setting."""
    from lora_cli.model.adapters import add_adapter
    from lora_cli.model.load import load_base_model

    keys, autocast = SETTINGS[setting]
    recipe = _counting_recipe(tmp_path, llama_256, **keys)
    model = add_adapter(load_base_model(recipe.model, device="cpu"), recipe)
    for tokens in (64, 128):
        counted = saved_bytes(model, tokens, autocast)
        assert _predicted(recipe, model, tokens) == pytest.approx(counted, rel=0.05), (setting, tokens)


def test_qlora_keeps_no_more_than_lora_and_the_old_waste_is_gone(tmp_path, llama_256):
    """What was wasted, counted: peft's cast of each adapted layer's input to fp32 adapters
    (every layer kept its own copy) and peft's prepare_model_for_kbit_training (an fp32
    residual stream under a 4-bit base). Both are gone: 4-bit keeps what bf16 LoRA keeps
    per token, and the old ways are counted by the same model with their facts."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from lora_cli.model.adapters import add_adapter, peft_config
    from lora_cli.model.load import load_base_model

    lora, qlora = (_counting_recipe(tmp_path, llama_256, **keys) for keys in ({}, {"model__quantization": "4bit"}))
    per_token = {}
    for name, recipe in (("lora", lora), ("qlora", qlora)):
        model = add_adapter(load_base_model(recipe.model, device="cpu"), recipe)
        per_token[name] = saved_bytes(model, 128, True) - saved_bytes(model, 64, True)
    assert per_token["qlora"] <= per_token["lora"]

    # the old bf16 LoRA: peft casting every adapted layer's input, each keeping its copy
    model = add_adapter(load_base_model(lora.model, device="cpu"), lora)
    model._forward_pre_hooks.clear()
    for module in model.modules():
        module._forward_pre_hooks.clear()
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = True
    old = saved_bytes(model, 128, True) - saved_bytes(model, 64, True)
    assert old > 1.15 * per_token["lora"]
    assert _predicted(lora, model, 128, input_copies="all") - _predicted(lora, model, 64, input_copies="all") \
        == pytest.approx(old, rel=0.05)

    # the old QLoRA: everything bitsandbytes left alone upcast to fp32
    base = prepare_model_for_kbit_training(load_base_model(qlora.model, device="cpu"), use_gradient_checkpointing=False)
    model = get_peft_model(base, peft_config(qlora, base))
    old = saved_bytes(model, 128, True) - saved_bytes(model, 64, True)
    assert old > 1.5 * per_token["qlora"]
    facts = dict(stream=4, projection=4, input_copies="stream", lm_head_copy=True)
    assert _predicted(qlora, model, 128, **facts) - _predicted(qlora, model, 64, **facts) == pytest.approx(old, rel=0.05)


# The peaks measured on one H200 (issue 23: bench_gpu.py at b04b93a, torch 2.11, transformers
# 5.17, peft 0.21, bitsandbytes 0.50.2, liger-kernel 0.8.5; LoRA r=16 all-linear, sdpa).
# (shape, seq, variant, measured peak GiB)
H200 = [("8B", 4096, "source", 47.5), ("8B", 4096, "defaults", 47.4), ("8B", 4096, "packing", 50.6),
        ("8B", 4096, "checkpointing", 22.4), ("8B", 4096, "qlora", 50.0), ("8B", 4096, "qlora-paper", 16.3),
        ("8B", 4096, "liger", 36.6), ("8B", 512, "source", 19.8), ("8B", 512, "defaults", 45.3),
        ("1B", 512, "source", 4.2), ("1B", 512, "defaults", 14.3)]
H200_SHAPES = {
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
H200_KEYS = {
    "source": {"data": {"packing": False}, "train": {"batch_size": 1, "gradient_accumulation": 8}},
    "packing": {"data": {"packing": True}},
    "checkpointing": {"train": {"gradient_checkpointing": True}},
    "qlora": {"model": {"quantization": "4bit"}},
    "qlora-paper": {"model": {"quantization": "4bit"}, "lora": {"adapter_dtype": "bfloat16"},
                    "train": {"gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"}},
    "liger": {"train": {"kernels": "liger"}},
}


def _h200_recipe(tmp_path, shape: str, seq: int, variant: str):
    import json

    from lora_cli.recipe.schema import recipe_from_dict

    folder = tmp_path / shape
    if not folder.is_dir():
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                        "rope_theta": 500000.0, **H200_SHAPES[shape]}))
    raw = {"model": {"name_or_path": str(folder)},
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
           "data": {"path": str(write_jsonl(tmp_path / "d.jsonl", demo_rows(2))), "max_length": seq},
           "train": {"kernels": "none"}, "output_dir": str(tmp_path / "run")}
    for section, values in H200_KEYS.get(variant, {}).items():
        raw.setdefault(section, {}).update(values)
    return recipe_from_dict(raw)


@pytest.mark.parametrize("shape, seq, variant, measured", H200, ids=[f"{s}-{q}-{v}" for s, q, v, _ in H200])
def test_estimate_is_within_ten_percent_of_the_h200_peaks(tmp_path, shape, seq, variant, measured):
    """The activation model, given the facts of the code that was measured (peft's input casts,
    the fp32 upcast under 4-bit, sdpa with a dense mask for flattened and packed rows), lands
    within 10% of every peak measured; the code it measured is then fixed, and the estimate of
    the fixed code (facts from saving_of) is what `lora estimate` prints."""
    from lora_cli.train.activations import Saving
    from lora_cli.train.estimate import GiB, build_meta_model, estimate_memory

    recipe = _h200_recipe(tmp_path, shape, seq, variant)
    model, config, quantized = build_meta_model(recipe)
    four_bit = recipe.model.quantization == "4bit"
    layout = {"source": "", "packing": "rows"}.get(variant, "flattened")  # single padded rows carry no mask
    measured_code = Saving(compute=2, stream=4 if four_bit else 2, projection=4 if four_bit else 2,
                           input_copies="stream" if four_bit else "all", liger=variant == "liger",
                           dense_mask=layout, lm_head_copy=four_bit)
    memory = estimate_memory(recipe, model, config, quantized, measured_code)
    total = memory.total_checkpointed if recipe.train.gradient_checkpointing else memory.total
    if four_bit:  # the measured code kept the weights bitsandbytes leaves alone in fp32, not bf16
        total += sum(2 * p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in quantized)
    assert total / GiB == pytest.approx(measured, rel=0.10)


def test_qlora_estimate_is_below_lora_for_the_fixed_code(tmp_path):
    from lora_cli.train.estimate import estimate_recipe

    lora = estimate_recipe(_h200_recipe(tmp_path, "8B", 4096, "defaults")).memory
    qlora = estimate_recipe(_h200_recipe(tmp_path, "8B", 4096, "qlora")).memory
    assert qlora.activations == lora.activations  # the same activations: 4-bit changes only the weights
    assert qlora.total < lora.total - 9 * 1024 ** 3
