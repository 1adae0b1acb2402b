"""On-disk cache of tokenised data, so a second run with the same inputs starts at once.

The key covers everything that shapes the tokenised rows: the bytes of every data file, the
tokenizer (vocabulary, merges, special tokens, chat template), the data settings (template,
formats, max_length, packing, ...) and the source of every module of this package that the data
path imports (found by reading the imports, so a new module cannot be left out), so a change in
any of them tokenises again and a stale cache is never read. This module stores datasets and a
stats record; what they mean is data.py's business (it imports this one, never the reverse).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lora_cli.files import atomic
from lora_cli.data.sources import data_paths, load_hub_dataset
from lora_cli.errors import DataError
from lora_cli.files.inputs import refuse_special

CACHE_VERSION = 2  # 2: one Arrow file per split (memory-mapped), no save_to_disk copy
NOT_IN_KEY = ("path", "val_path", "cache", "cache_dir", "group_by_length")  # files go in by content
DATA_PATH = "lora_cli.data.examples"  # the module whose output is cached; what it imports shapes it too


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return Path(os.environ.get("LORA_CACHE_DIR") or Path.home() / ".cache" / "lora") / "data"


def _hash_file(h, path: Path) -> None:
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:  # unreadable data is the user's to fix: name it, no traceback
        raise DataError(f"{path}: cannot be read ({e.strerror or e})", "check the path and its permissions") from None


def source_fingerprint(path: str, split: str) -> str:
    """A digest of a data source's content: file bytes, every file of a folder, or the
    fingerprint datasets keeps for a hub dataset."""
    h = hashlib.sha256()
    p = Path(path)
    refuse_special(p, path)  # a FIFO or device would be read forever, or taken for a hub id
    if p.is_file():
        _hash_file(h, p)
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_file(h, f)
    else:  # a hub id: the fingerprint datasets keeps of what it downloaded
        h.update(load_hub_dataset(path, split)._fingerprint.encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
                   tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def _module_file(name: str, package_dir: Path) -> Path | None:
    """The source file of module `name` ('pkg.sub') of the package in package_dir, if it is one."""
    package, _, rest = name.partition(".")
    if package != package_dir.name:
        return None
    path = package_dir.joinpath(*rest.split(".")) if rest else package_dir
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.AST, module: str) -> set[str]:
    """Every module an `import` statement anywhere in the tree names (inside functions too),
    including `from pkg import sub` where sub may be a module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imported_modules(entry: str, package_dir: Path | None = None) -> dict[str, Path]:
    """`entry` and every module of its package it imports, directly or through another one,
    at module level or inside a function: module name -> source file."""
    package_dir = package_dir or Path(__file__).parents[1]  # lora_cli/, the room's parent
    found: dict[str, Path] = {}
    todo = [entry]
    while todo:
        name = todo.pop()
        path = _module_file(name, package_dir)
        if path is None or name in found:
            continue
        found[name] = path
        todo += _names_in_source(path.read_text(encoding="utf-8"), name)
    return found


@functools.lru_cache(maxsize=1024)
def _names_in_source(source: str, module: str) -> frozenset[str]:
    """_imported_names of a module's source, parsed once per process per content: a data
    command fingerprints the code every time it runs, and parsing some fifty modules cost
    0.2 s each time (most of an in-process `data preview`); keyed by the text, so an edited
    module is parsed anew."""
    return frozenset(_imported_names(ast.parse(source), module))


def code_fingerprint(entry: str = DATA_PATH, package_dir: Path | None = None) -> str:
    """A digest of the source of every module the data path runs."""
    h = hashlib.sha256()
    for name, path in sorted(imported_modules(entry, package_dir).items()):
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(data_cfg, tokenizer) -> str:
    settings = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in NOT_IN_KEY}
    material = {
        "version": CACHE_VERSION,
        "settings": settings,
        "train": [source_fingerprint(p, data_cfg.split) for p in data_paths(data_cfg.path)],
        "eval": [source_fingerprint(p, data_cfg.split) for p in data_paths(data_cfg.val_path)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def entry_folder(data_cfg, tokenizer) -> Path:
    return cache_root(data_cfg) / f"sft-{cache_key(data_cfg, tokenizer)[:24]}"


TRAIN_FILE, EVAL_FILE, STATS_FILE = "train.arrow", "eval.arrow", "stats.json"


def load(folder: Path):
    """(train dataset, eval dataset or None, the stats record saved with them), or None when
    there is no entry (or it cannot be read). The Arrow files are memory-mapped, not read."""
    from datasets import Dataset

    meta_file = folder / STATS_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        train = Dataset.from_file(str(folder / TRAIN_FILE))
        evaluation = Dataset.from_file(str(folder / EVAL_FILE)) if (folder / EVAL_FILE).is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is rebuilt
    return train, evaluation, meta


def save(folder: Path, train, evaluation, meta: dict) -> bool:
    """Move the datasets' Arrow files (this process's own work files, see data.work_file) into
    a staging folder beside the entry, add the stats, and publish it with atomic.publish_folder:
    a run killed half-way, or two runs at once, never leave a half-written entry that looks
    complete, and nothing is copied or read back into memory. False when it could not be
    written (another run wrote it first, the disk is full): the files go back where they were
    and training goes on without caching. (Not atomic.staged_folder: its clean-up would delete
    the moved files, which back the live datasets.)"""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=atomic.STAGED_PREFIX + folder.name + ".", dir=folder.parent))
    moved: list[tuple[str, Path]] = []
    try:
        for dataset, name in ((train, TRAIN_FILE), (evaluation, EVAL_FILE)):
            if dataset is not None:
                (source,) = [f["filename"] for f in dataset.cache_files]  # the one file data wrote
                shutil.move(source, tmp / name)
                moved.append((source, tmp / name))
        (tmp / STATS_FILE).write_text(json.dumps(meta), encoding="utf-8")
        atomic.publish_folder(tmp, folder)
        return True
    except OSError:
        for source, target in moved:
            shutil.move(target, source)
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
