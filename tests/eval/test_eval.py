"""`lora eval`: the same demo rows asked of the base, a trained adapter, an adapter trained on
shuffled answers, the merged folder, f32 and q8_0 GGUF files and `lora serve`'s endpoint, in one
run with the trained adapter as the baseline. The adapter beats the base and the shuffled one
with intervals excluding zero; merged, f32 GGUF and the endpoint score as the adapter does.
Then the refusals (exit 2, named) and `eval.metrics` at the end of `lora train`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import classify_recipe, demo_rows, make_recipe, train_learned_adapter, write_jsonl

ROWS = 12          # demo rows trained on and asked (a few dozen tokens each)
NEW_TOKENS = 64    # room for a whole learned answer, so exact match can hold
RESAMPLES = 300
GENERATION = ("exact_match", "contains", "rouge_l", "bleu", "chrf")


def _train(tiny_base: Path, work: Path, rows: list[dict]) -> Path:
    return train_learned_adapter(tiny_base, work, rows)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return demo_rows(ROWS)


@pytest.fixture(scope="module")
def data(rows, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("eval-data") / "rows.jsonl", rows)


@pytest.fixture(scope="module")
def trained(tiny_base, rows, tmp_path_factory) -> Path:
    return _train(tiny_base, tmp_path_factory.mktemp("trained"), rows)


@pytest.fixture(scope="module")
def shuffled(tiny_base, rows, tmp_path_factory) -> Path:
    """The same questions, each paired with another row's answer: a deliberately broken adapter."""
    answers = [r["output"] for r in rows]
    random.Random(0).shuffle(answers)
    broken = [{**r, "output": a} for r, a in zip(rows, answers[1:] + answers[:1])]
    return _train(tiny_base, tmp_path_factory.mktemp("shuffled"), broken)


@pytest.fixture(scope="module")
def shipped(trained, tmp_path_factory) -> dict[str, Path]:
    """What ships from the trained adapter: the merged folder and GGUF files."""
    from lora_cli.export.gguf import export
    from lora_cli.export.merge import merge_adapter

    root = tmp_path_factory.mktemp("shipped")
    quiet = lambda *_: None  # noqa: E731
    return {"merged": merge_adapter(trained, root / "merged", log=quiet),
            "f32": export(trained, root / "f32.gguf", format="gguf", dtype="f32", log=quiet),
            "q8_0": export(trained, root / "q8_0.gguf", format="gguf", dtype="q8_0", log=quiet)}


@pytest.fixture(scope="module")
def endpoint(trained):
    from lora_cli.infer.serve import ServerThread, build_server

    server = build_server({"trained": trained})
    with ServerThread(server) as running:
        yield running.url
    server.scheduler.close()


@pytest.fixture(scope="module")
def everything(trained, shuffled, shipped, endpoint, data, tmp_path_factory):
    """One `lora eval` over every kind of candidate, differences taken to the trained adapter."""
    from lora_cli.cli import run

    out = tmp_path_factory.mktemp("eval") / "out"
    code = run(["eval", "--data", str(data), "--base", "-a", f"trained={trained}", "-a", f"shuffled={shuffled}",
                "--merged", str(shipped["merged"]), "--gguf", str(shipped["f32"]), "--gguf", str(shipped["q8_0"]),
                "--endpoint", endpoint, "--endpoint-model", "trained", "--baseline", "trained",
                "--max-new-tokens", str(NEW_TOKENS), "--bootstrap", str(RESAMPLES), "--out", str(out)])
    assert code == 0
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    return out, record, {c["name"]: c for c in record["candidates"]}


def _worse(entry: dict, higher_is_better: bool) -> bool:
    """The difference to the baseline is against the candidate, its whole interval past zero."""
    diff = entry["diff"]
    return diff["high"] < 0 if higher_is_better else diff["low"] > 0


