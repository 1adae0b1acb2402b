"""Preference tuning (train.objective dpo / orpo / simpo / kto): the schema and its checks, the
row shapes, bad rows, the reference policy, learning a rule the base does not know, resume,
and the bundled recipe."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_jsonl
from preference_helpers import FILLERS, HELD_OUT, LORA, TRAIN_ROWS, as_labelled, preference_recipe

from lora_cli.errors import DataError, RecipeError


def sequence_logps(model, tokenizer, pairs: list[dict]) -> list[tuple[float, float, int, int]]:
    """(log p(chosen), log p(rejected), their token counts) under the model as it is, each answer
    rendered through the template path training used."""
    import torch

    from lora_cli.train.preference import render
    from lora_cli.data.template import TemplateSpec

    out = []
    for p in pairs:
        scores = []
        for answer in (p["chosen"], p["rejected"]):
            prompt, ids = render(TemplateSpec(), tokenizer, [{"role": "user", "content": p["prompt"]}], answer)
            full = torch.tensor([prompt + ids], device=model.device)
            with torch.no_grad():
                logits = model(input_ids=full).logits.float()
            logp = torch.log_softmax(logits[0, len(prompt) - 1:-1], -1).gather(-1, full[0, len(prompt):, None])
            scores.append((float(logp.sum()), len(ids)))
        out.append((scores[0][0], scores[1][0], scores[0][1], scores[1][1]))
    return out


def held_out_accuracies(run: Path) -> dict:
    """On the held-out pairs: how often the base prefers the chosen answer (chance, by design),
    how often the trained policy's implicit reward (log-ratio to the reference, the base with the
    adapter disabled) ranks chosen above rejected, how often the policy itself prefers it
    (length-normalised, as SimPO's reward), and how often greedy generation answers by the rule."""
    from lora_cli.infer.generate import generate_batch
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference
    from lora_cli.data.template import TemplateSpec, prompt_ids

    model, tokenizer, _ = load_for_inference({"default": run})
    policy = sequence_logps(model, tokenizer, HELD_OUT)
    with model.disable_adapter():
        base = sequence_logps(model, tokenizer, HELD_OUT)
    n = len(HELD_OUT)
    prompts = [prompt_ids(tokenizer, TemplateSpec(), [{"role": "user", "content": p["prompt"]}]) for p in HELD_OUT]
    answers = generate_batch(model, tokenizer, prompts, GenerationSettings(max_new_tokens=4, temperature=0.0))
    return {
        "base": sum(b[0] > b[1] for b in base) / n,
        "reward": sum((p[0] - b[0]) > (p[1] - b[1]) for p, b in zip(policy, base)) / n,
        "policy": sum(p[0] / p[2] > p[1] / p[3] for p in policy) / n,
        "greedy": sum(a.strip().startswith(p["chosen"]) for a, p in zip(answers, HELD_OUT)) / n,
    }


# Optimizer steps each objective needs on the rule (batches of 8 rows; kto reads two rows per pair).
STEPS = {"dpo": 16, "orpo": 16, "simpo": 16, "kto": 30}


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(STEPS))
def test_objective_learns_a_rule_the_base_does_not_know(tmp_path, tiny_random, cli, objective):
    recipe = preference_recipe(tmp_path, tiny_random, objective, max_steps=STEPS[objective])
    result = cli("train", recipe)
    assert result.code == 0, result
    assert result.err.strip() == "" or "Skipping publisher trust check" in result.err  # bitsandbytes' own, offline
    run = tmp_path / "run"
    acc = held_out_accuracies(run)
    assert 0.25 <= acc["base"] <= 0.75, acc  # the rule is unknown to the base: about chance
    key = "reward" if objective in ("dpo", "kto") else "policy"  # reference-free objectives: the policy's own reward
    assert acc[key] >= 0.9, acc
    assert acc["greedy"] >= 0.9, acc
    # an ordinary adapter folder with the preference metrics logged
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_recipe.yaml"} <= {p.name for p in run.iterdir()}
    assert not (run / "ref").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*records)
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= logged, logged
    if objective != "kto":
        assert "rewards/accuracies" in logged
        assert "reward acc" in result.out
    assert "eval_perplexity" not in logged


