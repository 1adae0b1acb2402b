"""Fast defaults: the batch shape chosen from train.tokens_per_batch, the batch layout chosen
from the attention kernel, and a recipe that writes the old settings getting exactly them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import demo_rows, make_recipe, write_jsonl
from lora_cli.data.batching import (FLATTENED, PACKED, PADDED, BatchShape, batch_layout, batch_shape,
                               groups_by_length)
from lora_cli.recipe.schema import load_recipe, recipe_from_dict

OLD_WAY = {"data": {"packing": False}, "train": {"batch_size": 1, "gradient_accumulation": 8}}


def recipe(tmp_path, **sections):
    raw = {"model": {"name_or_path": "some-org/some-model"},
           "data": {"path": str(write_jsonl(tmp_path / "d.jsonl", demo_rows(4)))},
           "output_dir": str(tmp_path / "out")}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return recipe_from_dict(raw)


@pytest.mark.parametrize("max_length, budget, expected", [
    (256, 4096, (8, 1)),    # 16 rows would fit; a step stays 8 rows
    (1024, 4096, (4, 2)),
    (2048, 4096, (2, 4)),
    (4096, 4096, (1, 8)),
    (3000, 4096, (1, 8)),   # not a power of two: round down, never exceed the budget
    (256, 100, (1, 8)),     # a budget below one row still trains, one row at a time
])
def test_shape_from_the_token_budget_keeps_eight_rows_per_step(tmp_path, max_length, budget, expected):
    r = recipe(tmp_path, data={"max_length": max_length}, train={"tokens_per_batch": budget})
    shape = batch_shape(r.train, r.data.max_length)
    assert (shape.batch_size, shape.gradient_accumulation) == expected
    assert shape.rows_per_step == 8 and shape.chosen
    assert shape.batch_size * max_length <= max(budget, max_length)


def test_a_written_shape_is_obeyed_and_the_other_key_keeps_its_old_default(tmp_path):
    assert batch_shape(recipe(tmp_path, **OLD_WAY).train, 256) == BatchShape(1, 8, chosen=False)
    assert batch_shape(recipe(tmp_path, train={"batch_size": 4}).train, 256) == BatchShape(4, 8, chosen=False)
    assert batch_shape(recipe(tmp_path, train={"gradient_accumulation": 2}).train, 256) == BatchShape(1, 2, chosen=False)


@pytest.mark.parametrize("packing, attn, masks, layout", [
    (None, "flash_attention_2", False, FLATTENED),  # the default on a GPU with flash-attn: padding-free
    (None, "sdpa", True, FLATTENED),    # a model masking by position ids: flattened under sdpa too
    (None, "eager", True, FLATTENED),
    (None, "sdpa", False, PADDED),      # one that does not (BLOOM's ALiBi): padded rows
    (True, "sdpa", True, PACKED),
    (True, "flash_attention_2", True, FLATTENED),  # packs side by side would attend across examples
    (False, "flash_attention_2", True, PADDED),
    (False, "sdpa", True, PADDED),
])
def test_layout_follows_the_attention_kernel(tmp_path, packing, attn, masks, layout):
    assert batch_layout(recipe(tmp_path, data={"packing": packing}), attn, masks) == layout


@pytest.mark.parametrize("task", ["classification", "seq2seq"])
def test_other_tasks_say_padded_rows_as_their_collators_pad(tmp_path, task):
    r = recipe(tmp_path, model={"task": task})
    assert batch_layout(r, "flash_attention_2", True) == PADDED == batch_layout(r, "sdpa", True)


def test_a_written_batch_shape_is_not_flattened_under_sdpa(tmp_path):
    """Flattened rows on sdpa cost a dense mask over the whole row: only for the chosen shape,
    whose row is at most train.tokens_per_batch tokens."""
    assert batch_layout(recipe(tmp_path, train={"batch_size": 16}), "sdpa", True) == PADDED


def test_which_models_mask_by_position_ids():
    """Llama builds its mask with masking_utils from restarted position_ids; BLOOM (ALiBi, no
    position_ids) would let flattened examples attend to each other."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    from lora_cli.model.load import masks_from_positions

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    bloom = BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2))
    assert masks_from_positions(llama) and not masks_from_positions(bloom)
    assert not masks_from_positions(fake_model("sdpa"))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_get_one_example_per_row(tmp_path, method):
    """peft drops position_ids for them, so examples sharing a row would see each other."""
    from lora_cli.errors import RecipeError

    assert batch_layout(recipe(tmp_path, lora={"method": method}), "flash_attention_2") == PADDED
    with pytest.raises(RecipeError) as e:
        recipe(tmp_path, lora={"method": method}, data={"packing": True})
    assert any(p.startswith("data.packing: true cannot train lora.method") for p in e.value.problems)


