"""PEFT methods, initialisations and target-module presets: recipe checks, what gets wrapped on
several architectures, and for every method a real `lora train` whose adapter plain peft
reloads and lora generates from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import demo_rows, make_recipe, write_jsonl
from lora_cli.errors import RecipeError
from lora_cli.model.methods import METHODS as METHOD_REGISTRY
from lora_cli.recipe.schema import dump_recipe, recipe_from_dict

IDS = [[1, 50, 60, 70, 80, 90, 100]]


def method_recipe(tmp_path: Path, model: Path, lora: dict, **sections) -> Path:
    """make_recipe's small run, with the lora section replaced (not merged) by `lora`."""
    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(4))
    path = make_recipe(tmp_path, model, data, train={"max_steps": 1, "learning_rate": 1e-2}, **sections)
    raw = yaml.safe_load(path.read_text())
    raw["lora"] = lora
    raw["data"]["max_length"] = 64
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def raw_recipe(tmp_path: Path, lora: dict, quantization: str = "none") -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    return {"model": {"name_or_path": "some-org/some-model", "quantization": quantization},
            "lora": lora, "data": {"path": str(data)}, "output_dir": str(tmp_path / "out")}


# --------------------------------------------------------------------------- recipe checks

@pytest.mark.parametrize("lora", [
    {"method": "lora", "r": 16, "init": "kaiming", "target_modules": "attention"},
    {"method": "dora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
    {"method": "rslora", "r": 64, "alpha": 16, "init": "pissa"},
    {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]},
    {"method": "prompt_tuning", "num_virtual_tokens": 8, "prompt_init_text": "Answer briefly."},
    {"method": "prefix_tuning", "num_virtual_tokens": 10},
])
def test_each_method_validates_and_its_saved_recipe_loads_again(tmp_path, lora):
    r = recipe_from_dict(raw_recipe(tmp_path, lora))
    assert r.lora.method == lora["method"]
    for k, v in lora.items():
        assert getattr(r.lora, k) == v
    saved = yaml.safe_load(dump_recipe(r))
    # Only the keys the method reads are saved, and the saved recipe is itself a valid recipe.
    assert set(saved["lora"]) - {"method"} <= {"r", "alpha", "dropout", "init", "target_modules", "bias",
                                               "modules_to_save", "num_virtual_tokens", "prompt_init_text",
                                               "adapter_dtype"}
    if lora["method"] == "ia3":
        assert set(saved["lora"]) == {"method", "target_modules", "modules_to_save", "adapter_dtype"}
    again = recipe_from_dict(saved)
    assert again.lora == r.lora


@pytest.mark.parametrize("name", list(METHOD_REGISTRY))
def test_every_registered_method_declares_every_capability(name, tmp_path, tiny_random):
    """Walks the registry: a method added with a capability missing or wrong fails here, by name."""
    import typing

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cli.recipe.schema import LoraConfig

    method = METHOD_REGISTRY[name]
    assert method.name == name and method.doc.startswith(name)
    # its keys are recipe keys, it is a lora.method choice, and its flags agree with each other
    assert method.keys <= set(LoraConfig.__dataclass_fields__) - {"method"}
    assert name in typing.get_args(typing.get_type_hints(LoraConfig)["method"])
    assert ({"r", "alpha"} <= method.keys) if method.has_rank else not ({"r", "alpha"} & method.keys)
    assert method.has_rank or not method.rslora_scaling
    recipe = recipe_from_dict(raw_recipe(tmp_path, {"method": name}))
    assert method.problems(recipe) == []

    def built(rank: int):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_random))
        at_rank = recipe_from_dict(raw_recipe(tmp_path, {"method": name, **({"r": rank} if method.has_rank else {})}))
        config = method.peft_config(at_rank, model)
        return config, get_peft_model(model, config)

    config, model = built(4)
    # what peft builds is the method it says, and peft agrees on what can be merged
    assert config.peft_type.value == method.peft_type
    assert getattr(config, "use_rslora", False) is method.rslora_scaling
    assert config.is_prompt_learning is (not method.merges) is method.learns_virtual_tokens
    # the rank-dependent count is part of what trains, and grows with r exactly when there is a rank
    trainable, _ = model.get_nb_trainable_parameters()
    counted = method.rank_parameters(model)
    assert 0 <= counted <= trainable and trainable > 0
    if method.has_rank:
        assert counted > 0 and method.rank_parameters(built(8)[1]) == 2 * counted
    else:
        assert counted == 0


