"""model.task beyond causal LMs: classification (BERT-like encoders, decoders with a head) and
seq2seq (T5, BART shapes), through the real commands on tiny models built here."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import CLASSIFY_DATA, REPO, SEQ2SEQ_DATA, classify_recipe, seq2seq_recipe, task_recipe, write_jsonl
from hints import as_args, hinted_commands

from lora_cli.errors import RecipeError
from lora_cli.recipe.schema import load_recipe


def classify_rows() -> list[dict]:
    return [json.loads(line) for line in CLASSIFY_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def seq2seq_rows() -> list[dict]:
    return [json.loads(line) for line in SEQ2SEQ_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- recipe checks (no torch)

def test_task_keys_are_checked_together(tmp_path):
    path = task_recipe(tmp_path, tmp_path, {"labels": ["a"]},
                       data={"path": str(SEQ2SEQ_DATA), "packing": True, "columns": {"label": "y"}})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = "\n".join(e.value.problems)
    assert "model.labels: only read by model.task classification" in text
    assert "data.columns: 'label' is not a field of format auto" in text

    path = task_recipe(tmp_path, tmp_path, {"task": "seq2seq"}, data={"path": str(SEQ2SEQ_DATA), "packing": True})
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert any("data.packing: only for model.task causal_lm" in p for p in e.value.problems)

    ok = task_recipe(tmp_path, tmp_path, {"task": "classification", "labels": ["food", "sports", "weather"]},
                     data={"path": str(CLASSIFY_DATA), "columns": {"text": "sentence", "label": "topic"}})
    assert load_recipe(ok).model.labels == ["food", "sports", "weather"]


def test_task_registry_is_complete():
    """Every task a recipe may name has its loader class and peft task type."""
    from peft import TaskType

    import typing

    from lora_cli.recipe.schema import ModelConfig
    from lora_cli.tasks import TASKS

    assert set(typing.get_args(typing.get_type_hints(ModelConfig)["task"])) == set(TASKS)
    for task in TASKS.values():
        assert task.model_class() is not None and TaskType[task.peft_task_type]


def test_every_task_module_answers_the_hooks_by_their_declared_names():
    """Each task's implementation module (Task.impl) loads and its HOOKS is a TaskHooks: an
    abstract hook left out fails when the module builds HOOKS, and a hook under a name TaskHooks
    does not declare (a misspelling, which the run would never call) fails here."""
    from lora_cli.tasks import TASKS
    from lora_cli.tasks.hooks import TaskHooks, of

    declared = {n for n in vars(TaskHooks) if not n.startswith("_")}
    assert {"build_data", "make_collator", "eval_rows"} <= declared
    for name in TASKS:
        hooks = of(name)
        assert isinstance(hooks, TaskHooks)
        own = {n for cls in type(hooks).__mro__[:-1] if cls is not TaskHooks and issubclass(cls, TaskHooks)
               for n in vars(cls) if not n.startswith("_")}
        assert own and own <= declared, f"{name}: {sorted(own - declared)} are not hooks TaskHooks declares"


# --------------------------------------------------------------------------- bad input: exit 2

def test_task_the_model_cannot_do_exits_2(tiny_random, tmp_path, cli):
    res = cli("train", seq2seq_recipe(tmp_path, tiny_random), "--dry-run")
    assert res.code == 2, res
    assert "model.task: seq2seq cannot run on" in res.err and "encoder-decoder" in res.err
    assert "Traceback" not in res.err


def test_bad_labels_exit_2_naming_file_and_row(tiny_random, tmp_path, cli):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": "x"}, {"text": "c d", "label": "y"}])
    cases = {
        "unseen.jsonl": ([{"text": "e", "label": "x"}, {"text": "f", "label": "z"}], "row 2: label 'z' is not in the label set"),
        "missing.jsonl": ([{"text": "e"}], "row 1: no 'label'"),
        "range.jsonl": ([{"text": "e", "label": 5}], "row 1: label id 5 is out of range"),
    }
    for name, (rows, message) in cases.items():
        val = write_jsonl(tmp_path / name, rows)
        recipe = classify_recipe(tmp_path, tiny_random, data={"path": str(train), "val_path": str(val)})
        res = cli("train", recipe, "--dry-run")
        assert res.code == 2, res
        assert name in res.err and message in res.err, res.err
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- classification

@pytest.fixture(scope="module")
def decoder_classifier(tiny_base, tmp_path_factory):
    """A LoRA + score-head classifier on the pre-trained tiny Llama, trained through `lora train`
    on the bundled topic rows (a quarter held out)."""
    from lora_cli.cli import run

    tmp = tmp_path_factory.mktemp("decoder-cls")
    recipe = classify_recipe(tmp, tiny_base, lora={"target_modules": ["q_proj", "v_proj"], "r": 8, "alpha": 16},
                             train={"max_steps": 100, "learning_rate": 5e-3, "batch_size": 8,
                                    "lr_scheduler": "constant", "eval_steps": 50, "save_steps": 100})
    assert run(["train", str(recipe)]) == 0
    return recipe, tmp / "run"


def test_classifier_learns_held_out_rows_where_the_base_is_at_chance(decoder_classifier, cli):
    recipe, run_dir = decoder_classifier
    dry = cli("train", recipe, "--dry-run")
    assert dry.code == 0, dry
    assert "labels  0=food, 1=sports, 2=weather" in dry.out and "classes food" in dry.out
    before = _accuracy_line(dry.out)
    assert before <= 0.6  # three balanced classes: chance is a third
    assert "gold \\ predicted" in dry.out

    report = json.loads((run_dir / "eval_report.json").read_text())
    assert report["rows"] == 45 and report["accuracy"] >= 0.95 and report["macro_f1"] >= 0.95
    assert sum(map(sum, report["confusion"])) == 45
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in m and "eval_macro_f1" in m for m in metrics)
    saved = yaml.safe_load((run_dir / "lora_recipe.yaml").read_text())
    assert saved["model"]["labels"] == ["food", "sports", "weather"]  # read from the data, saved with the adapter
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]


def _accuracy_line(out: str) -> float:
    line = next(x for x in out.splitlines() if x.strip().startswith("accuracy "))
    return float(line.split()[1])


def test_predict_writes_label_and_probabilities(decoder_classifier, tmp_path, cli):
    _, run_dir = decoder_classifier
    rows = [{"text": "We spent the evening on the soup and rice.", "label": "food"},
            {"text": "Did you see the snow and the fog this morning?", "label": "weather"},
            {"text": "Tell me more about tennis and the coach."}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    res = cli("predict", "--adapter", run_dir, "--file", src, "--out", tmp_path / "preds.jsonl")
    assert res.code == 0, res
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["label"] for p in preds] == ["food", "weather", "sports"]
    for p in preds:
        assert set(p["probabilities"]) == {"food", "sports", "weather"}
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-4
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert preds[0]["gold"] == "food" and "gold" not in preds[2]
    again = cli("predict", "--adapter", run_dir, "--file", src, "--out", tmp_path / "preds.jsonl")
    assert again.code == 2 and "already exists" in again.err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "nope"}])
    res = cli("predict", "--adapter", run_dir, "--file", bad, "--out", tmp_path / "p2.jsonl")
    assert res.code == 2 and "bad.jsonl, row 1" in res.err and not (tmp_path / "p2.jsonl").exists()
    res = cli("generate", "--adapter", run_dir, "hello")
    assert res.code == 2 and "lora predict" in res.err
    (hinted,) = hinted_commands(res.err)  # the refusal's hint, followed
    followed = cli(*as_args(hinted, {"ROWS.jsonl": str(src), "preds.jsonl": str(tmp_path / "hinted.jsonl")}))
    assert followed.code == 0 and (tmp_path / "hinted.jsonl").is_file(), followed
    from lora_cli.errors import LoraError
    from lora_cli.infer.serve import build_server

    with pytest.raises(LoraError, match="lora serve: adapter .* model.task classification"):
        build_server({"cls": str(run_dir)})


def test_merged_classifier_equals_adapter_and_loads_in_plain_transformers(decoder_classifier, tmp_path, cli):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lora_cli.model.load import load_for_inference

    _, run_dir = decoder_classifier
    res = cli("merge", "--adapter", run_dir, "--out", tmp_path / "merged")
    assert res.code == 0, res
    model, tokenizer, _ = load_for_inference({"a": run_dir}, device="cpu")
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert merged.config.id2label == {0: "food", 1: "sports", 2: "weather"}
    batch = tokenizer(["the soup and rice", "a storm and the wind again"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bundled_classify_recipe_trains_bert(tiny_bert, tmp_path, cli):
    recipe = REPO / "recipes" / "classify.yaml"
    over = ["--set", f"model.name_or_path={tiny_bert}", "--set", f"output_dir={tmp_path / 'run'}"]
    res = cli("train", recipe, *over)
    assert res.code == 0, res
    assert "bert.encoder.layer.{0,1}.attention.self.{query,value}; trained in full: classifier" in res.out
    (hinted,) = hinted_commands(res.out)  # a classifier's run ends pointing at predict, not generate
    assert hinted.startswith("lora predict"), res.out
    assert f"--file {CLASSIFY_DATA} " in hinted  # the run's own rows: it runs as printed
    followed = cli(*as_args(hinted, {"preds.jsonl": str(tmp_path / "p.jsonl")}))
    assert followed.code == 0 and "rows labelled" in followed.out, followed
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert report["accuracy"] >= 0.8, report  # 0.911 when written; chance is 0.33
    res = cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged")
    assert res.code == 0, res
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.config.num_labels == 3


def test_imbalance_is_reported_in_the_dry_run(tiny_random, tmp_path, cli):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(20)] + [{"text": "bad", "label": "neg"}] * 3
    recipe = classify_recipe(tmp_path, tiny_random, data={"path": str(write_jsonl(tmp_path / "d.jsonl", rows))})
    res = cli("train", recipe, "--dry-run")
    assert res.code == 0, res
    assert "classes neg 3 (13%), pos 20 (87%)" in res.out and "imbalanced" in res.out and "ratio 6.7" in res.out
    check = cli("check", recipe)
    assert "data.val_fraction" in check.out  # lint: no held-out rows for the classifier


# --------------------------------------------------------------------------- seq2seq

def test_bundled_seq2seq_recipe_learns_its_targets_where_the_base_does_not(tiny_t5, tmp_path, cli):
    import torch

    from lora_cli.infer.engines import TransformersBackend
    from lora_cli.infer.generate import BASE, Prompt, generate_rows
    from lora_cli.infer.settings import GenerationSettings

    run_dir = tmp_path / "run"
    res = cli("train", REPO / "recipes" / "seq2seq.yaml", "--set", f"model.name_or_path={tiny_t5}",
              "--set", f"output_dir={run_dir}")
    assert res.code == 0, res
    assert "encoder input:     '<s>Human: What is the capital of" in res.out
    rows = seq2seq_rows()
    backend, infos = TransformersBackend.load({"s2s": run_dir}, device="cpu")
    model, tokenizer = backend.model, backend.tokenizer
    prompts = [Prompt(r["source"]) for r in rows]
    out = generate_rows(backend, prompts, {"s2s": ("s2s", infos["s2s"].template),
                                           BASE: (None, infos["s2s"].template)},
                        GenerationSettings(max_new_tokens=24), batch_size=8)
    adapted = [r["response"] for r in out if r["adapter"] == "s2s"]
    base = [r["response"] for r in out if r["adapter"] == BASE]
    targets = [r["target"] for r in rows]
    assert sum(a == t for a, t in zip(adapted, targets)) >= len(rows) - 1, list(zip(adapted, targets))
    assert sum(b == t for b, t in zip(base, targets)) == 0

    # the CLI path (generate), and chat through the same template path
    res = cli("generate", "--adapter", run_dir, rows[0]["source"], "--max-new-tokens", "24")
    assert res.code == 0 and res.out.strip() == rows[0]["target"], res
    from lora_cli.infer.generate import ChatSession

    session = ChatSession(backend, {"s2s": infos["s2s"].template}, GenerationSettings(max_new_tokens=24), adapter="s2s")
    assert session.ask(rows[1]["source"]) == rows[1]["target"]

    # merged equals unmerged (B is non-zero after training)
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    res = cli("merge", "--adapter", run_dir, "--out", tmp_path / "merged")
    assert res.code == 0, res
    from transformers import AutoModelForSeq2SeqLM

    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tokenizer("What is the capital of Peru?")["input_ids"]])
    labels = torch.tensor([tokenizer("The capital", add_special_tokens=False)["input_ids"]])
    model.set_adapter("s2s")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, labels=labels).logits,
                                   model(input_ids=ids, labels=labels).logits, rtol=1e-4, atol=1e-4)


def test_bart_shape_trains_generates_and_merges(tiny_bart, tmp_path, cli):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from lora_cli.model.load import load_for_inference

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": r["source"], "input": "", "output": r["target"]}
                                                     for r in seq2seq_rows()[:8]])
    recipe = seq2seq_recipe(tmp_path, tiny_bart, data={"path": str(alpaca), "max_length": 64},
                            lora={"target_modules": "attention-qv", "init": "kaiming"},
                            train={"max_steps": 3, "learning_rate": 1e-2})
    res = cli("train", recipe)
    assert res.code == 0, res
    assert "12 modules: model.encoder.layers.{0,1}.self_attn." in res.out and "encoder_attn.{v_proj,q_proj}" in res.out
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    res = cli("generate", "--adapter", tmp_path / "run", "What is the capital of Peru?", "--max-new-tokens", "5")
    assert res.code == 0, res
    assert cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged").code == 0
    model, tokenizer, _ = load_for_inference({"a": tmp_path / "run"}, device="cpu")
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([tokenizer("What is the capital of Peru?")["input_ids"]])
    labels = torch.tensor([tokenizer("The capital", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids, labels=labels).logits,
                                   model(input_ids=ids, labels=labels).logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- presets, estimate, lint

@pytest.mark.parametrize("kind,qv", [("tiny_bert", ["query", "value"]), ("tiny_t5", ["q", "v"]),
                                      ("tiny_bart", ["q_proj", "v_proj"])])
def test_presets_estimate_and_peft_agree_per_model_kind(kind, qv, request, tmp_path):
    """attention-qv names each kind's own query/value layers; the estimate's trainable count
    (head included) equals the peft model `lora train` builds."""
    from lora_cli.model.adapters import add_adapter
    from lora_cli.train.estimate import estimate_recipe
    from lora_cli.model.load import load_base_model
    from lora_cli.model.targets import resolve_target_modules
    from lora_cli.tasks.hooks import prepare_recipe

    base = request.getfixturevalue(kind)
    make = classify_recipe if kind == "tiny_bert" else seq2seq_recipe
    recipe = load_recipe(make(tmp_path, base))
    prepare_recipe(recipe)
    model = load_base_model(recipe.model, device="cpu")
    assert sorted(resolve_target_modules(model, "attention-qv")) == qv
    real = add_adapter(model, recipe)
    est = estimate_recipe(load_recipe(make(tmp_path, base)))
    assert (est.params.trainable, est.params.total) == real.get_nb_trainable_parameters()


def test_lint_names_the_model_kinds_attention_layers(tiny_bert, tmp_path, cli):
    recipe = classify_recipe(tmp_path, tiny_bert, lora={"target_modules": ["q_proj", "v_proj"]})
    res = cli("check", recipe)
    assert "lora.target_modules: ['q_proj', 'v_proj'] on a bert model" in res.out
    assert "attention-qv (here: query, value)" in res.out


def test_sweep_trains_a_classifier_and_reuses_it(tiny_bert, tmp_path, cli):
    recipe = classify_recipe(tmp_path, tiny_bert, train={"max_steps": 2, "batch_size": 4})
    res = cli("sweep", recipe, "--ranks", "2,4")
    assert res.code == 0, res
    for rank in (2, 4):
        config = json.loads((tmp_path / "run" / f"r{rank}" / "adapter_config.json").read_text())
        assert config["r"] == rank and config["task_type"] == "SEQ_CLS"
    again = cli("sweep", recipe, "--ranks", "2,4")
    assert again.code == 0, again  # the finished ranks are reused, not refused as changed
    assert again.out.count("reused") == 2, again.out
