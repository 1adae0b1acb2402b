"""What a recipe trains the model *for*: `model.task`, one registry every consumer reads.

- causal_lm (the default): a decoder-only language model answers prompts (data.py, template.py).
- classification: AutoModelForSequenceClassification (BERT-like encoders, and decoders with a
  `score` head); rows `text` (+ `text_pair`) and `label`; peft's SEQ_CLS task type trains and
  saves the new head whole (its modules_to_save), LoRA does the rest.
- seq2seq: AutoModelForSeq2SeqLM (T5, BART); rows `source` / `target`, or alpaca rows mapped
  onto them. The encoder input is the prompt the template renders (template.prompt_ids, the
  very ids `lora generate` / `chat` build), the labels are the target alone.

Each Task says which transformers class loads it, which peft task type wraps it, which model
configurations can do it, how its data is built and batched, and how it is evaluated. The
training loop, loading, merging, estimating, linting and sweeping read it here instead of
switching on a string. Nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass

from lora_cli.data import DataStats
from lora_cli.errors import DataError, LoraError
from lora_cli.token_budget import clip_for_tokens

TASK_NAMES = ("causal_lm", "classification", "seq2seq")
CLASSIFICATION_FIELDS = ("text", "text_pair", "label")
SEQ2SEQ_FIELDS = ("source", "target", "instruction", "input", "output", "system")
IMBALANCE_RATIO = 3.0  # largest / smallest class above this is reported as imbalanced
DRY_RUN_EVAL_ROWS = 512  # the base's held-out report in a dry run reads at most this many rows


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str       # the transformers Auto class that loads a base for this task
    peft_task_type: str   # peft.TaskType member
    generates: bool       # lora generate / chat answer with it
    predicts_labels: bool  # lora predict labels rows with it
    fields: tuple         # row fields data.columns may map (empty: data.format decides)
    doc: str

    def next_step(self, adapter_dir) -> str:
        """The command that tries a freshly trained adapter of this task (printed at the end of a run)."""
        if self.predicts_labels:
            return f"lora predict --adapter {adapter_dir} --file rows.jsonl --out preds.jsonl"
        return f'lora generate --adapter {adapter_dir} "..."'

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def can_load(self, config) -> bool:
        """Whether transformers has a model of this kind for `config` (a PretrainedConfig)."""
        import transformers.models.auto.modeling_auto as auto

        mapping = {"causal_lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                   "classification": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                   "seq2seq": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES}[self.name]
        return config.model_type in mapping and (self.name != "causal_lm" or not config.is_encoder_decoder)


TASKS = {
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", "CAUSAL_LM", generates=True, predicts_labels=False,
                      fields=(), doc="decoder-only language model; rows per data.format"),
    "classification": Task("classification", "AutoModelForSequenceClassification", "SEQ_CLS", generates=False,
                           predicts_labels=True, fields=CLASSIFICATION_FIELDS,
                           doc="a label per text (BERT-like encoders, or decoders with a classification head)"),
    "seq2seq": Task("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", generates=True, predicts_labels=False,
                    fields=SEQ2SEQ_FIELDS, doc="encoder-decoder (T5, BART): source text in, target text out"),
}


def get_task(name: str | None) -> Task:
    return TASKS[name or "causal_lm"]


# --------------------------------------------------------------------------- recipe checks (no torch)

def recipe_problems(r) -> list[str]:
    """The task's cross-field checks (part of recipe.cross_checks)."""
    task, problems = r.model.task, []
    if r.model.labels is not None:
        if task != "classification":
            problems.append(f"model.labels: only read by model.task classification (task is {task}); remove it")
        elif len(r.model.labels) < 2:
            problems.append(f"model.labels: {r.model.labels} names fewer than 2 classes; a classifier needs at least 2")
        else:
            dupes = sorted(n for n, c in Counter(r.model.labels).items() if c > 1)
            if dupes:
                problems.append(f"model.labels: {dupes} listed more than once; each label once, in id order")
    if task == "causal_lm":
        return problems
    if r.lora.method in ("prompt_tuning", "prefix_tuning"):
        problems.append(f"lora.method: {r.lora.method} is only wired for model.task causal_lm; use lora, dora, rslora or ia3")
    if r.data.packing:
        problems.append(f"data.packing: only for model.task causal_lm (task is {task}); set data.packing: false")
    fmt = r.data.format if r.data.format not in ("auto",) else "alpaca"  # auto: the task's own rows
    if task == "classification" and fmt != "alpaca":
        problems.append("data.format: not read by model.task classification (rows are text, optional text_pair, label); "
                        "remove data.format")
    if task == "seq2seq" and fmt != "alpaca":
        problems.append("data.format: model.task seq2seq reads source/target rows or alpaca rows; "
                        f"{r.data.format} is not one of them (remove data.format)")
    return problems


def column_fields(r) -> tuple | None:
    """The row fields data.columns may map for this recipe's task; None = data.format decides."""
    return get_task(r.model.task).fields or None


