"""model.task classification: labelled rows, their tokenised examples and collator, the held-out
report (accuracy, macro-F1, confusion matrix), the rows `lora eval` asks, and `lora predict`."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from dataclasses import dataclass

from lora_cli.data.examples import DataStats, held_out, weighted
from lora_cli.data.sources import data_paths as paths_of, read_source
from lora_cli.data.token_budget import clip_for_tokens
from lora_cli.errors import DataError
from lora_cli.eval.metrics import ClassificationReport
from lora_cli.tasks import CLASSIFICATION_FIELDS
from lora_cli.tasks.hooks import EvalRow, TaskHooks
from lora_cli.ui import progress

IMBALANCE_RATIO = 3.0  # largest / smallest class above this is reported as imbalanced
DRY_RUN_EVAL_ROWS = 512  # the base's held-out report in a dry run reads at most this many rows


# --------------------------------------------------------------------------- classification data

@dataclass
class LabeledRow:
    text: str
    text_pair: str | None
    label: object  # as written: a name (str) or an id (int); None when the row has none
    where: str


def read_labeled_rows(path: str, split: str, columns: dict, *, need_label: bool = True) -> list[LabeledRow]:
    source = read_source(path, split)
    return [_labeled_row(row, where, columns, need_label) for where, row in source.stream()]


def _labeled_row(row, where: str, columns: dict, need_label: bool) -> LabeledRow:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with text and label, got {type(row).__name__}",
                        'e.g. {"text": "...", "label": "positive"}')
    name = {ours: columns.get(ours, ours) for ours in CLASSIFICATION_FIELDS}
    text, pair, label = row.get(name["text"]), row.get(name["text_pair"]), row.get(name["label"])
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: field {name['text']!r} must be non-empty text, got {text!r}",
                        "every row needs the text to classify (map another field with data.columns: {text: yours})")
    if pair is not None and not isinstance(pair, str):
        raise DataError(f"{where}: field {name['text_pair']!r} must be text, got {type(pair).__name__}")
    if label is None and need_label:
        raise DataError(f"{where}: no {name['label']!r}; every training and evaluation row needs its label",
                        "add the label (a name, or an id into model.labels), or map your field with data.columns: {label: yours}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f"{where}: label {label!r} is neither a name nor an integer id")
    return LabeledRow(text, pair, label, where)


def labels_from_rows(rows: list[LabeledRow]) -> list[str]:
    """The label set of data that declares none: names sorted; bare ids 0..max as '0', '1', ..."""
    names = sorted({r.label for r in rows if isinstance(r.label, str)})
    ids = [r for r in rows if isinstance(r.label, int)]
    if names and ids:
        raise DataError(f"{ids[0].where}: label {ids[0].label} is an id, but other rows name their labels, "
                        "so which name it means is unknown",
                        f"list the names in id order in model.labels (e.g. {names}), or write names everywhere")
    if ids:
        top = max(r.label for r in ids)
        if min(r.label for r in ids) < 0:
            bad = next(r for r in ids if r.label < 0)
            raise DataError(f"{bad.where}: label id {bad.label} is negative", "ids count from 0")
        return [str(i) for i in range(top + 1)]
    if len(names) < 2:
        raise DataError(f"{rows[0].where if rows else 'data'}: the data has {len(names)} label(s) ({names}); "
                        "a classifier needs at least 2", "add rows of the other classes, or list them in model.labels")
    return names


def label_id(label, names: list[str], where: str) -> int:
    """A row's label as an id into `names`; a name in the set, or an id in range (exit 2 otherwise)."""
    if isinstance(label, int):
        if 0 <= label < len(names):
            return label
        raise DataError(f"{where}: label id {label} is out of range (model.labels has {len(names)}: 0-{len(names) - 1})",
                        f"use an id below {len(names)} or a name: {', '.join(names)}")
    if label in names:
        return names.index(label)
    raise DataError(f"{where}: label {label!r} is not in the label set ({', '.join(names)})",
                    "fix the row, or add the label to model.labels (a label seen only at evaluation was never trained)")


def resolve_labels(recipe) -> list[str]:
    """model.labels, or the set read from the training data when the recipe declares none."""
    if recipe.model.labels:
        return list(recipe.model.labels)
    rows = [row for p in paths_of(recipe.data.path)
            for row in read_labeled_rows(p, recipe.data.split, recipe.data.columns)]
    return labels_from_rows(rows)


def tokenize_labeled(rows: list[LabeledRow], names: list[str], tokenizer, max_length: int):
    """(examples, stats): input_ids (text, and text_pair when given, as the tokenizer joins a
    pair) cut to max_length, and the label id."""
    stats = ClassificationStats(rows=len(rows))
    label_ids = [label_id(r.label, names, r.where) for r in rows]
    examples: list[dict | None] = [None] * len(rows)
    for with_pair in (False, True):
        picked = [i for i, r in enumerate(rows) if (r.text_pair is not None) == with_pair]
        if not picked:
            continue
        # a 10 MB text is cut to the ends truncation can keep before it is tokenised (token_budget)
        texts = [clip_for_tokens(rows[i].text, tokenizer, max_length) for i in picked]
        pairs = [clip_for_tokens(rows[i].text_pair, tokenizer, max_length) for i in picked] if with_pair else None
        full = tokenizer(texts, pairs, truncation=False)["input_ids"]
        cut = tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"]
        for i, ids, whole in zip(picked, cut, full):
            if len(whole) > len(ids):
                stats.truncated["text"] += 1
            examples[i] = {"input_ids": ids, "labels": label_ids[i]}
            stats.total_tokens += len(ids)
    stats.kept = stats.sequences = len(rows)
    return examples, stats