def test_length_grouping_only_by_default_and_where_it_saves_padding(tmp_path):
    default = recipe(tmp_path)
    shape = batch_shape(default.train, default.data.max_length)
    assert groups_by_length(default.data, PADDED, shape)
    assert not groups_by_length(default.data, FLATTENED, shape)  # no padding to save
    old = recipe(tmp_path, **OLD_WAY)
    assert not groups_by_length(old.data, PADDED, batch_shape(old.train, 256))  # old order kept exactly
    written = recipe(tmp_path, data={"group_by_length": False})
    assert not groups_by_length(written.data, PADDED, shape)


def fake_model(attn: str):
    return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attn))


def test_trainer_settings_default_and_old_way(tmp_path):
    from lora_cli.train.run import _setup_batching, training_arguments_kwargs

    flags = {"bf16": False, "fp16": False}
    default = recipe(tmp_path)
    kw = training_arguments_kwargs(default, tmp_path, flags, has_eval=False)
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (8, 1)
    assert kw["use_liger_kernel"] is False
    assert _setup_batching(default, fake_model("sdpa")) == (PADDED, True)  # no masking_utils: padded, grouped
    assert _setup_batching(default, fake_model("flash_attention_2")) == (FLATTENED, False)
    old = recipe(tmp_path, **OLD_WAY)
    kw = training_arguments_kwargs(old, tmp_path, flags, has_eval=False)
    assert (kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (1, 8)
    assert _setup_batching(old, fake_model("sdpa")) == (PADDED, False)
    assert _setup_batching(old, fake_model("flash_attention_2")) == (PADDED, False)
    liger = recipe(tmp_path, train={"kernels": "liger"})
    assert training_arguments_kwargs(liger, tmp_path, flags, has_eval=False)["use_liger_kernel"] is True


def test_saved_recipe_of_a_default_run_loads_as_a_default_run(tmp_path):
    """lora_recipe.yaml writes empty keys as empty: reloading it must not turn the chosen shape
    into an explicit batch 1 x 8."""
    from lora_cli.recipe.schema import dump_recipe

    (tmp_path / "saved.yaml").write_text(dump_recipe(recipe(tmp_path)), encoding="utf-8")
    again = load_recipe(tmp_path / "saved.yaml")
    assert batch_shape(again.train, again.data.max_length).chosen and again.data.packing is None


# --------------------------------------------------------------------------- attention and kernels

def test_auto_attention_is_sdpa_on_cpu_and_flash_where_it_fits(tmp_path, tiny_random, monkeypatch):
    import torch

    from lora_cli.model import load as model_module
    from lora_cli.model.load import attention_in_use, load_base_model, resolve_attn_implementation

    cfg = recipe(tmp_path, model={"name_or_path": str(tiny_random)}).model
    assert resolve_attn_implementation(cfg) is None  # transformers' own choice: sdpa
    assert attention_in_use(load_base_model(cfg)) == "sdpa"
    eager = recipe(tmp_path, model={"name_or_path": str(tiny_random), "attn_implementation": "eager"}).model
    assert attention_in_use(load_base_model(eager)) == "eager"

    # on a GPU with flash-attn installed, auto takes flash_attention_2 for a model class that has it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)
    bf16 = recipe(tmp_path, model={"name_or_path": str(tiny_random), "dtype": "bfloat16"}).model
    assert resolve_attn_implementation(bf16) == "flash_attention_2"
    fp32 = recipe(tmp_path, model={"name_or_path": str(tiny_random), "dtype": "float32"}).model
    assert resolve_attn_implementation(fp32) is None  # flash attention has no fp32 kernel
    unknown = recipe(tmp_path, model={"name_or_path": str(tmp_path / "nowhere"), "dtype": "bfloat16"}).model
    assert model_module.causal_lm_class(unknown) is None and resolve_attn_implementation(unknown) is None


def edited(recipe_path, section: str, **keys):
    import yaml

    raw = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
    raw[section].update(keys)
    recipe_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return recipe_path


@pytest.mark.parametrize("section, key, value", [("train", "kernels", "liger"),
                                                 ("model", "attn_implementation", "flash_attention_2")])
def test_gpu_only_kernels_are_refused_before_loading(tmp_path, cli, tiny_random, section, key, value):
    r = cli("train", edited(make_recipe(tmp_path, tiny_random), section, **{key: value}))
    assert r.code == 2, r
    assert f"{section}.{key}" in r.err + r.out and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- training

def losses(run_dir) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.slow
def test_default_shape_trains_the_same_steps_as_the_old_way(tmp_path, cli, tiny_random, monkeypatch):
    """Batch 8 x 1 and batch 1 x 8 see the same rows per step (same sampler, same seed) and the
    Trainer averages over the step's supervised tokens either way, so the losses agree, in every
    layout: the default (flattened rows under sdpa, masked apart by position ids), padded rows,
    and the padding-free layout flash attention gets (the Trainer, peft and the flattening
    collator run for real, told the model runs flash_attention_2 while it runs sdpa, which reads
    the same restarted positions; the kernel itself needs a GPU). A different seed (the
    control) moves the losses."""
    from lora_cli.model import load as model_module

    data = write_jsonl(tmp_path / "d.jsonl", demo_rows(32))
    common = {"max_steps": 2, "warmup_steps": 0, "logging_steps": 1, "learning_rate": 1e-2}
    chosen = {"batch_size": None, "gradient_accumulation": None}
    runs = {}
    for name, train, layout in [("default", chosen, "flattened rows, attention sdpa"),
                                ("padded", chosen, "padded rows, attention sdpa"),
                                ("flattened", chosen, "flattened rows, attention flash_attention_2"),
                                ("old", {"batch_size": 1, "gradient_accumulation": 8}, "padded rows, attention sdpa"),
                                ("control", {"batch_size": 1, "gradient_accumulation": 8, "seed": 7}, None)]:
        folder = tmp_path / name
        folder.mkdir()
        data_keys = {"group_by_length": False, **({"packing": False} if name == "padded" else {})}
        rec = edited(make_recipe(folder, tiny_random, data=data, train={**common, **train}), "data", **data_keys)
        with monkeypatch.context() as m:
            if name == "flattened":
                real = model_module.attention_in_use
                m.setattr(model_module, "attention_in_use",
                          lambda model: "flash_attention_2" if real(model) == "sdpa" else real(model))
            r = cli("train", rec)
        assert r.code == 0, r
        runs[name] = losses(folder / "run")
        if layout:
            assert layout in r.out, (name, r.out)
    assert len(runs["default"]) == 2
    for name in ("default", "padded", "flattened"):
        assert runs[name] == pytest.approx(runs["old"], rel=1e-4), name
    assert runs["control"] != pytest.approx(runs["old"], rel=1e-4)


@pytest.mark.slow
def test_a_model_not_masking_by_position_ids_trains_length_grouped(tmp_path, cli, tiny_random, monkeypatch):
    monkeypatch.setattr("lora_cli.model.load.masks_from_positions", lambda model: False)
    rec = make_recipe(tmp_path, tiny_random, data=write_jsonl(tmp_path / "d.jsonl", demo_rows(24)),
                      train={"batch_size": None, "gradient_accumulation": None})
    r = cli("train", rec)
    assert r.code == 0, r
    assert "(from train.tokens_per_batch), padded rows, length-grouped, attention sdpa" in r.out
    assert all(0 < x < 20 for x in losses(tmp_path / "run"))


# --------------------------------------------------------------------------- kernel choice (lora_cli.model.kernels)

def test_attention_choice_from_device_facts(tmp_path):
    """Padding-free attention on CUDA without flash-attn: flex attention where torch has it."""
    from lora_cli.model.kernels import DeviceFacts, choose_attention

    gpu = DeviceFacts(cuda=True, half=True, flex_attention=True, model_flash=True, model_flex=True)
    assert choose_attention("auto", DeviceFacts(flex_attention=True, model_flex=True)) is None  # CPU: sdpa
    assert choose_attention("auto", gpu) == "flex_attention"
    assert choose_attention(None, DeviceFacts(**{**gpu.__dict__, "flash_attn": True})) == "flash_attention_2"
    fp32 = DeviceFacts(**{**gpu.__dict__, "flash_attn": True, "half": False})
    assert choose_attention("auto", fp32) == "flex_attention"  # flash attention has no fp32 kernel; flex does
    assert choose_attention("auto", DeviceFacts(cuda=True, half=True, flex_attention=True)) is None  # model lacks it
    assert choose_attention("auto", DeviceFacts(cuda=True, half=True, model_flex=True)) is None  # old torch
    assert choose_attention("eager", gpu) == "eager"  # the recipe's word wins
    assert batch_layout(recipe(tmp_path), "flex_attention") == FLATTENED  # flattened rows, masked apart by a block mask


def test_liger_choice_from_device_facts():
    from lora_cli.model.kernels import DeviceFacts, choose_liger

    assert choose_liger("auto", DeviceFacts(cuda=True, liger=True))
    assert not choose_liger("auto", DeviceFacts(cuda=True, liger=False))
    assert not choose_liger("auto", DeviceFacts(cuda=False, liger=True))
    assert choose_liger("liger", DeviceFacts()) and not choose_liger("none", DeviceFacts(cuda=True, liger=True))
    assert not choose_liger("auto", DeviceFacts(cuda=True, liger=True), causal_lm=False)  # Liger patches decoders


def test_rows_per_pass_fit_the_free_memory_and_keep_the_step():
    from lora_cli.model.kernels import choose_rows

    per_row = 10 * 1024 ** 3

    def per_pass(rows):
        return rows * per_row

    assert choose_rows(8, 4096, None, per_pass) is None  # no card: batching's default
    assert choose_rows(8, 4096, 1000 * 1024 ** 3, per_pass) == 8  # never more rows than one step holds
    assert choose_rows(8, 4096, 50 * 1024 ** 3, per_pass) == 4  # 4 x 10 GiB <= 90% of 50 GiB < 8 x 10 GiB
    assert choose_rows(8, 4096, 50 * 1024 ** 3, per_pass, fixed_bytes=10 * 1024 ** 3) == 2
    assert choose_rows(8, 4096, 1024 ** 3, per_pass) == 1  # nothing fits: one row at a time
    assert choose_rows(6, 512, 1000 * 1024 ** 3, per_pass) == 2  # powers of two dividing the step


def test_token_budget_is_sized_from_the_cards_free_memory(tmp_path, tiny_random):
    """With fake device facts: a card with room gets 8 rows per pass, a small one fewer, and
    the rows per optimizer step stay 8; a written budget, or no CUDA, is left alone."""
    import dataclasses

    from lora_cli.model.adapters import add_adapter
    from lora_cli.train.estimate import sized_tokens_per_batch
    from lora_cli.model.kernels import DeviceFacts, RunKernels
    from lora_cli.model.load import load_base_model
    from lora_cli.train.run import describe_batching, training_arguments_kwargs

    r = recipe(tmp_path, model={"name_or_path": str(tiny_random)}, data={"max_length": 512},
               lora={"target_modules": "all-linear"}, train={"kernels": "none"})
    model = add_adapter(load_base_model(r.model, device="cpu"), r)
    roomy = DeviceFacts(cuda=True, free_bytes=80 * 1024 ** 3)
    assert sized_tokens_per_batch(r, model, roomy) == 8 * 512
    small = sized_tokens_per_batch(r, model, dataclasses.replace(roomy, free_bytes=60 * 1024 ** 2))
    assert small is not None and small < 8 * 512
    assert sized_tokens_per_batch(r, model, DeviceFacts(cuda=False, free_bytes=80 * 1024 ** 3)) is None
    written = dataclasses.replace(r, train=dataclasses.replace(r.train, tokens_per_batch=1024))
    assert sized_tokens_per_batch(written, model, roomy) is None
    chosen = RunKernels(liger=False, tokens_per_batch=small, free_bytes=60 * 1024 ** 2)
    kw = training_arguments_kwargs(r, tmp_path, {"bf16": False, "fp16": False}, False, chosen)
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 8
    assert kw["per_device_train_batch_size"] == small // 512
    line = describe_batching(r, model, chosen)
    assert f"token budget {small} sized from 0.1 GiB free" in line and "kernels none" in line and "attention sdpa" in line


def test_inference_never_gets_flex_attention(tmp_path, tiny_random, monkeypatch):
    """Training on CUDA without flash-attn asks for flex attention; generation (new shapes every
    token, each compiled again) keeps transformers' default."""
    from lora_cli.model import kernels
    from lora_cli.model import load as model
    from lora_cli.model.load import resolve_attn_implementation

    monkeypatch.setattr(model, "device_facts", lambda cfg, free=None: kernels.DeviceFacts(
        cuda=True, half=True, flex_attention=True, model_flex=True))
    cfg = recipe(tmp_path, model={"name_or_path": str(tiny_random)}).model
    assert resolve_attn_implementation(cfg, training=True) == "flex_attention"
    assert resolve_attn_implementation(cfg) is None