def test_options_a_method_does_not_read_are_errors_all_at_once(tmp_path):
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw_recipe(tmp_path, {"method": "ia3", "r": 8, "dropout": 0.1, "init": "pissa"}))
    problems = exc.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("lora.dropout: does not apply to lora.method ia3 (it reads: adapter_dtype, modules_to_save, target_modules)")
    assert {p.split(":")[0] for p in problems} == {"lora.r", "lora.dropout", "lora.init"}

    def keys_of(lora):
        with pytest.raises(RecipeError) as e:
            recipe_from_dict(raw_recipe(tmp_path, lora))
        return {p.split(":")[0] for p in e.value.problems}

    assert keys_of({"method": "lora", "num_virtual_tokens": 10}) == {"lora.num_virtual_tokens"}
    assert keys_of({"method": "prompt_tuning", "target_modules": "all-linear", "alpha": 32}) == {"lora.target_modules", "lora.alpha"}
    assert keys_of({"method": "prefix_tuning", "prompt_init_text": "hi"}) == {"lora.prompt_init_text"}
    # A default that the recipe does not write is fine for every method, and so is an empty value.
    assert recipe_from_dict(raw_recipe(tmp_path, {"method": "prefix_tuning"})).lora.r == 8
    assert recipe_from_dict(raw_recipe(tmp_path, {"method": "prefix_tuning", "prompt_init_text": None})).lora.method == "prefix_tuning"


def test_prefix_tuning_with_gradient_checkpointing_is_refused(tmp_path):
    raw = raw_recipe(tmp_path, {"method": "prefix_tuning"}) | {"train": {"gradient_checkpointing": True}}
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw)
    assert exc.value.problems == [p for p in exc.value.problems if p.startswith("lora.method: prefix_tuning cannot run")]
    assert len(exc.value.problems) == 1


def test_pissa_on_a_quantized_base_is_refused(tmp_path):
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw_recipe(tmp_path, {"init": "pissa"}, quantization="4bit"))
    assert exc.value.problems[0].startswith("lora.init: pissa needs the full-precision weights")
    # olora dequantizes and re-quantizes, so it is allowed on 4-bit.
    assert recipe_from_dict(raw_recipe(tmp_path, {"init": "olora"}, quantization="4bit")).lora.init == "olora"


def test_bad_method_combinations_exit_2_through_the_cli(tmp_path, cli):
    path = tmp_path / "ia3.yaml"
    path.write_text(yaml.safe_dump(raw_recipe(tmp_path, {"method": "ia3", "r": 4})))
    res = cli("check", path)
    assert res.code == 2, res
    assert "lora.r: does not apply to lora.method ia3" in res.err and "Traceback" not in res.err
    # --set switches the method of a recipe that writes LoRA-only keys: every one is named.
    res = cli("train", make_recipe(tmp_path, "some-org/some-model"), "--set", "lora.method=prompt_tuning", "--dry-run")
    assert res.code == 2, res
    for k in ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules"):
        assert f"{k}: does not apply to lora.method prompt_tuning" in res.err
    res = cli("check", make_recipe(tmp_path, "some-org/some-model"), "--set", "lora.init=svd")
    assert res.code == 2 and "lora.init: expected 'gaussian' | 'kaiming' | 'pissa' | 'olora', got 'svd'" in res.err


# --------------------------------------------------------------------------- presets

