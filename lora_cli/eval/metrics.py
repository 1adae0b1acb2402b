"""The evaluation metrics: one registry (METRICS) that `lora eval` and `lora train`'s end-of-run
evaluation both read. A metric is added here, in one entry, and nowhere else.

A metric is split in two so that a bootstrap over rows can recompute it on any resample:
`row` turns one answered row into a statistic, `total` turns a list of statistics into the
number. A mean metric's statistic is its per-row score; loss keeps (nll, tokens) so a resample
is token-weighted like the full set; BLEU and chrF keep (answer, reference) and call sacrebleu
on the resample, as a corpus score must be computed. Scoring is the field's libraries
(sacrebleu, rouge-score), never a copy of them.

`needs` says what a candidate must give: "logits" (loss over the supervised answer tokens),
"text" (a generated answer compared with the row's reference) or "labels" (a classification
adapter's predicted label, `lora predict`'s path)."""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from lora_cli.errors import LoraError


@dataclass
class Answer:
    """What one candidate made of one row: all a metric may read."""
    reference: str | None = None   # the row's supervised answer (generation metrics)
    text: str | None = None        # the candidate's generated answer
    nll: float | None = None       # summed negative log-likelihood of the reference's tokens
    tokens: int | None = None      # how many tokens that sum covers
    label: str | None = None       # classification: the row's label
    predicted: str | None = None   # classification: the candidate's label


@dataclass(frozen=True)
class Metric:
    name: str
    doc: str
    needs: str                                 # "logits" | "text" | "labels"
    row: Callable[[Answer], object]            # one row's statistic
    total: Callable[[list], float]             # the metric over a list of statistics
    higher_is_better: bool = True


def normalize(text: str) -> str:
    """Whitespace collapsed and case folded: what exact match and contains compare."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def _loss(stats: list) -> float:
    tokens = sum(n for _, n in stats)
    return sum(nll for nll, _ in stats) / tokens if tokens else float("nan")


def _perplexity(stats: list) -> float:
    loss = _loss(stats)
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; a perplexity that large is "broken" anyway


class _MixedTokenizer:
    """rouge-score's default tokenizer keeps [a-z0-9] only, so a Chinese answer would have no
    tokens at all. This one (rouge-score's documented `tokenizer=` hook) splits CJK text into
    characters and the rest into lower-cased words, as sacrebleu's zh tokenizer does."""

    def tokenize(self, text: str) -> list[str]:
        return _sacrebleu_zh()(text.lower()).split()


@lru_cache(maxsize=1)
def _sacrebleu_zh():
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_MixedTokenizer())


def _rouge_l(a: Answer) -> float:
    return _rouge_scorer().score(a.reference, a.text)["rougeL"].fmeasure


def _bleu(stats: list) -> float:
    import sacrebleu

    hyps, refs = [h for h, _ in stats], [r for _, r in stats]
    # tokenize="zh": CJK characters split, the rest as 13a; the default 13a sees a Chinese answer as one word
    return sacrebleu.corpus_bleu(hyps, [refs], tokenize="zh").score / 100


def _chrf(stats: list) -> float:
    import sacrebleu

    hyps, refs = [h for h, _ in stats], [r for _, r in stats]
    return sacrebleu.corpus_chrf(hyps, [refs]).score / 100


def _pair(a: Answer):
    return (a.text, a.reference)


def _labels(a: Answer):
    return (a.label, a.predicted)


