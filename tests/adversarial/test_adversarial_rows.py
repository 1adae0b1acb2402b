"""A single enormous row (issue 26, class 6), for every task and every kind of row: a 10 MB
field is cut to the ends truncation can keep before the tokenizer sees it (lora_cli.data.token_budget),
the run goes on (exit 0), and the row's fate is reported in the plan as SFT reports it
("truncated: 1 ..."). The tokenizer is spied on below the Python wrapper (its Rust backend), so
no path around the cut (a second tokenizer call, a pair, a template) goes unseen.

`test_every_task_has_an_enormous_row_case` walks the task registry: a new task without its case fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CLASSIFY_DATA, SEQ2SEQ_DATA, demo_rows, make_recipe, write_jsonl

HUGE = "ab " * 3_500_000  # 10.5 MB of text, a few million tokens if tokenised whole
BOUND = 100_000  # characters: far above what max_length 64 needs, far below the row


class SpyBackend:
    """Stands in for a fast tokenizer's Rust backend: records the longest text it was asked to
    encode, forwards everything else."""

    def __init__(self, inner, seen: list[int]):
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_seen", seen)

    def _record(self, value) -> None:
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            for text in item if isinstance(item, (list, tuple)) else [item]:
                if isinstance(text, str):
                    self._seen.append(len(text))

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name.startswith("encode"):
            def encode(first, *args, **kwargs):
                self._record(first)
                if args and isinstance(args[0], str):  # encode(text, pair)
                    self._record(args[0])
                return attr(first, *args, **kwargs)
            return encode
        return attr

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


@pytest.fixture
def tokenizer_spy(monkeypatch) -> list[int]:
    """Every tokenizer lora loads gets the spying backend; returns the lengths seen."""
    from lora_cli.model import load as model

    seen: list[int] = []
    real = model.load_tokenizer

    def spied(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok._tokenizer = SpyBackend(tok._tokenizer, seen)
        return tok
    monkeypatch.setattr(model, "load_tokenizer", spied)
    return seen


def _recipe(tmp_path: Path, base: Path, rows: list[dict], *, model: dict | None = None, lora=None,
            train: dict | None = None) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    path = make_recipe(tmp_path, base, data, train={"max_steps": 1, **(train or {})})
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["model"].update(model or {})
    raw["data"]["max_length"] = 64
    if lora:
        raw["lora"]["target_modules"] = lora
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _lines(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def causal_lm(tmp_path, bases):
    rows = demo_rows(3) + [{"instruction": HUGE, "output": "fine"}]
    return _recipe(tmp_path, bases("tiny_random"), rows), "truncated: 1 prompt"


def classification(tmp_path, bases):
    rows = _lines(CLASSIFY_DATA, 8) + [{"text": HUGE, "label": "food"}]
    return (_recipe(tmp_path, bases("tiny_bert"), rows, model={"task": "classification"}, lora="attention-qv"),
            "truncated: 1 text")


def classification_pair(tmp_path, bases):
    rows = [dict(r, text_pair="and so on") for r in _lines(CLASSIFY_DATA, 8)] + [
        {"text": "short", "text_pair": HUGE, "label": "food"}, {"text": HUGE, "text_pair": HUGE, "label": "food"}]
    return (_recipe(tmp_path, bases("tiny_bert"), rows, model={"task": "classification"}, lora="attention-qv"),
            "truncated: 2 text")


def seq2seq(tmp_path, bases):
    rows = _lines(SEQ2SEQ_DATA, 4) + [{"source": HUGE, "target": "fine"}, {"source": "fine", "target": HUGE}]
    return (_recipe(tmp_path, bases("tiny_t5"), rows, model={"task": "seq2seq"}, lora="attention-qv"),
            "truncated: 1 source, 1 target")


def seq2seq_alpaca(tmp_path, bases):
    rows = demo_rows(3) + [{"instruction": "say it", "input": HUGE, "output": "fine"}]
    return (_recipe(tmp_path, bases("tiny_t5"), rows, model={"task": "seq2seq"}, lora="attention-qv"),
            "truncated: 1 source")


def dpo_pairs(tmp_path, bases):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    rows += [{"prompt": HUGE, "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": HUGE, "rejected": "no"}]
    return _recipe(tmp_path, bases("tiny_random"), rows, train={"objective": "dpo"}), "truncated: "


def kto_labelled(tmp_path, bases):
    rows = [{"prompt": f"q{i}", "completion": "yes", "label": i % 2 == 0} for i in range(4)]
    rows += [{"prompt": HUGE, "completion": "yes", "label": True}]
    return _recipe(tmp_path, bases("tiny_random"), rows, train={"objective": "kto"}), "truncated: "


# the task (model.task) each case trains; every task of the registry has at least one
CASES = {causal_lm: "causal_lm", classification: "classification", classification_pair: "classification",
         seq2seq: "seq2seq", seq2seq_alpaca: "seq2seq", dpo_pairs: "causal_lm", kto_labelled: "causal_lm"}


def test_every_task_has_an_enormous_row_case():
    from lora_cli.tasks import TASKS

    assert set(TASKS) <= set(CASES.values())


@pytest.fixture
def bases(request):
    return lambda name: request.getfixturevalue(name)


@pytest.mark.parametrize("case", list(CASES), ids=[c.__name__ for c in CASES])
def test_a_10mb_row_is_cut_before_tokenising_and_reported(case, tmp_path, bases, tokenizer_spy, cli):
    recipe, reported = case(tmp_path, bases)
    result = cli("train", recipe, "--dry-run")
    assert result.code == 0, result
    assert "Traceback" not in result.out + result.err
    data_line = next(line for line in result.out.splitlines() if line.startswith("data "))
    assert reported in data_line, data_line
    assert tokenizer_spy, "the spy saw nothing: it no longer sits where the tokenizer encodes"
    assert max(tokenizer_spy) < BOUND, f"a text of {max(tokenizer_spy):,} characters was tokenised whole"


def test_predict_cuts_an_enormous_row_too(tmp_path, tiny_bert, tokenizer_spy, cli):
    """`lora predict` (and a classifier's held-out report) encode rows one batch at a time:
    the same cut applies."""
    recipe = _recipe(tmp_path, tiny_bert, _lines(CLASSIFY_DATA, 8), model={"task": "classification"},
                     lora="attention-qv")
    assert cli("train", recipe).code == 0
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"text": "soup"}, {"text": HUGE}])
    tokenizer_spy.clear()
    result = cli("predict", "--adapter", tmp_path / "run", "--file", rows, "--out", tmp_path / "preds.jsonl")
    assert result.code == 0, result
    assert len((tmp_path / "preds.jsonl").read_text(encoding="utf-8").splitlines()) == 2
    assert tokenizer_spy and max(tokenizer_spy) < BOUND


@pytest.mark.parametrize("task", ["classification", "seq2seq"])
def test_the_cut_changes_no_example(task, tiny_bert, tiny_t5):
    """Cut or whole, a row becomes the same example (the cut keeps what truncation keeps)."""
    from transformers import AutoTokenizer

    from lora_cli.tasks import classification, seq2seq
    from lora_cli.data.token_budget import chars_for

    tok = AutoTokenizer.from_pretrained(tiny_bert if task == "classification" else tiny_t5)
    # a little over twice what the cut keeps on each side of a pair: cut for sure, yet small
    # enough to tokenise whole here (the tiny tokenizers' long tokens make the cut generous, and
    # tokenizers' pair truncation grows with the square of the overflow: 3x cost 12 s)
    words = 11 * 2 * chars_for(tok, 64) // 25
    long_text = " ".join(f"w{i % 997}" for i in range(words))
    assert len(long_text) > 2 * 2 * chars_for(tok, 64)
    if task == "classification":
        rows = [classification.LabeledRow(long_text, None, 0, "r1"), classification.LabeledRow("x " + long_text, long_text, 1, "r2")]
        cut, _ = classification.tokenize_labeled(rows, ["a", "b"], tok, 64)
        whole = [{"input_ids": tok(r.text, r.text_pair, truncation=True, max_length=64)["input_ids"], "labels": i}
                 for i, r in enumerate(rows)]
        assert cut == whole
        return
    from lora_cli.data.template import TemplateSpec, prompt_ids

    spec = TemplateSpec()
    messages = [{"role": "user", "content": long_text, "input": ""}]
    assert prompt_ids(tok, spec, messages, max_tokens=64)[-63:] == prompt_ids(tok, spec, messages)[-63:]
    (example,), _ = seq2seq.tokenize_seq2seq([(messages, long_text)], tok, spec, 64)
    assert example["labels"] == tok(long_text, add_special_tokens=False)["input_ids"][:64]
