"""The metric registry and the bootstrap, without a model: known answers give known scores, and
an interval excludes zero only when the difference is real."""

from __future__ import annotations

import pytest

from lora_cli.eval.run import score
from lora_cli.eval.metrics import METRICS, Answer, resolve_metrics


def test_every_metric_declares_what_it_needs_and_scores_a_perfect_answer():
    perfect = [Answer(reference="LoRA冻结预训练权重。", text="LoRA冻结预训练权重。", nll=0.0, tokens=3,
                      label="food", predicted="food")] * 3
    for metric in METRICS.values():
        assert metric.needs in ("logits", "text", "labels") and metric.doc
        value = metric.total([metric.row(a) for a in perfect])
        assert value == pytest.approx(1.0 if metric.higher_is_better else (1.0 if metric.name == "perplexity" else 0.0))


def test_chinese_answers_are_scored_by_character():
    rouge = METRICS["rouge_l"]
    half = rouge.row(Answer(reference="冻结权重训练矩阵", text="冻结权重"))
    assert 0.5 < half < 1  # rouge-score's own tokenizer would see no tokens at all here
    assert METRICS["bleu"].total([("冻结 权重 训练 低秩 矩阵", "冻结权重训练低秩矩阵")]) > 0.9


def test_bootstrap_difference_excludes_zero_only_for_a_real_change():
    refs = [f"answer {i}" for i in range(40)]
    good = [Answer(reference=r, text=r) for r in refs]
    bad = [Answer(reference=r, text="something else") for r in refs]
    noisy = [Answer(reference=r, text=r if i % 2 else "x") for i, r in enumerate(refs)]
    noisy2 = [Answer(reference=r, text=r if i % 2 == 0 else "x") for i, r in enumerate(refs)]
    metrics = resolve_metrics(["exact_match"])
    both = {"text"}
    out = score({"good": good, "bad": bad, "a": noisy, "b": noisy2}, metrics,
                {n: both for n in ("good", "bad", "a", "b")}, "good", 200, 0)
    assert out["bad"]["exact_match"]["diff"]["high"] < 0
    assert out["good"]["exact_match"]["diff"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    half = score({"a": noisy, "b": noisy2}, metrics, {"a": both, "b": both}, "a", 200, 0)
    assert half["b"]["exact_match"]["diff"]["low"] < 0 < half["b"]["exact_match"]["diff"]["high"]