def _tiny(arch: str):
    """Tiny random models of three attention layouts, built in memory."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))


@pytest.mark.parametrize("arch, preset, targets, wrapped_in_layer_0", [
    ("llama", "attention-qv", ["q_proj", "v_proj"], {"self_attn.q_proj", "self_attn.v_proj"}),
    ("llama", "attention", ["q_proj", "k_proj", "v_proj", "o_proj"],
     {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
    ("llama", "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
     {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    ("gpt2", "attention-qv", ["c_attn"], {"attn.c_attn"}),
    ("gpt2", "attention", ["c_attn", "attn.c_proj"], {"attn.c_attn", "attn.c_proj"}),
    ("gpt2", "all-linear", ["c_attn", "c_proj", "c_fc"],  # both c_proj wanted: the short name will do
     {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("bloom", "attention-qv", ["query_key_value"], {"self_attention.query_key_value"}),
    ("bloom", "attention", ["query_key_value", "dense"], {"self_attention.query_key_value", "self_attention.dense"}),
])
def test_presets_map_to_the_architectures_own_modules(arch, preset, targets, wrapped_in_layer_0):
    from peft import get_peft_model

    from lora_cli.model.adapters import adapted_module_names, peft_config
    from lora_cli.model.targets import resolve_target_modules
    from lora_cli.recipe.schema import LoraConfig, ModelConfig, Recipe

    model = _tiny(arch)
    assert resolve_target_modules(model, preset) == targets
    recipe = Recipe(model=ModelConfig(name_or_path="x"), lora=LoraConfig(target_modules=preset))
    wrapped = adapted_module_names(get_peft_model(model, peft_config(recipe, model)))
    layer0 = {n.split(".0.", 1)[1] for n in wrapped if ".0." in n}
    assert layer0 == wrapped_in_layer_0
    assert len(wrapped) == 2 * len(wrapped_in_layer_0)  # the same in both layers, and the head never
    assert not any("lm_head" in n for n in wrapped)


def test_preset_that_finds_nothing_names_the_layers_there(tiny_random):
    import torch

    from lora_cli.model.targets import resolve_target_modules
    from lora_cli.errors import LoraError

    model = torch.nn.Sequential()
    model.add_module("mlp", torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(LoraError) as exc:
        resolve_target_modules(model, "attention")
    assert "lora.target_modules: preset 'attention' finds no matching layer" in exc.value.message
    assert exc.value.hint.endswith("linear layers here: 0")


def test_dry_run_lists_the_wrapped_modules(tiny_random, tmp_path, cli):
    res = cli("train", method_recipe(tmp_path, tiny_random, {"target_modules": "attention", "r": 2}), "--dry-run")
    assert res.code == 0, res
    assert "wrapped 8 modules: model.layers.{0,1}.self_attn.{q_proj,k_proj,v_proj,o_proj}\n" in res.out
    # The source workflow's shape: a regex on one layer's modules plus a module trained in full.
    res = cli("train", method_recipe(tmp_path, tiny_random, {"target_modules": r".*\.1\..*_proj", "r": 2,
                                                             "modules_to_save": ["embed_tokens"]}), "--dry-run")
    assert res.code == 0, res
    assert ("wrapped 7 modules: model.layers.1.self_attn.{q_proj,k_proj,v_proj,o_proj}, "
            "model.layers.1.mlp.{gate_proj,up_proj,down_proj}; trained in full: model.embed_tokens\n") in res.out
    res = cli("train", method_recipe(tmp_path, tiny_random, {"method": "prompt_tuning", "num_virtual_tokens": 3}),
              "--dry-run")
    assert res.code == 0 and "wrapped none; 3 virtual tokens are learned instead" in res.out, res


def test_describe_folds_layer_ranges():
    from lora_cli.model.adapters import _fold

    assert _fold([0, 1, 2, 3, 7]) == "0-3,7"
    assert _fold([0, 1]) == "0,1"
    assert _fold([5]) == "5"


# --------------------------------------------------------------------------- each method end to end

METHODS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "dora": {"method": "dora", "r": 4, "alpha": 8, "target_modules": "attention"},
    "rslora": {"method": "rslora", "r": 4, "alpha": 4, "init": "kaiming"},
    "lora-pissa": {"method": "lora", "r": 4, "init": "pissa"},
    "lora-olora": {"method": "lora", "r": 4, "init": "olora", "target_modules": "all-linear"},
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"]},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4, "prompt_init_text": "Answer the question"},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_saves_reloads_and_generates(name, tiny_random, tmp_path, cli):
    import json

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lora_cli.infer.generate import build_prompt_ids, generate_batch, generate_response
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference

    lora = METHODS[name]
    res = cli("train", method_recipe(tmp_path, tiny_random, lora))
    assert res.code == 0, res
    run = tmp_path / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ia3": "IA3", "prompt_tuning": "PROMPT_TUNING",
                                   "prefix_tuning": "PREFIX_TUNING"}.get(lora["method"], "LORA")
    if config["peft_type"] == "LORA":
        assert config["use_dora"] is (lora["method"] == "dora") and config["use_rslora"] is (lora["method"] == "rslora")
        assert config["init_lora_weights"] == {"gaussian": "gaussian", "kaiming": True}.get(lora.get("init", "gaussian"), lora.get("init"))
    weights = load_file(run / "adapter_model.safetensors")
    if lora.get("init", "gaussian") in ("gaussian", "kaiming") and config["peft_type"] == "LORA":
        # B starts at zero; one step must have moved every entry of every B.
        bs = [t for k, t in weights.items() if "lora_B" in k]
        assert bs and all(int(torch.count_nonzero(b)) == b.numel() for b in bs)
    if name == "ia3":  # scaling vectors start at one; the MLP's down projection scales its input
        assert sorted(config["target_modules"]) == ["down_proj", "k_proj", "v_proj"]
        assert config["feedforward_modules"] == ["down_proj"]
        assert any(not torch.equal(t, torch.ones_like(t)) for t in weights.values())

    # Plain peft reloads it, and it changes the base's output.
    ids = torch.tensor(IDS)
    plain = AutoModelForCausalLM.from_pretrained(tiny_random)
    with torch.no_grad():
        before = plain(input_ids=ids).logits[:, -1]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random), str(run)).eval()
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits[:, -1]
    assert (after - before).abs().max() > 1e-5

    # lora's own loading path generates exactly what plain peft generates.
    settings = GenerationSettings(max_new_tokens=4)
    model, tokenizer, infos = load_for_inference({"a": run}, device="cpu")
    text = generate_response(model, tokenizer, infos["a"].template, "What is LoRA?", settings=settings)
    expected = generate_batch(peft_model, tokenizer, [build_prompt_ids(tokenizer, infos["a"].template, "What is LoRA?")], settings)[0]
    assert isinstance(text, str) and text == expected


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_reload_reproduces_the_trained_model_even_when_init_changed_the_base(init, tiny_random, tmp_path):
    """pissa and olora rewrite the base (W - B0·A0). peft redoes that when it loads the adapter,
    so the saved adapter on the *original* base must equal the model that was trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_cli.model.adapters import add_adapter
    from lora_cli.model.load import load_base_model

    recipe = recipe_from_dict(raw_recipe(tmp_path, {"r": 4, "init": init, "target_modules": "all-linear"})
                              | {"model": {"name_or_path": str(tiny_random)}})
    torch.manual_seed(0)
    model = add_adapter(load_base_model(recipe.model, device="cpu"), recipe)
    ids = torch.tensor(IDS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random),
                                             str(tmp_path / "adapter"))(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_random)(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-4)
    assert (trained - base).abs().max() > 1e-4


def test_a_base_changing_adapter_is_not_loaded_beside_another(tiny_random, tmp_path, cli):
    """peft only warns; the second adapter would run on pissa's rewritten base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, init in (("plain", "gaussian"), ("pissa", "pissa")):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random),
                               LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
        model.save_pretrained(tmp_path / name)
    res = cli("generate", "--adapter", f"a={tmp_path / 'plain'}", "--adapter", f"b={tmp_path / 'pissa'}", "hi")
    assert res.code == 2, res
    assert "adapter 'b' was trained with lora.init pissa, which rewrites the base weights" in res.err
    assert "Traceback" not in res.err
    res = cli("generate", "--adapter", tmp_path / "pissa", "--max-new-tokens", "2", "hi")
    assert res.code == 0, res  # alone it loads (peft redoes the SVD on the original base)