# --------------------------------------------------------------------------- models

def check_model_can(model_cfg) -> None:
    """Refuse, before loading weights, a base that cannot do model.task (exit 2, folder named)."""
    from transformers import AutoConfig

    task = get_task(model_cfg.task)
    try:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # load_base_model reports an unreadable folder in its own words
    if task.can_load(config):
        return
    kinds = [t.name for t in TASKS.values() if t.can_load(config)]
    hint = f"this model can do: {', '.join(kinds)}; set model.task to one of them" if kinds else \
        "transformers has no head of any supported kind for this model"
    if task.name == "seq2seq":
        hint = "seq2seq needs an encoder-decoder model (T5, BART shapes); " + hint
    raise LoraError(f"model.task: {task.name} cannot run on {model_cfg.name_or_path} "
                    f"({config.model_type}: no {task.auto_class} for it)", hint)


def load_kwargs(model_cfg) -> dict:
    """Extra from_pretrained arguments: the classification head's size and label names."""
    if model_cfg.task != "classification":
        return {}
    labels = list(model_cfg.labels or [])
    if not labels:
        raise LoraError("model.labels: unknown, so the classification head cannot be built",
                        "train with model.task classification (labels are read from the data and saved), "
                        "or list them in model.labels")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def bind_tokenizer(model, tokenizer) -> None:
    """A decoder classifies from its last non-pad token, so its config must know the pad id the
    batches use (load_tokenizer may have made EOS the pad)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- classification data

@dataclass
class LabeledRow:
    text: str
    text_pair: str | None
    label: object  # as written: a name (str) or an id (int); None when the row has none
    where: str


def read_labeled_rows(path: str, split: str, columns: dict, *, need_label: bool = True) -> list[LabeledRow]:
    from lora_cli.formats import read_source

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
    from lora_cli.formats import data_paths as paths_of

    if recipe.model.labels:
        return list(recipe.model.labels)
    rows = [row for p in paths_of(recipe.data.path)
            for row in read_labeled_rows(p, recipe.data.split, recipe.data.columns)]
    return labels_from_rows(rows)


def prepare_recipe(recipe) -> None:
    """Fill in what a task reads from the data before anything is saved or compared (resume):
    the label set of a classification run, so it is written with the adapter."""
    if recipe.model.task == "classification" and not recipe.model.labels:
        recipe.model.labels = resolve_labels(recipe)


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
    from lora_cli.data import held_out, weighted
    from lora_cli.formats import data_paths as paths_of

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

    from lora_cli import progress

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


# --------------------------------------------------------------------------- `lora predict`

def predict_file(model, tokenizer, labels: list[str], path, max_length: int) -> tuple[list[dict], ClassificationReport | None]:
    """Rows of a .jsonl/.json/.csv file labelled: each keeps its fields and gains `predicted`
    and `probabilities` (label -> p). When every row has a gold `label`, also the report."""
    from pathlib import Path

    if not Path(path).is_file():
        raise DataError(f"--file {path}: no such file", "give a .jsonl, .json or .csv file of rows with text (and text_pair)")
    rows = read_labeled_rows(str(path), "train", {}, need_label=False)
    from lora_cli import progress

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


# --------------------------------------------------------------------------- seq2seq data

def seq2seq_pair(row, where: str, columns: dict) -> tuple[list[dict], str]:
    """(messages up to the answer, target) of one row: {source, target}, or an alpaca row."""
    from lora_cli.formats import alpaca_conversation

    if isinstance(row, dict) and columns.get("source", "source") in row:
        src, tgt = row.get(columns.get("source", "source")), row.get(columns.get("target", "target"))
        for field_name, value in (("source", src), ("target", tgt)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {columns.get(field_name, field_name)!r} must be non-empty text, got {value!r}",
                                'seq2seq rows are {"source": "...", "target": "..."} or alpaca rows')
        return [{"role": "user", "content": src, "input": ""}], tgt
    alpaca_columns = {k: v for k, v in columns.items() if k in ("instruction", "input", "output", "system")}
    conversation = alpaca_conversation(row, where, alpaca_columns)
    return conversation[:-1], conversation[-1]["content"]


def tokenize_seq2seq(pairs: list[tuple[list[dict], str]], tokenizer, template, max_length: int):
    """Encoder input = the template's prompt for the source (exactly what generate renders);
    labels = the target's ids + EOS. Both cut to max_length (the source from its start, after BOS)."""
    from lora_cli.data import DataStats
    from lora_cli.template import prompt_ids, tokenize_texts

    stats = DataStats(rows=len(pairs))
    # a 10 MB source or target is cut to the ends truncation can keep before it is tokenised (token_budget)
    targets = tokenize_texts(tokenizer, [clip_for_tokens(t, tokenizer, max_length) for _, t in pairs])
    bos = tokenizer.bos_token_id
    examples = []
    for (messages, _), target in zip(pairs, targets):
        source = prompt_ids(tokenizer, template, messages, max_tokens=max_length)
        labels = list(target) + [tokenizer.eos_token_id]
        if len(source) > max_length:
            keep = 1 if source and source[0] == bos else 0
            source = source[:keep] + source[len(source) - (max_length - keep):]
            stats.truncated["source"] += 1
        if len(labels) > max_length:
            labels = labels[:max_length]
            stats.truncated["target"] += 1
        examples.append({"input_ids": source, "labels": labels})
        stats.supervised_tokens += len(labels)
        stats.total_tokens += len(source) + len(labels)
    stats.kept = stats.sequences = len(examples)
    return examples, stats