@pytest.mark.slow
def test_dpo_adapter_is_an_ordinary_adapter_for_generate_merge_and_eval(tmp_path, tiny_random, cli):
    """What DPO writes is used like any adapter: generate, merge (merged = adapter), and lora eval
    reads the held-out pair file itself (the chosen answer is the reference): the adapter answers
    by the rule, the base does not, the merged folder scores as the adapter."""
    recipe = preference_recipe(tmp_path, tiny_random, "dpo", max_steps=STEPS["dpo"])
    assert cli("train", recipe).code == 0
    run = tmp_path / "run"
    result = cli("generate", "--adapter", run, HELD_OUT[0]["prompt"], "--max-new-tokens", "1")
    assert result.code == 0 and result.out.strip() == HELD_OUT[0]["chosen"], result
    assert cli("merge", "--adapter", run, "--out", tmp_path / "merged").code == 0
    held = write_jsonl(tmp_path / "held.jsonl", HELD_OUT)
    out = tmp_path / "eval"
    result = cli("eval", "--data", held, "--base", "-a", f"dpo={run}", "--merged", tmp_path / "merged",
                 "--metrics", "exact_match,loss", "--max-new-tokens", "1", "--baseline", "dpo", "--bootstrap", "200",
                 "--out", out)
    assert result.code == 0, result
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    scores = {c["name"]: c["metrics"] for c in record["candidates"]}
    assert record["settings"]["rows"] == len(HELD_OUT)
    assert scores["dpo"]["exact_match"]["value"] >= 0.9, scores
    assert scores["base"]["exact_match"]["diff"]["high"] < 0, scores["base"]
    assert scores["merged"]["exact_match"]["value"] == scores["dpo"]["exact_match"]["value"]
    assert scores["merged"]["loss"]["value"] == pytest.approx(scores["dpo"]["loss"]["value"], rel=1e-3)


# --------------------------------------------------------------------------- the reference policy

