"""On-disk cache of tokenised data, so a second run with the same inputs starts at once.

The key covers everything that shapes the tokenised rows: the bytes of every data file, the
tokenizer (vocabulary, merges, special tokens, chat template), the data settings (template,
formats, max_length, packing, ...) and the source of the modules that do the work, so a change
in any of them tokenises again and a stale cache is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

CACHE_VERSION = 2  # 2: one Arrow file per split (memory-mapped), no save_to_disk copy
NOT_IN_KEY = ("path", "val_path", "cache", "cache_dir", "group_by_length")  # files go in by content
CODE = ("data.py", "formats.py", "template.py", "cache.py")  # modules whose output is cached


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir)
    return Path(os.environ.get("LORA_CACHE_DIR") or Path.home() / ".cache" / "lora") / "data"


def _hash_file(h, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def source_fingerprint(path: str, split: str) -> str:
    """A digest of a data source's content: file bytes, every file of a folder, or the
    fingerprint datasets keeps for a hub dataset."""
    h = hashlib.sha256()
    p = Path(path)
    if p.is_file():
        _hash_file(h, p)
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            _hash_file(h, f)
    else:  # a hub id: the fingerprint datasets keeps of what it downloaded
        from lora_cli.formats import load_hub_dataset

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


def code_fingerprint() -> str:
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(data_cfg, tokenizer) -> str:
    from lora_cli.data import paths_of

    settings = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in NOT_IN_KEY}
    material = {
        "version": CACHE_VERSION,
        "settings": settings,
        "train": [source_fingerprint(p, data_cfg.split) for p in paths_of(data_cfg.path)],
        "eval": [source_fingerprint(p, data_cfg.split) for p in paths_of(data_cfg.val_path)],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def entry_folder(data_cfg, tokenizer) -> Path:
    return cache_root(data_cfg) / f"sft-{cache_key(data_cfg, tokenizer)[:24]}"


TRAIN_FILE, EVAL_FILE, STATS_FILE = "train.arrow", "eval.arrow", "stats.json"


def load(folder: Path):
    """The cached SFTData, or None when there is none (or it cannot be read). The Arrow files
    are memory-mapped, not read into memory."""
    from datasets import Dataset

    from lora_cli.data import DataStats, SFTData

    meta_file = folder / STATS_FILE
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        train = Dataset.from_file(str(folder / TRAIN_FILE))
        evaluation = Dataset.from_file(str(folder / EVAL_FILE)) if (folder / EVAL_FILE).is_file() else None
        stats = DataStats.from_dict(meta["train"])
        eval_stats = DataStats.from_dict(meta["eval"]) if meta.get("eval") else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is rebuilt
    stats.from_cache = True
    return SFTData(train=train, eval=evaluation, stats=stats, eval_stats=eval_stats)


def save(folder: Path, data) -> bool:
    """Move the datasets' Arrow files (this process's own work files, see data.work_file) into
    a temporary folder beside the entry, add the stats, and rename the folder into place: a
    run killed half-way, or two runs at once, never leave a half-written entry that looks
    complete, and nothing is copied or read back into memory. False when it could not be
    written (another run wrote it first, the disk is full): the files go back where they were
    and training goes on without caching."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    moved: list[tuple[str, Path]] = []
    try:
        for dataset, name in ((data.train, TRAIN_FILE), (data.eval, EVAL_FILE)):
            if dataset is not None:
                (source,) = [f["filename"] for f in dataset.cache_files]  # the one file data.write_examples wrote
                shutil.move(source, tmp / name)
                moved.append((source, tmp / name))
        meta = {"train": data.stats.to_dict(), "eval": data.eval_stats.to_dict() if data.eval_stats else None}
        (tmp / STATS_FILE).write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, folder)
        return True
    except OSError:
        for source, target in moved:
            shutil.move(target, source)
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