def build_seq2seq_data(recipe, tokenizer):
    from lora_cli.data import SFTData
    from lora_cli.formats import read_source
    from lora_cli.template import TemplateSpec

    d = recipe.data
    spec = TemplateSpec.from_data(d)

    def pairs_of(path):
        source = read_source(path, d.split)
        return [seq2seq_pair(row, where, d.columns) for where, row in source.stream()]

    train, evaluation = split_items(d, pairs_of)
    examples, stats = tokenize_seq2seq(train, tokenizer, spec, d.max_length)
    data = SFTData(train=to_dataset(examples), eval=None, stats=stats)
    if evaluation:
        eval_examples, data.eval_stats = tokenize_seq2seq(evaluation, tokenizer, spec, d.max_length)
        data.eval = to_dataset(eval_examples)
    return data


class Seq2SeqCollator:
    """Encoder inputs right-padded with their mask; labels right-padded with -100 (the model
    builds its decoder inputs from them)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]):
        from lora_cli.template import IGNORE_INDEX

        ids, mask = pad_right([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_right([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- the training hooks

def build_data(recipe, tokenizer):
    """The datasets for a recipe, by task (causal_lm: data.build_sft_data, cached)."""
    if recipe.model.task == "classification":
        return build_classification_data(recipe, tokenizer)
    if recipe.model.task == "seq2seq":
        return build_seq2seq_data(recipe, tokenizer)
    from lora_cli.data import build_sft_data

    return build_sft_data(recipe.data, tokenizer)


def make_collator(recipe, layout: str, tokenizer):
    """The task's collator; a causal LM's follows the batch layout (lora_cli.batching), the
    other tasks pad their rows."""
    if recipe.model.task == "classification":
        return ClassificationCollator(tokenizer.pad_token_id)
    if recipe.model.task == "seq2seq":
        return Seq2SeqCollator(tokenizer.pad_token_id)
    from lora_cli.data import make_collator as causal_collator

    return causal_collator(layout, tokenizer)


def trainer_kwargs(recipe, data) -> dict:
    """compute_metrics for tasks whose eval reports more than the loss."""
    if recipe.model.task == "classification" and data.eval is not None:
        return {"compute_metrics": classification_metrics(data.labels)}
    return {}


def eval_gathers_predictions(recipe) -> bool:
    """Classification logits are one row of num_labels per example: cheap to gather for metrics
    (a causal LM's vocab-sized logits are not)."""
    return recipe.model.task == "classification"


def report_held_out(recipe, model, tokenizer, console, heading: str, output_file=None) -> ClassificationReport | None:
    """Accuracy, macro-F1 and the confusion matrix on the held-out rows (classification only)."""
    if recipe.model.task != "classification":
        return None
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
        import json

        output_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report



EVAL_REPORT_FILE = "eval_report.json"  # a classification run's held-out report, beside its adapter


def data_report_lines(recipe, data) -> list[str]:
    """Extra lines for the plan: a classifier's labels and class balance."""
    if recipe.model.task != "classification":
        return []
    return [f"labels  {', '.join(f'{i}={n}' for i, n in enumerate(data.labels))}"] + data.balance_lines()


def example_lines(recipe, dataset, tokenizer) -> list[str] | None:
    """One decoded example as the model sees it, for tasks whose labels are not token runs
    (None: the causal LM's own masked/supervised display)."""
    if recipe.model.task == "causal_lm":
        return None
    example = dataset[1 if len(dataset) > 1 else 0]
    shown = repr(tokenizer.decode(example["input_ids"]))
    if recipe.model.task == "classification":
        return [f"example {shown} -> {recipe.model.labels[int(example['labels'])]}"]
    return [f"encoder input:     {shown}", f"target (labels):   {tokenizer.decode(example['labels'])!r}"]


def refuse_unless(capability: str, adapters: dict, command: str, hint: str) -> None:
    """A command that needs a capability (generates, predicts_labels) refuses, before loading
    anything, adapters whose model.task lacks it."""
    from lora_cli.model import read_adapter

    for name, path in adapters.items():
        task = get_task(read_adapter(path).model_section.get("task"))
        if not getattr(task, capability):
            raise LoraError(f"{command}: adapter {path} was trained for model.task {task.name}, which it cannot serve",
                            hint.format(adapter=path))  # the hint names this adapter, ready to paste