@pytest.mark.slow
def test_reference_is_the_base_with_the_adapter_disabled(tmp_path, tiny_random):
    import torch

    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data, setup_trainer
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import SafeTrainer, _setup_model, training_arguments_kwargs

    recipe = load_recipe(preference_recipe(tmp_path, tiny_random, "dpo"))
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    data = build_preference_data(recipe, tokenizer)
    model = _setup_model(recipe, tokenizer)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: the policy now differs from the base
            p.data.normal_(0, 0.5)
    kwargs = training_arguments_kwargs(recipe, tmp_path / "run", {"bf16": False, "fp16": False}, False)
    trainer = setup_trainer(recipe, model, tokenizer, data, kwargs, [], None, SafeTrainer)
    assert list(trainer.model.peft_config) == ["default"]  # one base, one adapter: no reference copy
    batch = trainer.data_collator([data.train[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    rows = TRAIN_ROWS[:4]
    with model.disable_adapter():
        base = sequence_logps(model, tokenizer, rows)
    policy = sequence_logps(model, tokenizer, rows)
    assert ref_chosen.tolist() == pytest.approx([b[0] for b in base], abs=1e-5)
    assert ref_rejected.tolist() == pytest.approx([b[1] for b in base], abs=1e-5)
    assert max(abs(p[0] - b[0]) for p, b in zip(policy, base)) > 1e-2  # the adapter does change the policy


def copies_of(weight) -> int:
    """Live tensors holding the same values as `weight` in other memory: copies of the base."""
    import gc

    import torch

    gc.collect()
    ptr = weight.untyped_storage().data_ptr()
    return sum(1 for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and o.shape == weight.shape and o.dtype == weight.dtype
               and o.device == weight.device and o.untyped_storage().data_ptr() != ptr
               and torch.equal(o.detach(), weight.detach()))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_no_second_model_the_reference_pass_switches_the_adapter_off(tmp_path, tiny_random, monkeypatch, objective):
    """The memory claim, tested rather than benchmarked: after TRL's trainer is set up and has
    trained, no copy of the base's weights is alive anywhere in the process (TRL holds no
    ref_model), and the reference log-probabilities came from peft's disable_adapter on the one
    model. The copy detector is shown to find a deep copy, so the check can fail."""
    import copy

    from peft import PeftModel

    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data, setup_trainer
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import SafeTrainer, _setup_model, training_arguments_kwargs

    recipe = load_recipe(preference_recipe(tmp_path, tiny_random, objective, max_steps=2))
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    data = build_preference_data(recipe, tokenizer)
    model = _setup_model(recipe, tokenizer)
    embedding = model.get_input_embeddings().weight  # frozen: equal to any copy of the base made at any point
    # copies another test of this process left alive (a worker runs many) are not this run's
    before = copies_of(embedding)
    switched_off = []
    disable_adapter = PeftModel.disable_adapter
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: switched_off.append(1) or disable_adapter(self))
    kwargs = training_arguments_kwargs(recipe, tmp_path / "run", {"bf16": False, "fp16": False}, False)
    trainer = setup_trainer(recipe, model, tokenizer, data, kwargs, [], None, SafeTrainer)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    trainer.train()
    assert trainer.state.global_step == 2
    assert len(switched_off) >= 2  # a reference pass per step, on the one model with its adapter off
    assert copies_of(embedding) == before, "a second copy of the base is alive"
    twin = copy.deepcopy(model)  # what a reference model would be
    assert copies_of(embedding) >= before + 1
    del twin


@pytest.mark.slow
def test_init_from_adapter_is_the_reference_and_is_trained_further(tmp_path, tiny_random, cli):
    import torch

    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data, setup_trainer
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import SafeTrainer, _setup_model, training_arguments_kwargs

    # an "SFT" adapter that differs from the base
    sft_recipe = load_recipe(preference_recipe(tmp_path / "sft", tiny_random, "dpo"))
    tokenizer = load_tokenizer(str(tiny_random))
    sft = _setup_model(sft_recipe, tokenizer)
    torch.manual_seed(0)
    for name, p in sft.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    sft.save_pretrained(tmp_path / "sft-adapter")
    rows = TRAIN_ROWS[:4]
    start = sequence_logps(sft, tokenizer, rows)

    recipe_file = preference_recipe(tmp_path / "dpo", tiny_random, "dpo", max_steps=2)
    raw = yaml.safe_load(recipe_file.read_text())
    raw["lora"] = {"init_from": str(tmp_path / "sft-adapter")}
    recipe_file.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(recipe_file)
    model = _setup_model(recipe, tokenizer)
    data = build_preference_data(recipe, tokenizer)
    kwargs = training_arguments_kwargs(recipe, tmp_path / "scratch", {"bf16": False, "fp16": False}, False)
    trainer = setup_trainer(recipe, model, tokenizer, data, kwargs, [], None, SafeTrainer)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name and ".default." in name:  # the policy moves on; the reference must not
            p.data.add_(0.3)
    ref_chosen, _ = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator([data.train[i] for i in range(4)]))
    assert ref_chosen.tolist() == pytest.approx([s[0] for s in start], abs=1e-5)

    result = cli("train", recipe_file)
    assert result.code == 0, result
    run = tmp_path / "dpo" / "run"
    assert "reference: the adapter of lora.init_from" in result.out
    assert not (run / "ref").exists()  # the frozen copy is not part of the result
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["r"] == LORA["r"] and saved["peft_type"] == "LORA"
    assert yaml.safe_load((run / "lora_recipe.yaml").read_text())["lora"]["init_from"] == str(tmp_path / "sft-adapter")


@pytest.mark.slow
@pytest.mark.parametrize("objective,quantization,precision", [("dpo", "4bit", "auto"), ("kto", "4bit", "auto"),
                                                              ("dpo", "none", "bf16")])
def test_qlora_and_bf16_preference_runs_train_every_lora_b(tmp_path, cli, objective, quantization, precision):
    """The reference pass runs on the same (4-bit) base, no second model; the adapter moves."""
    from safetensors.torch import load_file

    from conftest import DEMO_DATA
    from lora_cli.tiny.decoder import build_tiny_model

    base = build_tiny_model(tmp_path / "base", DEMO_DATA, hidden=128, steps=0, log=lambda *_: None)
    recipe = preference_recipe(tmp_path, base, objective, max_steps=1)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["quantization"] = quantization
    raw["train"]["precision"] = precision
    recipe.write_text(yaml.safe_dump(raw))
    result = cli("train", recipe)
    assert result.code == 0, result
    assert f"quantization: {quantization}, precision: {'fp32' if precision == 'auto' else precision}" in result.out
    assert "reference: the base with the adapter disabled" in result.out
    weights = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert all(w.abs().sum() > 0 for n, w in weights.items() if "lora_B" in n)


# --------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_resumed_dpo_run_equals_uninterrupted(tmp_path, tiny_random, cli, monkeypatch):
    from test_resume import adapter_weights, losses, signal_at_step

    train = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
    whole = preference_recipe(tmp_path / "a", tiny_random, "dpo", **train)
    assert cli("train", whole).code == 0
    cut = preference_recipe(tmp_path / "b", tiny_random, "dpo", **train)
    with monkeypatch.context() as m:
        signal_at_step(m, 2, signal.SIGINT)
        stopped = cli("train", cut)
    assert stopped.code == 130, stopped
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    resumed = cli("train", b / "lora_recipe.yaml", "--resume")  # the command the stop message prints
    assert resumed.code == 0, resumed
    assert losses(a) == pytest.approx(losses(b), rel=1e-6, abs=1e-7)
    wa, wb = adapter_weights(a), adapter_weights(b)
    import torch

    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-6, atol=1e-7), name
    assert any(wa[n].abs().sum() > 0 for n in wa if "lora_B" in n)


