"""`lora eval` on seq2seq (encoder-decoder) candidates: the bundled seq2seq recipe trained on a
tiny T5, then its base, the adapter and the merged folder asked the same source/target rows
through the paths a causal LM takes (generation metrics; loss on the supervised target tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, SEQ2SEQ_DATA, classify_recipe, seq2seq_recipe, write_jsonl
from preference_helpers import preference_recipe

RESAMPLES = 200


def _rows() -> list[dict]:
    return [json.loads(line) for line in SEQ2SEQ_DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tiny_t5, tmp_path_factory) -> Path:
    from lora_cli.cli import run

    run_dir = tmp_path_factory.mktemp("s2s") / "run"
    assert run(["train", str(REPO / "recipes" / "seq2seq.yaml"), "--set", f"model.name_or_path={tiny_t5}",
                "--set", f"output_dir={run_dir}"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory) -> Path:
    from lora_cli.export.merge import merge_adapter

    return merge_adapter(trained, tmp_path_factory.mktemp("s2s-merged") / "merged", log=lambda *_: None)


@pytest.fixture(scope="module")
def evaluated(trained, merged, tmp_path_factory):
    from lora_cli.cli import run

    out = tmp_path_factory.mktemp("s2s-eval") / "out"
    code = run(["eval", "--data", str(SEQ2SEQ_DATA), "--base", "-a", f"s2s={trained}", "--merged", str(merged),
                "--metrics", "loss,exact_match,rouge_l,chrf", "--max-new-tokens", "24", "--baseline", "s2s",
                "--bootstrap", str(RESAMPLES), "--out", str(out)])
    assert code == 0
    record = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    return out, record, {c["name"]: c["metrics"] for c in record["candidates"]}


@pytest.mark.slow
def test_seq2seq_adapter_beats_its_base_and_merged_scores_as_the_adapter(evaluated):
    out, record, by_name = evaluated
    assert [c["kind"] for c in record["candidates"]] == ["base", "adapter", "merged"]
    assert record["settings"]["rows"] == len(_rows()) and record["settings"]["task"] == "seq2seq"
    adapter, base, merged = by_name["s2s"], by_name["base"], by_name["merged"]
    for metric in ("exact_match", "rouge_l", "chrf"):
        assert adapter[metric]["value"] > base[metric]["value"], metric
        assert base[metric]["diff"]["high"] < 0, (metric, base[metric])  # the base is worse, interval past zero
        assert merged[metric]["value"] == pytest.approx(adapter[metric]["value"]), metric
        assert merged[metric]["diff"]["low"] <= 0 <= merged[metric]["diff"]["high"], metric
    assert adapter["exact_match"]["value"] >= (len(_rows()) - 1) / len(_rows())
    assert base["loss"]["diff"]["low"] > 0  # the base's loss on the targets is higher
    assert merged["loss"]["value"] == pytest.approx(adapter["loss"]["value"], rel=1e-4)
    answers = [json.loads(x) for x in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    first = next(a for a in answers if a["candidate"] == "s2s")
    assert first["reference"] == _rows()[0]["target"] and first["answer"] == first["reference"]
    assert first["prompt"].startswith("<s>Human: " + _rows()[0]["source"])  # the template's prompt, as trained


@pytest.mark.slow
def test_seq2seq_loss_is_the_models_own_loss_on_the_target_tokens(trained, evaluated):
    """eval's loss = transformers' cross-entropy of the decoder on target + EOS, the encoder
    reading the prompt the template renders (what seq2seq training scores), token-weighted."""
    import torch

    from lora_cli.model.load import load_for_inference
    from lora_cli.data.template import prompt_ids, tokenize_texts

    _, _, by_name = evaluated
    model, tokenizer, infos = load_for_inference({"s2s": trained}, device="cpu")
    template = infos["s2s"].template
    total, tokens = 0.0, 0
    for row in _rows():
        source = prompt_ids(tokenizer, template, [{"role": "user", "content": row["source"], "input": ""}])
        target = tokenize_texts(tokenizer, [row["target"]])[0] + [tokenizer.eos_token_id]
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).loss
        total += float(loss) * len(target)
        tokens += len(target)
    assert by_name["s2s"]["loss"]["value"] == pytest.approx(total / tokens, rel=1e-4)


@pytest.mark.slow
def test_seq2seq_alpaca_rows_merged_alone_and_gguf_refused(trained, merged, tmp_path, cli):
    rows = _rows()[:4]
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": r["source"], "input": "", "output": r["target"]}
                                                     for r in rows])
    out = tmp_path / "out"
    result = cli("eval", "--data", alpaca, "-a", f"s2s={trained}", "--metrics", "exact_match,loss",
                 "--max-new-tokens", "24", "--bootstrap", "20", "--out", out)
    assert result.code == 0, result
    scores = json.loads((out / "eval.json").read_text(encoding="utf-8"))["candidates"][0]["metrics"]
    assert scores["exact_match"]["value"] >= 0.75 and scores["loss"]["value"] > 0
    # a merged seq2seq folder with no adapter beside it is loaded as the encoder-decoder it is
    result = cli("eval", "--data", SEQ2SEQ_DATA, "--merged", merged, "--metrics", "exact_match", "--limit", "4",
                 "--max-new-tokens", "24", "--bootstrap", "20")
    assert result.code == 0, result
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 60)
    result = cli("eval", "--data", SEQ2SEQ_DATA, "-a", trained, "--gguf", fake, "--limit", "2", "--metrics", "exact_match")
    assert result.code == 2 and "encoder-decoder" in result.err and "--gguf" in result.err, result
    missing = write_jsonl(tmp_path / "bad.jsonl", [{"source": "What is the capital of Peru?", "target": ""}])
    result = cli("eval", "--data", missing, "-a", trained, "--metrics", "exact_match")
    assert result.code == 2 and "bad.jsonl, row 1" in result.err and "'target'" in result.err, result


@pytest.mark.slow
def test_train_scores_eval_metrics_on_a_seq2seq_validation_split(tiny_t5, tmp_path):
    """eval.metrics at the end of a seq2seq run (it was skipped without a word before)."""

    from lora_cli.recipe.schema import load_recipe
    from lora_cli.train.run import run_training

    recipe = seq2seq_recipe(tmp_path, tiny_t5, data={"path": str(SEQ2SEQ_DATA), "max_length": 64, "val_fraction": 0.25},
                            eval={"metrics": ["loss", "rouge_l", "exact_match"], "max_new_tokens": 8,
                                  "bootstrap_resamples": 20})
    result = run_training(load_recipe(recipe))
    assert set(result.eval_metrics) == {"loss", "rouge_l", "exact_match"}
    assert result.eval_metrics["loss"]["value"] > 0
    last = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval_rouge_l"] == result.eval_metrics["rouge_l"]["value"] and "eval_loss_interval" in last


def test_eval_metrics_refused_where_the_end_of_run_eval_cannot_score(tiny_random, tmp_path, cli):
    """A classifier (no generated answers) and a preference objective (no SFT rows) said so at
    check time, not after training."""

    dpo = preference_recipe(tmp_path / "dpo", tiny_random, "dpo")
    result = cli("check", dpo, "--set", "eval.metrics=[rouge_l]", "--set", "data.val_fraction=0.25")
    assert result.code == 2 and "eval.metrics: scores answers to SFT validation rows" in result.err, result
    classifier = classify_recipe(tmp_path / "cls", tiny_random)
    result = cli("check", classifier, "--set", "eval.metrics=[rouge_l]")
    assert result.code == 2 and "eval.metrics: generation metrics are for causal_lm and seq2seq" in result.err, result