# accuracy and macro-F1 also report a classifier's held-out split and `lora predict` (tasks/classification.py)
@dataclass
class ClassificationReport:
    labels: list[str]
    confusion: list[list[int]]  # confusion[gold][predicted]

    @classmethod
    def of(cls, gold: list[int], predicted: list[int], labels: list[str]) -> ClassificationReport:
        n = len(labels)
        confusion = [[0] * n for _ in range(n)]
        for g, p in zip(gold, predicted):
            confusion[g][p] += 1
        return cls(list(labels), confusion)

    @property
    def rows(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def accuracy(self) -> float:
        return sum(self.confusion[i][i] for i in range(len(self.labels))) / max(1, self.rows)

    def f1(self, i: int) -> float:
        tp = self.confusion[i][i]
        predicted = sum(row[i] for row in self.confusion)
        gold = sum(self.confusion[i])
        return 0.0 if tp == 0 else 2 * tp / (predicted + gold)

    @property
    def macro_f1(self) -> float:
        """Mean F1 over classes that occur (as gold or predicted): sklearn's macro average."""
        present = [i for i in range(len(self.labels))
                   if sum(self.confusion[i]) or sum(row[i] for row in self.confusion)]
        return sum(self.f1(i) for i in present) / max(1, len(present))

    def to_dict(self) -> dict:
        return {"rows": self.rows, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "labels": self.labels, "confusion": self.confusion}

    def lines(self) -> list[str]:
        width = max(len(n) for n in self.labels + ["gold \\ predicted"])
        cell = max(5, *(len(n) for n in self.labels))
        out = [f"accuracy {self.accuracy:.3f}  macro-F1 {self.macro_f1:.3f}  ({self.rows} rows)",
               "gold \\ predicted".ljust(width) + " " + " ".join(n.rjust(cell) for n in self.labels)]
        out += [name.ljust(width) + " " + " ".join(str(c).rjust(cell) for c in row)
                for name, row in zip(self.labels, self.confusion)]
        return out


def _accuracy(stats: list) -> float:
    return mean([float(gold == predicted) for gold, predicted in stats])


def _macro_f1(stats: list) -> float:
    names = sorted({g for g, _ in stats} | {p for _, p in stats})
    index = {n: i for i, n in enumerate(names)}
    return ClassificationReport.of([index[g] for g, _ in stats], [index[p] for _, p in stats], names).macro_f1


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("loss", "mean negative log-likelihood per supervised answer token (lower is better)", "logits",
           lambda a: (a.nll, a.tokens), _loss, higher_is_better=False),
    Metric("perplexity", "exp(loss) over the supervised answer tokens (lower is better)", "logits",
           lambda a: (a.nll, a.tokens), _perplexity, higher_is_better=False),
    Metric("exact_match", "share of answers equal to the reference (whitespace and case ignored)", "text",
           lambda a: float(normalize(a.text) == normalize(a.reference)), mean),
    Metric("contains", "share of answers that contain the reference (whitespace and case ignored)", "text",
           lambda a: float(normalize(a.reference) in normalize(a.text)), mean),
    Metric("rouge_l", "ROUGE-L F1 of answer against reference (rouge-score; CJK split by character)", "text",
           _rouge_l, mean),
    Metric("bleu", "corpus BLEU / 100 (sacrebleu, tokenize=zh: CJK by character, the rest 13a)", "text", _pair, _bleu),
    Metric("chrf", "corpus chrF / 100 (sacrebleu)", "text", _pair, _chrf),
    Metric("accuracy", "share of rows whose predicted label is the row's label (classification adapters)", "labels",
           _labels, _accuracy),
    Metric("macro_f1", "F1 averaged over the labels (classification adapters)", "labels", _labels, _macro_f1),
)}
GENERATION_DEFAULT = ("loss", "perplexity", "exact_match", "contains", "rouge_l", "bleu", "chrf")
CLASSIFICATION_DEFAULT = ("accuracy", "macro_f1")


def user_metric(spec: str, where: str) -> Metric:
    """A user's `module:callable`: callable(answer, reference) -> float per row, averaged."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise LoraError(f"{where}: cannot import {module_name!r} for metric {spec!r} ({e})",
                        "put the module on PYTHONPATH (or in the current folder), or fix its name") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LoraError(f"{where}: {module_name} has no callable {attr!r} (metric {spec!r})",
                        "give module:function where function(answer, reference) returns a number")

    def row(a: Answer) -> float:
        value = fn(a.text, a.reference)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LoraError(f"metric {spec}: returned {value!r} for a row, not a finite number",
                            "make it return an int or float for every (answer, reference)")
        return float(value)

    return Metric(spec, f"user metric {spec} (mean over rows)", "text", row, mean)


def resolve_metrics(names, where: str = "--metrics") -> list[Metric]:
    """Metrics by name (or module:callable); an unknown name is refused with the list."""
    out = []
    for name in names:
        if name in METRICS:
            out.append(METRICS[name])
        elif ":" in name:
            out.append(user_metric(name, where))
        else:
            raise LoraError(f"{where}: unknown metric {name!r}",
                            f"use one of: {', '.join(METRICS)}, or module:function for your own")
    return out


def metric_name_problems(names, where: str) -> list[str]:
    """Recipe validation (nothing imported): unknown names, with the registry's list."""
    return [f"{where}: unknown metric {n!r}; use one of: {', '.join(METRICS)}, or module:function"
            for n in names if n not in METRICS and ":" not in str(n)]