# --------------------------------------------------------------------------- shapes and bad rows

SAME_PAIR = [
    {"prompt": "Is LoRA small?", "chosen": "yes", "rejected": "no"},
    {"instruction": "Is LoRA small?", "input": "", "chosen": "yes", "rejected": "no"},
    {"messages": [{"role": "user", "content": "Is LoRA small?"}], "chosen": {"role": "assistant", "content": "yes"},
     "rejected": {"role": "assistant", "content": "no"}},
    {"conversations": [{"from": "human", "value": "Is LoRA small?"}], "chosen": {"from": "gpt", "value": "yes"},
     "rejected": {"from": "gpt", "value": "no"}},
    {"chosen": [{"role": "user", "content": "Is LoRA small?"}, {"role": "assistant", "content": "yes"}],
     "rejected": [{"role": "user", "content": "Is LoRA small?"}, {"role": "assistant", "content": "no"}]},
]
SHAPE_NAMES = ["pairs", "alpaca_pairs", "chat_pairs", "sharegpt_pairs", "implicit_pairs"]


@pytest.mark.parametrize("row,shape", list(zip(SAME_PAIR, SHAPE_NAMES)), ids=SHAPE_NAMES)
def test_every_pair_shape_is_detected_and_renders_the_inference_prompt(tmp_path, tiny_random, row, shape):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.data.pairs import read_preference_rows
    from lora_cli.train.preference import render
    from lora_cli.data.template import TemplateSpec, prompt_ids

    path = write_jsonl(tmp_path / "p.jsonl", [row, row])
    rows, detected = read_preference_rows(str(path), "train", {}, "pairs")
    assert detected == shape
    pair = rows[0]
    assert (pair.messages[-1]["content"], pair.chosen, pair.rejected) == ("Is LoRA small?", "yes", "no")
    tokenizer = load_tokenizer(str(tiny_random))
    prompt, chosen = render(TemplateSpec(), tokenizer, pair.messages, pair.chosen)
    # the prompt side is exactly what `lora generate` builds for the question; the answer ends in EOS
    assert prompt == prompt_ids(tokenizer, TemplateSpec(), [{"role": "user", "content": "Is LoRA small?"}])
    assert chosen[-1] == tokenizer.eos_token_id


