"""`--json` of `lora data preview`, `lora predict` and `lora analyze` (layouts in docs/cli.md):
each document parsed and its values checked against the data, the --out file or the weights
they describe, not only its keys."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml
from conftest import CLASSIFY_DATA, demo_rows, make_recipe, write_jsonl
from inference_helpers import random_adapter


def _doc(res, kind: str) -> dict:
    assert res.code == 0, res
    doc = json.loads(res.out)  # stdout is the one document and nothing else
    assert doc["lora_json"] == 1 and doc["kind"] == kind
    return doc


def test_data_preview_json_shows_the_rows_as_trained(tiny_random, tmp_path, cli):
    rows = demo_rows(16)
    recipe = make_recipe(tmp_path, tiny_random, write_jsonl(tmp_path / "rows.jsonl", rows))
    doc = _doc(cli("data", "preview", recipe, "--rows", "2", "--json"), "data_preview")
    assert doc["rows"] == {"read": 16, "kept": 16, "truncated": {}, "dropped": {}}
    assert doc["data"]["max_length"] == 128 and doc["data"]["template"] == "human_assistant"
    assert len(doc["examples"]) == 2
    for row, example in zip(rows, doc["examples"]):
        masked = "".join(s["text"] for s in example["segments"] if not s["supervised"])
        supervised = "".join(s["text"] for s in example["segments"] if s["supervised"])
        assert row["instruction"] in masked and row["output"] not in masked
        whole = "".join(s["text"] for s in example["segments"])  # in order: the prompt, then the answer
        assert whole.index(row["instruction"]) < whole.index(row["output"])
        assert supervised.startswith(row["output"])  # the answer (and its EOS) is what is learned
        assert 0 < example["supervised_tokens"] < example["tokens"] <= 128
    assert sum(b["sequences"] for b in doc["lengths"]["histogram"]) == 16
    assert doc["lengths"]["max"] <= 128 and doc["packing"] is None and doc["eval_examples"] is None
    # the same counts the text preview prints
    text = cli("data", "preview", recipe, "--rows", "0")
    supervised, total = map(int, re.search(r"supervised (\d+)/(\d+) tokens", text.out).groups())
    assert doc["tokens"] == {"supervised": supervised, "total": total}


def test_data_preview_json_of_a_preference_recipe(tiny_random, tmp_path, cli):
    pairs = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"not {w}"} for w in ("yes", "no", "maybe")]
    recipe = make_recipe(tmp_path, tiny_random, write_jsonl(tmp_path / "pairs.jsonl", pairs),
                         train={"objective": "dpo"})
    doc = _doc(cli("data", "preview", recipe, "--json"), "data_preview")
    assert doc["data"]["objective"] == "dpo" and doc["rows"]["kept"] == 3 and doc["lengths"] is None
    for pair, example in zip(pairs, doc["examples"]):
        assert pair["prompt"] in example["prompt"]
        assert example["chosen"].startswith(pair["chosen"]) and example["rejected"].startswith(pair["rejected"])


@pytest.fixture(scope="module")
def classifier(tiny_random, tmp_path_factory):
    """A few steps of `lora train` of a classification adapter: the JSON is checked against its
    own --out file, so how well it learned does not matter."""
    from lora_cli.cli import run

    tmp = tmp_path_factory.mktemp("classifier")
    recipe = make_recipe(tmp, tiny_random, CLASSIFY_DATA)
    raw = yaml.safe_load(recipe.read_text())
    raw["model"]["task"] = "classification"
    raw["data"] = {"path": str(CLASSIFY_DATA), "max_length": 64}
    recipe.write_text(yaml.safe_dump(raw))
    assert run(["train", str(recipe)]) == 0
    return tmp / "run"


def test_predict_json_summarises_what_out_holds(classifier, tmp_path, cli):
    rows = [json.loads(line) for line in CLASSIFY_DATA.read_text(encoding="utf-8").splitlines()[:9]]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    res = cli("predict", "--adapter", classifier, "--file", src, "--out", tmp_path / "preds.jsonl", "--json")
    doc = _doc(res, "predict")
    assert "labelling: 9/9 rows (100%)" in res.err  # progress leaves stdout to the document
    preds = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert doc["rows"] == 9 and doc["labels"] == ["food", "sports", "weather"]
    assert doc["predicted"] == {name: Counter(p["label"] for p in preds)[name] for name in doc["labels"]}
    report = doc["report"]
    assert report["rows"] == 9 and sum(map(sum, report["confusion"])) == 9
    assert report["accuracy"] == pytest.approx(sum(p["label"] == p["gold"] for p in preds) / 9)
    gold = Counter(p["gold"] for p in preds)
    assert [sum(row) for row in report["confusion"]] == [gold[n] for n in doc["labels"]]
    unlabelled = write_jsonl(tmp_path / "bare.jsonl", [{"text": r["text"]} for r in rows[:2]])
    bare = _doc(cli("predict", "-a", classifier, "-f", unlabelled, "-o", tmp_path / "p2.jsonl", "--json"), "predict")
    assert bare["report"] is None and bare["rows"] == 2 and sum(bare["predicted"].values()) == 2
    quiet = cli("-q", "predict", "-a", classifier, "-f", unlabelled, "-o", tmp_path / "p3.jsonl", "--json")
    assert _doc(quiet, "predict")["rows"] == 2 and "labelling" not in quiet.err  # --quiet: no progress anywhere
    # --quiet without --json: no progress or status line, but the report (accuracy, confusion) stays
    quiet = cli("-q", "predict", "-a", classifier, "-f", src, "-o", tmp_path / "p4.jsonl")
    assert quiet.code == 0 and quiet.err == "", quiet
    assert quiet.out.splitlines()[0] == f"  accuracy {report['accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  (9 rows)"
    assert len(quiet.out.splitlines()) == 2 + len(doc["labels"]), quiet  # the confusion matrix, one line a label


def test_analyze_json_holds_each_modules_spectrum(tiny_random, tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=3, target_modules=["q_proj", "v_proj"])
    doc = _doc(cli("analyze", adapter, "--json"), "analyze")
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    base = load_file(str(tiny_random / "model.safetensors"))
    assert len(doc["modules"]) == len(weights) // 2  # one A and one B per module
    for m in doc["modules"]:
        a = weights[f"base_model.model.{m['name']}.lora_A.weight"].double()
        b = weights[f"base_model.model.{m['name']}.lora_B.weight"].double()
        expected = torch.linalg.svdvals(2.0 * b @ a)[:4]  # alpha 8 / r 4
        assert m["r"] == 4 and m["scaling"] == 2.0
        assert m["singular_values"] == pytest.approx(expected.tolist(), rel=1e-6)
        assert m["update_norm"] == pytest.approx(float(torch.linalg.matrix_norm(2.0 * b @ a)), rel=1e-6)
        w = base[f"{m['name']}.weight"].double()
        assert m["weight_norm"] == pytest.approx(float(torch.linalg.matrix_norm(w)), rel=1e-5)
        assert m["relative_norm"] == pytest.approx(m["update_norm"] / m["weight_norm"])
        assert 1 <= m["rank90"] <= m["rank99"] <= 4
    text = cli("analyze", adapter)
    assert doc["summary"] in text.out.replace("\n", " ") and doc["verdict"] in ("over", "under", "about right")
    no_base = _doc(cli("analyze", adapter, "--no-base", "--json"), "analyze")
    assert all(m["weight_norm"] is None and m["relative_norm"] is None for m in no_base["modules"])