class ClassificationStats(DataStats):
    """Rows and tokens; a classifier supervises one label per row, not tokens."""

    def summary(self) -> str:
        tokens = dataclasses.replace(self, supervised_tokens=0, total_tokens=0)
        return f"{DataStats.summary(tokens)}; {self.total_tokens} tokens"


@dataclass
class ClassificationData:
    """What the trainer gets for a classification run (the shape of data.SFTData)."""
    train: object
    eval: object | None
    stats: object
    labels: list[str]
    train_counts: Counter
    eval_counts: Counter | None = None
    eval_stats: object = None

    def balance_lines(self) -> list[str]:
        lines = ["classes " + _counts_line(self.labels, self.train_counts)]
        counts = [self.train_counts.get(i, 0) for i in range(len(self.labels))]
        missing = [self.labels[i] for i, c in enumerate(counts) if c == 0]
        if missing:
            lines.append(f"warning: no training row of {', '.join(missing)}; the head cannot learn them")
        elif max(counts) / min(counts) > IMBALANCE_RATIO:
            big, small = counts.index(max(counts)), counts.index(min(counts))
            lines.append(f"warning: classes are imbalanced ({self.labels[big]} {max(counts)} rows vs "
                         f"{self.labels[small]} {min(counts)}, ratio {max(counts) / min(counts):.1f}); "
                         "accuracy can look good by predicting the large class, watch macro-F1")
        if self.eval_counts is not None:
            lines.append("eval    " + _counts_line(self.labels, self.eval_counts))
        return lines


def _counts_line(names: list[str], counts: Counter) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{n} {counts.get(i, 0)} ({100 * counts.get(i, 0) / total:.0f}%)" for i, n in enumerate(names))


def split_items(d, read) -> tuple[list, list]:
    """(train, eval) items of a data section, `read(path)` giving one source's items: held out
    by data.val_fraction (fixed by data.seed) or read from data.val_path, weighted by
    data.weights; the rule data.load_items applies to causal-LM rows."""
    paths = paths_of(d.path)
    train, evaluation = [], []
    for i, (path, weight) in enumerate(zip(paths, d.weights or [1.0] * len(paths))):
        rng = random.Random(d.seed * 1000 + i)
        items, held = held_out(read(path), d.val_fraction, rng)
        evaluation += held
        train += weighted(items, weight, rng)
    for path in paths_of(d.val_path):
        evaluation += read(path)
    return train, evaluation


def labeled_items(recipe) -> tuple[list[LabeledRow], list[LabeledRow]]:
    d = recipe.data
    return split_items(d, lambda path: read_labeled_rows(path, d.split, d.columns))


def build_classification_data(recipe, tokenizer) -> ClassificationData:
    d, names = recipe.data, resolve_labels(recipe)
    train, evaluation = labeled_items(recipe)
    examples, stats = tokenize_labeled(train, names, tokenizer, d.max_length)
    data = ClassificationData(to_dataset(examples), None, stats, names, Counter(e["labels"] for e in examples))
    if evaluation:
        eval_examples, data.eval_stats = tokenize_labeled(evaluation, names, tokenizer, d.max_length)
        data.eval = to_dataset(eval_examples)
        data.eval_counts = Counter(e["labels"] for e in eval_examples)
    return data


def to_dataset(examples: list[dict]):
    """A datasets.Dataset of a task's examples (a classifier's label is one id, not a list),
    with the `length` column length-grouped batching reads."""
    from datasets import Dataset

    columns = {c: [e[c] for e in examples] for c in examples[0]}
    columns["length"] = [len(ids) for ids in columns["input_ids"]]
    return Dataset.from_dict(columns)