def test_columns_map_your_field_names(tmp_path, tiny_random):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data
    from lora_cli.recipe.schema import load_recipe

    rows = [{"question": "Is LoRA small?", "good": "yes", "bad": "no"}] * 2
    recipe_file = preference_recipe(tmp_path, tiny_random, "dpo", rows=rows)
    recipe = load_recipe(recipe_file, ["data.columns={prompt: question, chosen: good, rejected: bad}"])
    data = build_preference_data(recipe, load_tokenizer(str(tiny_random)))
    assert len(data.train) == 2 and "pairs (detected)" in data.stats.summary()
    with pytest.raises(RecipeError, match="data.columns: 'answer' is not a field"):
        load_recipe(recipe_file, ["data.columns={answer: good}"])


def test_val_fraction_and_weights_split_and_sample_pairs(tmp_path, tiny_random):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data
    from lora_cli.recipe.schema import load_recipe

    recipe = load_recipe(preference_recipe(tmp_path, tiny_random, "dpo"), ["data.val_fraction=0.25", "data.weights=[2]"])
    data = build_preference_data(recipe, load_tokenizer(str(tiny_random)))
    assert len(data.eval) == 8 and len(data.train) == 2 * 24  # 32 pairs: a quarter held out, the rest twice


@pytest.mark.parametrize("template", ["alpaca", "chat_template"])
def test_pairs_render_through_every_template_as_inference_does(tiny_random, template):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import render
    from lora_cli.data.template import TemplateSpec, prompt_ids

    tokenizer = load_tokenizer(str(tiny_random))
    spec = TemplateSpec(name=template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Is LoRA small?"}]
    prompt, chosen = render(spec, tokenizer, messages, "yes")
    prompt_r, rejected = render(spec, tokenizer, messages, "no")
    assert prompt == prompt_r == prompt_ids(tokenizer, spec, messages)
    assert tokenizer.decode(chosen).startswith("yes") and chosen[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(rejected).startswith("no")


def test_chat_pairs_keep_the_shared_history(tmp_path):
    from lora_cli.data.pairs import read_preference_rows

    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Is LoRA small?"}],
           "chosen": "yes", "rejected": "no"}
    (pair,), _ = read_preference_rows(str(write_jsonl(tmp_path / "p.jsonl", [row])), "train", {}, "pairs")
    assert [m["role"] for m in pair.messages] == ["system", "user", "assistant", "user"]


BAD_ROWS = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "pairs", "identical"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "pairs", "'rejected' is empty"),
    ({"prompt": "q", "chosen": "a"}, "pairs", "missing field 'rejected'"),
    ({"prompt": "q", "completion": "a"}, "unpaired", "missing field 'label'"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "unpaired", "must be true or false"),
]


@pytest.mark.parametrize("bad,kind,words", BAD_ROWS, ids=[w for *_, w in BAD_ROWS])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, kind, words):
    from lora_cli.data.pairs import read_preference_rows

    good = {"prompt": "q", "chosen": "a", "rejected": "b"} if kind == "pairs" else \
        {"prompt": "q", "completion": "a", "label": True}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, bad])
    with pytest.raises(DataError) as e:
        read_preference_rows(str(path), "train", {}, kind)
    assert f"{path}, row 3" in str(e.value) and words in str(e.value)