def test_layout_answers_and_plot(everything):
    out, record, by_name = everything
    assert [c["kind"] for c in record["candidates"]] == ["base", "adapter", "adapter", "merged", "gguf", "gguf", "endpoint"]
    assert record["baseline"] == "trained" and record["settings"]["rows"] == ROWS
    for c in record["candidates"]:
        assert c["fingerprint"]["source"]
        for entry in c["metrics"].values():
            assert entry["low"] <= entry["value"] <= entry["high"], (c["name"], entry)
    assert "sha256" in by_name["f32"]["fingerprint"] and "model" in by_name["endpoint"]["fingerprint"]
    assert "loss" not in by_name["endpoint"]["metrics"]  # no logits from an HTTP endpoint
    lines = (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == ROWS * len(record["candidates"])
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_trained_adapter_beats_base_and_shuffled_on_every_metric(everything):
    _, record, by_name = everything
    for metric, about in record["metrics"].items():
        for loser in ("base", "shuffled"):
            assert _worse(by_name[loser]["metrics"][metric], about["higher_is_better"]), (loser, metric,
                                                                                          by_name[loser]["metrics"][metric])


def test_merged_f32_gguf_and_endpoint_score_as_the_adapter(everything):
    _, record, by_name = everything
    adapter = by_name["trained"]["metrics"]
    for name in ("merged", "f32", "endpoint"):
        for metric, entry in by_name[name]["metrics"].items():
            assert adapter[metric]["low"] <= entry["value"] <= adapter[metric]["high"], (name, metric)
            # the interval holds 0, up to float rounding: a merged model's loss can differ from the
            # adapter's in the ninth decimal on every row alike (seen with one torch thread per worker)
            assert entry["diff"]["low"] <= 1e-6 and entry["diff"]["high"] >= -1e-6, (name, metric, entry["diff"])
    assert by_name["merged"]["metrics"]["loss"]["value"] == pytest.approx(adapter["loss"]["value"], rel=1e-3)
    assert by_name["f32"]["metrics"]["loss"]["value"] == pytest.approx(adapter["loss"]["value"], rel=1e-3)


def test_q8_0_difference_is_reported(everything):
    _, _, by_name = everything
    for entry in by_name["q8_0"]["metrics"].values():
        assert set(entry["diff"]) == {"value", "low", "high"}


def test_q8_0_gguf_alone_scores_whole_prompts(trained, shipped, data, tmp_path):
    """A q8_0 file decoding a many-token prompt in one batch segfaulted inside llama.cpp (its
    repacked / AMX quantized CPU kernels, on this tiny model's shapes); one GGUF, no other candidate."""
    from lora_cli.cli import run

    out = tmp_path / "out"
    assert run(["eval", "--data", str(data), "-a", f"trained={trained}", "--gguf", str(shipped["q8_0"]),
                "--metrics", "loss,exact_match", "--max-new-tokens", "8", "--bootstrap", "10", "--out", str(out)]) == 0
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert [c["kind"] for c in record["candidates"]] == ["adapter", "gguf"]
    assert record["candidates"][1]["metrics"]["loss"]["value"] > 0


# --------------------------------------------------------------------------- refusals

def test_candidates_that_are_not_what_their_flag_says(trained, shipped, data, cli, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf")
    cases = [(["--merged", str(trained)], "pass it with --adapter"),
             (["-a", str(shipped["merged"])], "pass it with --merged"),
             (["--gguf", str(not_gguf)], "not a GGUF file"),
             (["--gguf", str(trained)], "not a GGUF file"),
             (["--merged", str(shipped["f32"])], "pass it with --gguf")]
    for flags, said in cases:
        result = cli("eval", "--data", data, "-a", trained, *flags) if "-a" not in flags else cli("eval", "--data", data, *flags)
        assert result.code == 2 and said in result.err, (flags, result)


def test_gguf_and_endpoint_whose_template_disagrees_are_refused(trained, shipped, endpoint, data, cli):
    gguf = cli("eval", "--data", data, "-a", trained, "--gguf", shipped["f32"], "--template", "alpaca", "--limit", "2",
               "--metrics", "exact_match")
    assert gguf.code == 2 and "chat template" in gguf.err and "--gguf" in gguf.err, gguf
    served = cli("eval", "--data", data, "--endpoint", endpoint, "--endpoint-model", "trained", "-a", trained,
                 "--template", "alpaca", "--limit", "2", "--max-new-tokens", "4", "--metrics", "exact_match")
    assert served.code == 2 and "prompt tokens" in served.err and "lora serve --adapter" in served.err, served


def test_unknown_metric_rows_without_reference_and_unknown_baseline(trained, data, cli, tmp_path):
    result = cli("eval", "--data", data, "-a", trained, "--metrics", "rouge_x")
    assert result.code == 2 and "unknown metric 'rouge_x'" in result.err and "rouge_l" in result.err
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    result = cli("eval", "--data", no_answer, "-a", trained, "--metrics", "rouge_l")
    assert result.code == 2 and "q.jsonl, row 1: no reference answer" in result.err
    result = cli("eval", "--data", data, "-a", trained, "--baseline", "nope", "--limit", "1", "--metrics", "loss")
    assert result.code == 2 and "--baseline 'nope'" in result.err


def test_user_metric_and_limit(trained, data, cli, tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text("def length_ratio(answer, reference):\n"
                                            "    return len(answer) / max(1, len(reference))\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    result = cli("eval", "--data", data, "-a", trained, "--metrics", "my_metrics:length_ratio,exact_match",
                 "--limit", "3", "--bootstrap", "50", "--out", out)
    assert result.code == 0, result
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    assert record["settings"]["rows"] == 3
    assert record["candidates"][0]["metrics"]["my_metrics:length_ratio"]["value"] > 0
    assert "my_metrics:length_ratio" in result.out
    again = cli("eval", "--data", data, "-a", trained, "--metrics", "exact_match", "--limit", "1", "--out", out)
    assert again.code == 2 and "--force" in again.err


# --------------------------------------------------------------------------- at the end of training

def test_train_runs_eval_metrics_on_the_validation_split(tiny_base, tmp_path):
    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import run_training

    data = write_jsonl(tmp_path / "data.jsonl", demo_rows(16))
    recipe = make_recipe(tmp_path, tiny_base, data,
                         eval={"metrics": ["rouge_l", "exact_match"], "max_new_tokens": 8, "bootstrap_resamples": 50})
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"]["val_fraction"] = 0.25
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    result = run_training(load_recipe(recipe))
    assert set(result.eval_metrics) == {"rouge_l", "exact_match"}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert "eval_rouge_l" in last and "eval_exact_match_interval" in last
    assert last["eval_rouge_l"] == result.eval_metrics["rouge_l"]["value"]


def test_recipe_refuses_an_unknown_eval_metric(tiny_base, tmp_path, cli):
    recipe = make_recipe(tmp_path, tiny_base, eval={"metrics": ["rouge"]})
    result = cli("check", recipe)
    assert result.code == 2 and "eval.metrics: unknown metric 'rouge'" in result.err


# --------------------------------------------------------------------------- classification adapters

def test_classification_adapter_scores_as_lora_predict_reports(tiny_bert, tmp_path, cli):
    from conftest import CLASSIFY_DATA

    recipe = classify_recipe(tmp_path, tiny_bert, train={"max_steps": 4, "batch_size": 8})
    assert cli("train", recipe).code == 0
    rows = write_jsonl(tmp_path / "rows.jsonl", [json.loads(line) for line in
                                                 CLASSIFY_DATA.read_text(encoding="utf-8").splitlines()[:20]])
    out = tmp_path / "eval"
    result = cli("eval", "--data", rows, "-a", f"cls={tmp_path / 'run'}", "--bootstrap", "50", "--out", out)
    assert result.code == 0, result
    scores = json.loads((out / "eval.json").read_text(encoding="utf-8"))["candidates"][0]["metrics"]
    assert set(scores) == {"accuracy", "macro_f1"}
    predicted = cli("predict", "-a", tmp_path / "run", "--file", rows, "--out", tmp_path / "p.jsonl")
    assert predicted.code == 0
    assert f"accuracy {scores['accuracy']['value']:.3f}  macro-F1 {scores['macro_f1']['value']:.3f}" in predicted.out
    refused = cli("eval", "--data", rows, "-a", tmp_path / "run", "--base")
    assert refused.code == 2 and "classification adapters are compared with each other" in refused.err


def test_a_long_candidate_name_wraps_at_80_columns_and_is_never_cut():
    """An endpoint's name (its URL and model) is wider than the candidate column leaves room for
    at 80 columns: it wraps over lines, each character kept, instead of ending in "…"."""
    from rich.console import Console

    from lora_cli.eval.run import print_table

    scored = {"value": 0.5, "low": 0.4, "high": 0.6, "diff": {"value": 0.1, "low": -0.02, "high": 0.2}}
    names = ["base", "demo-adapter", "http://127.0.0.1:8000/v1 trained-adapter-name"]
    record = {"settings": {"rows": 24, "data": "data/demo.jsonl"}, "baseline": "demo-adapter",
              "metrics": {m: {"higher_is_better": True} for m in ("exact_match", "rougeL", "chrf")},
              "candidates": [{"name": n, "kind": "x", "metrics": {m: scored for m in ("exact_match", "rougeL", "chrf")}}
                             for n in names]}
    for terminal in (True, False):
        console = Console(width=80, force_terminal=terminal, color_system=None, record=True)
        print_table(record, console)
        text = console.export_text()
        assert "…" not in text and max(map(len, text.splitlines())) <= 80
        first_column = "".join(line.strip("│|┃ ").split("│")[0].split("|")[0].strip()
                               for line in text.splitlines() if line.startswith(("│", "|", "┃")))
        assert all(name.replace(" ", "") in first_column.replace(" ", "") for name in names), first_column
