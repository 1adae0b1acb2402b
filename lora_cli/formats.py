"""Reading data sources and checking their rows: files, folders and hub datasets in, checked
conversations (alpaca / chat) or documents (text) out. Every problem names the file and row.

A conversation is a list of messages {"role": system|user|assistant, "content": str}; an alpaca
row becomes one user turn that also carries its "input", so templates with an input slot
(alpaca) can use it.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import DataError
from lora_cli.inputs import read_text, utf8_lines

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # data files read here (and accepted by the recipe)
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant"}  # OpenAI and ShareGPT names


@dataclass
class Source:
    """Rows of one data source, and where each came from (for error messages)."""
    name: str
    rows: list
    lines: list[int] | None = None  # .jsonl line of each row

    def where(self, i: int) -> str:
        row = f"{self.name}, row {i + 1}"
        if self.lines and self.lines[i] != i + 1:  # blank lines skipped: say where in the file too
            row += f" (line {self.lines[i]})"
        return row


# --------------------------------------------------------------------------- naming sources

def data_paths(value) -> list[str]:
    """data.path / data.val_path as a list: one path, several, or none."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def looks_like_hub_id(path: str) -> bool:
    """'org/name' (a model or dataset on the hub), as opposed to a relative path: no leading
    dot, exactly one slash, and not a data file's name."""
    return (bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", path)) and not path.startswith(".")
            and not path.endswith(SUFFIXES))


# --------------------------------------------------------------------------- reading

def read_source(path: str, split: str = "train") -> Source:
    """Rows from .json / .jsonl / .csv / .parquet, a save_to_disk folder, or a hub dataset id."""
    p = Path(path)
    if p.is_dir():
        source = Source(str(p), _read_saved_dataset(p, split))
    elif p.is_file():
        source = _read_file(p)
    elif looks_like_hub_id(path):
        source = Source(path, load_hub_dataset(path, split).to_list())
    else:
        raise DataError(f"{path}: no such file", "check data.path in the recipe")
    if not source.rows:
        raise DataError(f"{source.name}: no rows", "the data is empty; add at least one example")
    return source


def read_rows(path: str | Path) -> list[dict]:
    return read_source(str(path)).rows


def _read_file(path: Path) -> Source:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return Source(str(path), _read_json(path))
    if path.suffix == ".csv":
        # utf8_lines drops Excel's byte-order mark and names the line of a byte that is not UTF-8
        return Source(str(path), list(csv.DictReader(line for _, line in utf8_lines(path))))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return Source(str(path), pq.read_table(path).to_pylist())
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})", "rewrite it, e.g. with pandas.DataFrame.to_parquet") from None
    raise DataError(f"{path}: unsupported file type {path.suffix!r}",
                    f"use {', '.join(SUFFIXES)}, or a datasets save_to_disk folder")


def _read_jsonl(path: Path) -> Source:
    rows, lines = [], []
    for lineno, line in utf8_lines(path):  # a byte that is not UTF-8 is reported with its line
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})",
                            "each line of a .jsonl file must be one JSON object") from None
        lines.append(lineno)
    return Source(str(path), rows, lines)


def _read_json(path: Path) -> list:
    text = read_text(path)
    if not text.strip():
        return []
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})",
                        "a .json data file must hold one list of objects (or use .jsonl, one object per line)") from None
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"train": [...]} style
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}",
                        "wrap the rows in [ ... ], or use .jsonl with one object per line")
    return rows


def _read_saved_dataset(path: Path, split: str) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path}: not a dataset folder written by save_to_disk ({e})",
                        "point data.path at a data file or a save_to_disk folder") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: dataset has splits {list(ds)} but no {split!r}",
                            f"set data.split to one of: {', '.join(ds)}")
        ds = ds[split]
    return ds.to_list()


