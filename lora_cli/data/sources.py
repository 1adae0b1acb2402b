"""Reading data sources: files (.json, .jsonl, .csv, .parquet, .txt, .md), save_to_disk folders,
folders of documents and hub dataset ids, each a Source that streams (where, row) pairs. Every
problem names the file and row, and how to fix it. What the rows must hold is formats.py's.

Rows are read as a stream (one JSONL line, CSV record, Parquet or Arrow batch at a time), so
memory does not grow with the file; only a .json file (one list) is read whole.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable, Iterator

from lora_cli.errors import DataError
from lora_cli.files.inputs import read_text, refuse_lone_surrogates, refuse_special, utf8_lines

TEXT_SUFFIXES = (".txt", ".md")  # documents, read as format text
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet") + TEXT_SUFFIXES  # files read here (and accepted by the recipe)


@dataclass
class Source:
    """One data source: its name and a way to stream its rows as (where, row) pairs; `where`
    is what error messages call the row ("data.jsonl, row 7 (line 9)")."""
    name: str
    stream: Callable[[], Iterator[tuple[str, object]]]
    shape: str | None = None  # a source that can only hold one shape (.txt / .md: text)

    @property
    def rows(self) -> list:
        return [row for _, row in self.stream()]


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

def read_source(path: str, split: str = "train", document_split: str = "file") -> Source:
    """A streamed source: .json / .jsonl / .csv / .parquet / .txt / .md, a save_to_disk folder,
    a folder of .txt / .md documents, or a hub dataset id."""
    p = Path(path)
    refuse_special(p, path, "lora reads a data file more than once (its format, then its rows): "
                            "save the data to a regular file and point data.path at it")
    if p.is_dir():
        source = _read_folder(p, split, document_split)
    elif p.is_file():
        source = _read_file(p, document_split)
    elif looks_like_hub_id(path):
        source = _arrow_source(path, cache(lambda: load_hub_dataset(path, split)))
    else:
        raise DataError(f"{path}: no such file", "check data.path in the recipe")
    if next(source.stream(), None) is None:
        raise DataError(f"{source.name}: no rows", "the data is empty; add at least one example")
    return source


def read_rows(path: str | Path) -> list[dict]:
    return read_source(str(path)).rows


def _read_file(path: Path, document_split: str = "file") -> Source:
    name = str(path)
    if path.suffix == ".jsonl":
        return Source(name, lambda: _jsonl_rows(path))
    if path.suffix == ".json":
        rows = cache(lambda: _read_json(path))  # one list: parsed once, not per pass over it
        return Source(name, lambda: ((f"{name}, row {i}", row) for i, row in enumerate(rows(), 1)))
    if path.suffix == ".csv":
        return Source(name, lambda: _csv_rows(path))
    if path.suffix == ".parquet":
        return Source(name, lambda: _parquet_rows(path))
    if path.suffix in TEXT_SUFFIXES:
        return Source(name, lambda: _document_rows([path], document_split, name), shape="text")
    raise DataError(f"{path}: unsupported file type {path.suffix!r}",
                    f"use {', '.join(SUFFIXES)}, a folder of .txt / .md files, or a datasets save_to_disk folder")


def _jsonl_rows(path: Path):
    row = 0
    for lineno, line in utf8_lines(path):  # a byte that is not UTF-8 is reported with its line
        if not line.strip():
            continue
        row += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg})",
                            "each line of a .jsonl file must be one JSON object") from None
        # blank lines skipped: say where in the file too
        where = f"{path}, row {row}" if row == lineno else f"{path}, row {row} (line {lineno})"
        if "\\u" in line:  # a lone surrogate can only come from an escape
            refuse_lone_surrogates(value, where)
        yield where, value


def _csv_rows(path: Path):
    # utf8_lines drops Excel's byte-order mark and names the line of a byte that is not UTF-8
    for i, row in enumerate(csv.DictReader(line for _, line in utf8_lines(path)), 1):
        yield f"{path}, row {i}", row


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield f"{path}, row {i}", row
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({e})", "rewrite it, e.g. with pandas.DataFrame.to_parquet") from None


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
    if "\\u" in text:  # a lone surrogate can only come from an escape
        for i, row in enumerate(rows, 1):
            refuse_lone_surrogates(row, f"{path}, row {i}")
    return rows


def _read_folder(path: Path, split: str, document_split: str) -> Source:
    """A save_to_disk folder (it holds dataset_info.json / dataset_dict.json / state.json), or
    a folder of .txt / .md documents (read in name order, subfolders too)."""
    if any((path / marker).is_file() for marker in ("dataset_dict.json", "dataset_info.json", "state.json")):
        return _arrow_source(str(path), cache(lambda: _load_saved_dataset(path, split)))
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{path}: a folder with no .txt / .md files, and not a dataset folder written by save_to_disk",
                        "point data.path at a data file, a folder of .txt / .md documents, or a save_to_disk folder")
    return Source(str(path), lambda: _document_rows(files, document_split, None), shape="text")


def _document_rows(files: list[Path], document_split: str, name: str | None):
    """One {"text"} row per file, or per blank-line-separated paragraph (document_split:
    blank_lines), read line by line; a line that is not UTF-8 is named."""
    for f in files:
        if document_split == "file":
            yield f"{f}", {"text": read_text(f)}
            continue
        lines, n = [], 0
        for _, line in utf8_lines(f):
            if line.strip():
                lines.append(line)
            elif lines:
                n += 1
                yield f"{f}, paragraph {n}", {"text": "".join(lines).rstrip("\n")}
                lines = []
        if lines:
            yield f"{f}, paragraph {n + 1}", {"text": "".join(lines).rstrip("\n")}


def _arrow_source(name: str, load) -> Source:
    """A datasets Dataset (memory-mapped Arrow), streamed in batches."""
    def stream():
        i = 0
        for batch in load().iter(batch_size=1024):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                i += 1
                yield f"{name}, row {i}", dict(zip(columns, values))
    return Source(name, stream)


def _load_saved_dataset(path: Path, split: str):
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
    return ds


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