class ClassificationCollator:
    """Right-padded input_ids and their mask; one label id per row."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]):
        import torch

        ids, mask = pad_right([f["input_ids"] for f in features], self.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)}


def pad_right(rows: list[list[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, mask


# --------------------------------------------------------------------------- classification metrics

def classification_metrics(labels: list[str]):
    """compute_metrics for the Trainer: accuracy and macro-F1 of the eval split."""

    def compute(eval_pred) -> dict:
        logits, gold = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        report = ClassificationReport.of(list(map(int, gold)), list(map(int, logits.argmax(-1))), labels)
        return {"accuracy": report.accuracy, "macro_f1": report.macro_f1}

    return compute


def predict_probabilities(model, tokenizer, rows: list[LabeledRow], max_length: int, batch_size: int = 16):
    """Softmax probabilities per row (lists), in row order."""
    import torch

    probs: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        encoded = [_encode_row(tokenizer, r, max_length) for r in chunk]
        ids, mask = pad_right(encoded, tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
        probs += torch.softmax(logits.float(), dim=-1).cpu().tolist()
        progress.advance(len(chunk))  # `lora predict`'s bar; nothing outside a progress task
    return probs


def _encode_row(tokenizer, row: LabeledRow, max_length: int) -> list[int]:
    pair = None if row.text_pair is None else clip_for_tokens(row.text_pair, tokenizer, max_length)
    return tokenizer(clip_for_tokens(row.text, tokenizer, max_length), pair,
                     truncation=True, max_length=max_length)["input_ids"]


def evaluate_rows(model, tokenizer, rows: list[LabeledRow], labels: list[str], max_length: int) -> ClassificationReport:
    probs = predict_probabilities(model, tokenizer, rows, max_length)
    gold = [label_id(r.label, labels, r.where) for r in rows]
    return ClassificationReport.of(gold, [max(range(len(p)), key=p.__getitem__) for p in probs], labels)


def eval_rows(recipe) -> list[LabeledRow]:
    """The held-out rows of a classification recipe, as read (the split training uses)."""
    return labeled_items(recipe)[1]


# --------------------------------------------------------------------------- what the run and `lora eval` ask

def report_held_out(recipe, model, tokenizer, console, heading: str, output_file=None) -> ClassificationReport | None:
    """Accuracy, macro-F1 and the confusion matrix on the held-out rows."""
    rows = eval_rows(recipe)
    if not rows:
        return None
    shown = rows[:DRY_RUN_EVAL_ROWS] if output_file is None else rows
    model.eval()
    report = evaluate_rows(model, tokenizer, shown, list(recipe.model.labels), recipe.data.max_length)
    note = f" (first {len(shown)} of {len(rows)} rows)" if len(shown) < len(rows) else ""
    console.print(f"[bold]{heading}[/]{note}", highlight=False)
    for line in report.lines():
        console.print("  " + line, highlight=False, markup=False)
    if output_file is not None:
        output_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


def labeled_eval_rows(path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
    """text (+ text_pair) and the gold label, as `lora predict` reads them."""

    labeled = read_labeled_rows(path, "train", columns)[:limit or None]
    return [EvalRow(r.where, [], label=str(r.label), labeled=r) for r in labeled]


class ClassificationHooks(TaskHooks):
    def prepare_recipe(self, recipe) -> None:
        if not recipe.model.labels:  # read from the data, so the label set is saved with the adapter
            recipe.model.labels = resolve_labels(recipe)

    def build_data(self, recipe, tokenizer):
        return build_classification_data(recipe, tokenizer)

    def make_collator(self, recipe, layout: str, tokenizer):
        return ClassificationCollator(tokenizer.pad_token_id)  # padded rows, whatever the layout

    def trainer_kwargs(self, recipe, data) -> dict:
        return {"compute_metrics": classification_metrics(data.labels)} if data.eval is not None else {}

    def eval_gathers_predictions(self, recipe) -> bool:
        return True  # one row of num_labels logits per example

    def report_held_out(self, recipe, model, tokenizer, console, heading: str, output_file=None):
        return report_held_out(recipe, model, tokenizer, console, heading, output_file)

    def data_report_lines(self, recipe, data) -> list[str]:
        return [f"labels  {', '.join(f'{i}={n}' for i, n in enumerate(data.labels))}"] + data.balance_lines()

    def example_lines(self, recipe, dataset, tokenizer) -> list[str]:
        example = dataset[1 if len(dataset) > 1 else 0]
        return [f"example {tokenizer.decode(example['input_ids'])!r} -> {recipe.model.labels[int(example['labels'])]}"]

    def eval_rows(self, path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
        return labeled_eval_rows(path, fmt, columns, limit)


HOOKS = ClassificationHooks()


# --------------------------------------------------------------------------- `lora predict`

def predict_file(model, tokenizer, labels: list[str], path, max_length: int) -> tuple[list[dict], ClassificationReport | None]:
    """Rows of a .jsonl/.json/.csv file labelled: each keeps its fields and gains `predicted`
    and `probabilities` (label -> p). When every row has a gold `label`, also the report."""
    from pathlib import Path

    if not Path(path).is_file():
        raise DataError(f"--file {path}: no such file", "give a .jsonl, .json or .csv file of rows with text (and text_pair)")
    rows = read_labeled_rows(str(path), "train", {}, need_label=False)

    progress.set_total(len(rows))
    probs = predict_probabilities(model, tokenizer, rows, max_length)
    out = []
    for r, p in zip(rows, probs):
        best = max(range(len(p)), key=p.__getitem__)
        record = {"text": r.text, **({"text_pair": r.text_pair} if r.text_pair is not None else {}),
                  "label": labels[best], "probabilities": {n: round(v, 6) for n, v in zip(labels, p)}}
        if r.label is not None:
            record["gold"] = labels[label_id(r.label, labels, r.where)]
        out.append(record)
    report = None
    if rows and all(r.label is not None for r in rows):
        report = ClassificationReport.of([labels.index(o["gold"]) for o in out],
                                         [labels.index(o["label"]) for o in out], labels)
    return out, report