def load_hub_dataset(name: str, split: str):
    """A dataset from the Hugging Face hub (cached by datasets after the first download)."""
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, unknown split: datasets raises many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data.path: cannot load hub dataset {name!r} (split {split!r}): {first}",
                        "check the id and data.split; without network access (HF_DATASETS_OFFLINE=1) only datasets "
                        "already in the local cache load; or download it elsewhere and point data.path at the files") from None
    return ds


# --------------------------------------------------------------------------- checking rows

def _field(row: dict, ours: str, columns: dict, where: str, fmt: str, *, required: bool):
    """The string in `row` that plays our field `ours` (renamed by data.columns), or None."""
    theirs = columns.get(ours, ours)
    value = row.get(theirs)
    if value is None:
        if required:
            mapped = f" (data.columns maps {ours!r} to {theirs!r})" if theirs != ours else ""
            raise DataError(f"{where}: missing field {theirs!r}{mapped}; row has: {', '.join(map(str, row)) or 'nothing'}",
                            f"{fmt} rows need {_needs(fmt)}; if your file names it differently, map it: "
                            f"data.columns: {{{ours}: your_name}}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {theirs!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})",
                        "quote the value in the data file")
    return value


def _needs(fmt: str) -> str:
    return {"alpaca": "'instruction' and 'output' ('input' and 'system' optional)",
            "chat": "'messages' (role/content) or 'conversations' (from/value)",
            "text": "'text'"}[fmt]


def _check_object(row, where: str, fmt: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {_needs(fmt)}, got {type(row).__name__}")


def alpaca_conversation(row, where: str, columns: dict) -> list[dict]:
    _check_object(row, where, "alpaca")
    instruction = _field(row, "instruction", columns, where, "alpaca", required=True)
    input = _field(row, "input", columns, where, "alpaca", required=False) or ""
    output = _field(row, "output", columns, where, "alpaca", required=True)
    system = _field(row, "system", columns, where, "alpaca", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": instruction, "input": input},
                       {"role": "assistant", "content": output}]


def chat_conversation(row, where: str, columns: dict) -> list[dict]:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value)."""
    _check_object(row, where, "chat")
    name = next((columns.get(k, k) for k in ("messages", "conversations") if row.get(columns.get(k, k)) is not None), None)
    if name is None:
        raise DataError(f"{where}: missing field 'messages' (or 'conversations'); row has: {', '.join(map(str, row)) or 'nothing'}",
                        f"chat rows need {_needs('chat')}; map another name with data.columns: {{messages: your_name}}")
    turns = row[name]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of turns, got {type(turns).__name__}"
                        + (" (empty)" if isinstance(turns, list) else ""))
    messages = []
    system = _field(row, "system", columns, where, "chat", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns, 1):
        here = f"{where}, turn {j}"
        if not isinstance(turn, dict):
            raise DataError(f"{here}: expected an object with role/content (or from/value), got {type(turn).__name__}")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise DataError(f"{here}: unknown role {role!r}", f"use one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{here}: content must be a string, got {type(content).__name__}")
        role = ROLES[role]
        if role == "system" and messages:
            raise DataError(f"{here}: a system turn must come first", "move it to the start of the conversation")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so there is nothing to learn",
                        "add the assistant's answer (role 'assistant', or from 'gpt'), or remove the row")
    while messages[-1]["role"] != "assistant":  # trailing questions have no answer to learn
        messages.pop()
    return messages


def text_document(row, where: str, columns: dict) -> str:
    _check_object(row, where, "text")
    return _field(row, "text", columns, where, "text", required=True)


PARSERS = {"alpaca": alpaca_conversation, "chat": chat_conversation, "text": text_document}
FORMATS = tuple(PARSERS)  # the recipe's data.format choices


def parse_rows(source: Source, fmt: str, columns: dict) -> list:
    """Every row of `source` as a conversation (alpaca, chat) or a document (text)."""
    parse = PARSERS[fmt]
    return [parse(row, source.where(i), columns) for i, row in enumerate(source.rows)]
