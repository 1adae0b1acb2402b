"""Instruction data: read rows, check them, tokenise with the prompt masked out of the loss."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_cli.errors import DataError
from lora_cli.template import adds_bos, get_template, with_bos

IGNORE_INDEX = -100  # label value the loss skips

ALPACA_FIELDS = {"instruction": True, "input": False, "output": True}  # name -> required


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)    # reason -> rows
    truncated: Counter = field(default_factory=Counter)  # which side was cut -> rows
    supervised_tokens: int = 0
    total_tokens: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        if self.dropped:
            parts.append("dropped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())))
        if self.truncated:
            parts.append("truncated: " + ", ".join(f"{n} {side}" for side, n in sorted(self.truncated.items())))
        if self.total_tokens:
            parts.append(f"{self.supervised_tokens}/{self.total_tokens} tokens supervised "
                         f"({100 * self.supervised_tokens / self.total_tokens:.0f}%)")
        return "; ".join(parts)


# --------------------------------------------------------------------------- reading

def read_rows(path: str | Path) -> list[dict]:
    """Rows from .json (a list), .jsonl (one object per line) or a save_to_disk folder."""
    path = Path(path)
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", "check data.path in the recipe")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})",
                                    "each line of a .jsonl file must be one JSON object") from None
                rows.append(row)
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})",
                            "a .json data file must hold one list of objects") from None
        if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
            rows = next(iter(rows.values()))  # {"train": [...]} style
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}",
                            "wrap the rows in [ ... ], or use .jsonl with one object per line")
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}",
                        "use .json, .jsonl or a datasets save_to_disk folder")
    if not rows:
        raise DataError(f"{path}: no rows", "the data file is empty; add at least one example")
    return rows


def _read_saved_dataset(path: Path) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a dataset folder written by save_to_disk ({e})",
                        "point data.path at a .json/.jsonl file or a save_to_disk folder") from None
    if isinstance(ds, DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)} but no 'train'", "save the training split as 'train'")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{path}: no rows", "the dataset is empty")
    return ds.to_list()


def check_alpaca_rows(rows: list[dict], source: str) -> None:
    """Every row is an object with string instruction / output (input optional)."""
    for i, row in enumerate(rows, 1):
        where = f"{source}, row {i}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with instruction/input/output, got {type(row).__name__}")
        for name, required in ALPACA_FIELDS.items():
            value = row.get(name)
            if value is None:
                if required:
                    raise DataError(f"{where}: missing field {name!r} (row has: {', '.join(row) or 'nothing'})",
                                    "alpaca rows need 'instruction' and 'output' ('input' is optional)")
                continue
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")


# --------------------------------------------------------------------------- tokenising

def fit_to_length(prompt: list[int], response: list[int], max_length: int, keep_first: int = 0):
    """Cut the prompt side first (from its start, after `keep_first` tokens such as BOS),
    then the response's end, so every kept row still has supervised tokens.
    Returns (prompt, response, what_was_cut)."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response, None
    # The prompt keeps what the response leaves, but never less than half the budget
    # (a prompt cut to nothing teaches the answer without its question).
    prompt_budget = max(max_length - len(response), min(len(prompt), max_length // 2))
    cut = []
    if len(prompt) > prompt_budget:
        head = prompt[:keep_first]
        prompt = head + prompt[len(prompt) - (prompt_budget - len(head)):]
        cut.append("prompt")
    if len(prompt) + len(response) > max_length:
        response = response[: max_length - len(prompt)]
        cut.append("response")
    return prompt, response, "+".join(cut)


def tokenize_alpaca(rows: list[dict], tokenizer, template: str, max_length: int):
    """Returns (examples, stats): each example has input_ids, attention_mask and labels, where
    labels are -100 on the prompt and equal input_ids on the response + EOS (not shifted:
    the model shifts). Tokenisation is batched: one fast-tokenizer call per side."""
    tpl = get_template(template)
    prompts = [tpl.render(r["instruction"], r.get("input") or "") for r in rows]
    responses = [r["output"] for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    bos = adds_bos(tokenizer)
    stats = DataStats(rows=len(rows))
    examples = []
    for p, r in zip(prompt_ids, response_ids):
        p = with_bos(tokenizer, p, bos)
        r = r + [eos]
        p, r, cut = fit_to_length(p, r, max_length, keep_first=1 if bos else 0)
        if cut:
            stats.truncated[cut] += 1
        if not r:
            stats.dropped["no supervised token left after truncation"] += 1
            continue
        ids = p + r
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                         "labels": [IGNORE_INDEX] * len(p) + r})
        stats.supervised_tokens += len(r)
        stats.total_tokens += len(ids)
    stats.kept = len(examples)
    return examples, stats


@dataclass
class SFTData:
    """What the trainer gets: tokenised training rows, held-out rows (None when the recipe
    names no validation data), and what happened to the rows on the way."""
    train: object  # datasets.Dataset with input_ids / attention_mask / labels
    eval: object | None
    stats: DataStats


def build_sft_data(data_cfg, tokenizer) -> SFTData:
    """The datasets for a recipe's data section."""
    from datasets import Dataset

    rows = read_rows(data_cfg.path)
    check_alpaca_rows(rows, str(data_cfg.path))
    examples, stats = tokenize_alpaca(rows, tokenizer, data_cfg.template, data_cfg.max_length)
    if not examples:
        raise DataError(f"{data_cfg.path}: every row was dropped ({stats.summary()})",
                        "raise data.max_length or check the rows' outputs")
    return SFTData(train=Dataset.from_list(examples), eval=None, stats=stats)


class PadCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100 (never derived from
    the pad id, so an EOS that doubles as pad stays supervised)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def describe_example(example: dict, tokenizer) -> tuple[str, str]:
    """(whole sequence, supervised part) decoded, as the source workflow checks a row."""
    whole = tokenizer.decode(example["input_ids"])
    supervised = tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])
    return whole, supervised