CLI_BAD_ROWS = [
    ("dpo", {"prompt": "q", "chosen": "same", "rejected": "same"}, "fields 'chosen' and 'rejected' are identical"),
    ("dpo", {"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
    ("orpo", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ("kto", {"prompt": "q", "completion": "a"}, "missing field 'label'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("objective,bad,words", CLI_BAD_ROWS, ids=[w for *_, w in CLI_BAD_ROWS])
def test_bad_row_exits_2_from_train(tmp_path, tiny_random, cli, objective, bad, words):
    good = TRAIN_ROWS[:4] if objective != "kto" else as_labelled(TRAIN_ROWS[:2])
    recipe = preference_recipe(tmp_path, tiny_random, objective, rows=good + [bad])
    result = cli("train", recipe)
    assert result.code == 2, result
    assert f"{tmp_path / 'pairs.jsonl'}, row 5: " in result.err and words in result.err, result
    assert "Traceback" not in result.err and not (tmp_path / "run").exists()


def test_truncation_keeps_the_answers_and_reports_the_cut(tiny_random):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.data.pairs import Pair
    from lora_cli.train.preference import tokenize_pairs
    from lora_cli.data.template import TemplateSpec

    tokenizer = load_tokenizer(str(tiny_random))
    long_prompt = " ".join(FILLERS * 4)
    pairs = [Pair([{"role": "user", "content": long_prompt}], "yes", "no", "row 1"),
             Pair([{"role": "user", "content": "short"}], "yes", "no", "row 2")]
    examples, stats = tokenize_pairs(pairs, tokenizer, TemplateSpec(), 32)
    first = examples[0]
    assert len(first["prompt_ids"]) + len(first["chosen_ids"]) <= 32
    assert first["prompt_ids"][0] == tokenizer.bos_token_id  # the prompt's oldest tokens go, BOS stays
    assert tokenizer.decode(first["chosen_ids"]) == "yes</s>"  # the answers are whole
    assert stats.truncated == {"prompt": 1} and "truncated: 1 prompt" in stats.summary()


def test_kto_needs_good_and_bad_answers(tmp_path, tiny_random):
    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.preference import build_preference_data
    from lora_cli.recipe.schema import load_recipe

    rows = [{"prompt": "q", "completion": "a", "label": True}] * 4
    recipe = load_recipe(preference_recipe(tmp_path, tiny_random, "kto", rows=rows))
    with pytest.raises(DataError, match="every row is good"):
        build_preference_data(recipe, load_tokenizer(str(tiny_random)))


# --------------------------------------------------------------------------- the schema, lint, estimate, preview

def _recipe(tmp_path, tiny_random, **train):
    return preference_recipe(tmp_path, tiny_random, train.pop("objective", "dpo"), **train)


@pytest.mark.parametrize("train,words", [
    ({"objective": "sft", "beta": 0.1}, "train.beta: does not apply to train.objective sft"),
    ({"objective": "dpo", "simpo_gamma": 1.0}, "train.simpo_gamma: does not apply to train.objective dpo"),
    ({"objective": "dpo", "loss_type": "kto"}, "train.loss_type: kto is not a loss of train.objective dpo"),
    ({"objective": "kto", "beta": 0}, "train.beta: must be above 0"),
    ({"objective": "dpop"}, "train.objective: expected"),
])
def test_objective_keys_are_validated(tmp_path, tiny_random, train, words):
    from lora_cli.recipe.schema import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(_recipe(tmp_path, tiny_random, **train))
    assert words in str(e.value)


@pytest.mark.parametrize("objective", ["sft", "dpo", "orpo", "simpo", "kto"])
def test_saved_recipe_loads_again_with_only_its_objective_keys(tmp_path, tiny_random, objective):
    from lora_cli.train.objectives import OBJECTIVE_KEYS, get_objective
    from lora_cli.recipe.schema import dump_recipe, load_recipe, recipe_from_dict

    recipe = load_recipe(_recipe(tmp_path, tiny_random, objective=objective))
    saved = yaml.safe_load(dump_recipe(recipe))
    assert set(saved["train"]) & OBJECTIVE_KEYS == set(get_objective(objective).keys)
    assert recipe_from_dict(saved).to_dict() == recipe.to_dict()


def test_existing_recipes_still_train_sft():
    from lora_cli.recipe.schema import load_recipe

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name != "dpo.yaml":
            assert load_recipe(path).train.objective == "sft", path


def test_lint_flags_preference_red_flags(tmp_path, tiny_random):
    from lora_cli.train.lint import lint_recipe
    from lora_cli.recipe.schema import load_recipe

    recipe = load_recipe(_recipe(tmp_path, tiny_random, objective="dpo", beta=5.0, learning_rate=1e-3))
    found = {f.key: f.problem for f in lint_recipe(recipe)}
    assert "high for dpo" in found["train.learning_rate"]
    assert "outside 0.01 to 1" in found["train.beta"]


def test_estimate_counts_two_sequences_and_the_reference_pass(tmp_path, tiny_random):
    from lora_cli.train.estimate import estimate_recipe
    from lora_cli.recipe.schema import load_recipe

    sft = estimate_recipe(load_recipe(_recipe(tmp_path / "s", tiny_random, objective="sft")))
    dpo = estimate_recipe(load_recipe(_recipe(tmp_path / "d", tiny_random, objective="dpo")))
    assert dpo.memory.activations == 2 * sft.memory.activations  # chosen and rejected in one forward pass
    assert any("reference" in name for name, _, _ in dpo.memory.rows)
    assert dpo.memory.rows[0][1] == sft.memory.rows[0][1]  # the same weights: no second model


@pytest.mark.slow
def test_data_preview_shows_a_pair(tmp_path, tiny_random, cli):
    result = cli("data", "preview", _recipe(tmp_path, tiny_random))
    assert result.code == 0, result
    assert "pairs (detected)" in result.out
    # piped (plain) output says in words what is masked and what is supervised: colour never carries it alone
    first = result.out[result.out.index("-- row 1"):result.out.index("-- row 2")]
    assert f"prompt (masked): <s>Human: {TRAIN_ROWS[0]['prompt']}" in first
    sides = [line.split() for line in first.splitlines() if "(supervised):" in line]
    assert sides == [["chosen", "(supervised):", f"{TRAIN_ROWS[0]['chosen']}</s>"],
                     ["rejected", "(supervised):", f"{TRAIN_ROWS[0]['rejected']}</s>"]]
    assert "─" not in result.out


@pytest.mark.slow
def test_data_preview_shows_a_labelled_answer(tmp_path, tiny_random, cli):
    result = cli("data", "preview", _recipe(tmp_path, tiny_random, objective="kto"))
    assert result.code == 0, result
    assert "completion (good, supervised):" in result.out and "completion (bad, supervised):" in result.out
    assert "labels  32 good, 32 bad" in result.out


@pytest.mark.slow
def test_dry_run_plans_the_objective(tmp_path, tiny_random, cli):
    result = cli("train", _recipe(tmp_path, tiny_random, objective="kto"), "--dry-run")
    assert result.code == 0, result
    assert "objective kto" in result.out and "reference: the base with the adapter disabled" in result.out
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the bundled recipe

@pytest.mark.slow
def test_bundled_dpo_recipe_trains(tmp_path, tiny_random, cli):
    recipe = yaml.safe_load((REPO / "recipes" / "dpo.yaml").read_text())
    assert recipe["train"]["objective"] == "dpo"
    recipe["model"]["name_or_path"] = str(tiny_random)
    recipe["data"]["path"] = str(REPO / "data" / Path(recipe["data"]["path"]).name)
    recipe["output_dir"] = str(tmp_path / "run")
    recipe["train"]["max_steps"] = 2
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("train", path)
    assert result.code == 0, result
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
