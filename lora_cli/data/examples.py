"""Training data: sources -> checked rows -> tokenised, masked examples (SFTData).

The path a recipe's data takes, in order: stream every source's rows (sources.py), detect or
take its format, check and parse the rows, hold out the validation rows, apply sampling
weights, render each conversation into template segments (template.py), tokenise a batch of
segments at a time in one fast-tokenizer call, cut to max_length, write the examples to Arrow
files on disk, optionally pack, and cache the result (cache.py).

Memory grows with the batch (BATCH_ROWS), not the file: rows are read as a stream, parsed rows
that must be sampled (held-out share, weights) wait in an Arrow file, and examples go to an
Arrow file that datasets memory-maps.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

from lora_cli.data import cache
from lora_cli.errors import DataError
from lora_cli.data.formats import SHAPES, detect_format, parse_stream
from lora_cli.data.sources import data_paths, read_source
from lora_cli.data.template import (IGNORE_INDEX, SpecialIds, conversation_segments, encode_segments,
                               resolve_template, tokenize_texts)
from lora_cli.data.token_budget import clip_for_tokens
from lora_cli.data.template import TemplateSpec
from lora_cli.data.batching import FLATTENED, PACKED

MIN_TOKENS = 2  # a sequence needs two tokens for one next-token prediction
BATCH_ROWS = 4096  # rows tokenised per fast-tokenizer call; peak memory follows this, not the file


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)    # reason -> rows
    truncated: Counter = field(default_factory=Counter)  # which side was cut -> rows
    supervised_tokens: int = 0
    total_tokens: int = 0
    sequences: int = 0  # training sequences: examples, text chunks, or packs
    turn_flags: Counter = field(default_factory=Counter)  # messages whose own flag set their loss: supervised / masked
    formats: dict = field(default_factory=dict)  # source -> its format, "(detected)" when data.format is auto
    from_cache: bool = False

    def add(self, other: DataStats) -> None:
        self.rows += other.rows
        self.kept += other.kept
        self.dropped.update(other.dropped)
        self.truncated.update(other.truncated)
        self.supervised_tokens += other.supervised_tokens
        self.total_tokens += other.total_tokens
        self.sequences += other.sequences
        self.turn_flags.update(other.turn_flags)
        self.formats.update(other.formats)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        detected = sorted({f for f in self.formats.values() if f.endswith("(detected)")})
        if detected:
            parts.insert(0, "format " + ", ".join(detected))
        if self.turn_flags:
            parts.append("per-message loss flags: " + ", ".join(f"{n} turns {how}" for how, n in sorted(self.turn_flags.items())))
        if self.dropped:
            parts.append("dropped: " + ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())))
        if self.truncated:
            parts.append("truncated: " + ", ".join(f"{n} {side}" for side, n in sorted(self.truncated.items())))
        if self.total_tokens:
            parts.append(f"{self.supervised_tokens}/{self.total_tokens} tokens supervised "
                         f"({100 * self.supervised_tokens / self.total_tokens:.0f}%)")
        if self.sequences and self.sequences != self.kept:
            parts.append(f"{self.sequences} sequences")
        if self.from_cache:
            parts.append("tokenised data from cache")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped), "truncated": dict(self.truncated),
                "supervised_tokens": self.supervised_tokens, "total_tokens": self.total_tokens, "sequences": self.sequences,
                "turn_flags": dict(self.turn_flags), "formats": self.formats}

    @classmethod
    def from_dict(cls, d: dict) -> DataStats:
        return cls(d["rows"], d["kept"], Counter(d["dropped"]), Counter(d["truncated"]),
                   d["supervised_tokens"], d["total_tokens"], d["sequences"],
                   Counter(d.get("turn_flags", {})), d.get("formats", {}))


# --------------------------------------------------------------------------- truncation

def fit_to_length(prompt: list, response: list, max_length: int, keep_first: int = 0):
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


def _last_supervised_start(labels: list[int]) -> int:
    """Where the last supervised stretch (the final answer) begins; everything before it is
    the prompt side, earlier turns included, so the oldest turns are cut first."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


# --------------------------------------------------------------------------- tokenising

def _example(ids: list[int], labels: list[int]) -> dict:
    """An example; no attention_mask (all ones until the collator pads)."""
    if labels and labels[0] != IGNORE_INDEX:
        labels = [IGNORE_INDEX] + labels[1:]  # position 0 is never predicted (nothing precedes it)
    return {"input_ids": ids, "labels": labels}


def tokenize_conversations(conversations: list, tokenizer, template, max_length: int,
                           train_on: str = "assistant"):
    """Returns (examples, stats). Labels are -100 on prompts and equal input_ids on supervised
    answers + their EOS (not shifted: the model shifts). All segments of all conversations go
    through one fast-tokenizer call. A conversation is a list of messages, or
    {"messages", "tools"} (formats.py)."""
    spec = resolve_template(template)
    stats = DataStats(rows=len(conversations))
    per_row = [conversation_segments(spec, c, tokenizer, train_on=train_on) for c in conversations]
    # a 10 MB message is cut to the ends truncation can keep before it is tokenised (token_budget)
    token_lists = tokenize_texts(tokenizer, [clip_for_tokens(s.text, tokenizer, max_length)
                                             for segments in per_row for s in segments])
    special = SpecialIds.of(tokenizer)
    examples, at = [], 0
    for conversation, segments in zip(conversations, per_row):
        pieces, at = token_lists[at:at + len(segments)], at + len(segments)
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if not any(m["content"].strip() or m.get("tool_calls") for m in messages if m["role"] == "assistant"):
            stats.dropped["empty answer"] += 1
            continue
        stats.turn_flags.update("supervised" if m["train"] else "masked" for m in messages if "train" in m)
        ids, labels = encode_segments(tokenizer, segments, pieces, special=special)
        if len(ids) > max_length:
            split = _last_supervised_start(labels)
            pairs = list(zip(ids, labels))  # cut ids and labels together
            prompt, response, cut = fit_to_length(pairs[:split], pairs[split:], max_length,
                                                 keep_first=1 if special.bos is not None else 0)
            stats.truncated[cut] += 1
            ids, labels = [t for t, _ in prompt + response], [label for _, label in prompt + response]
        example = _example(ids, labels)
        supervised = len(example["labels"]) - example["labels"].count(IGNORE_INDEX)
        if not supervised:
            stats.dropped["no supervised token left after truncation"] += 1
            continue
        examples.append(example)
        stats.supervised_tokens += supervised
        stats.total_tokens += len(example["input_ids"])
    stats.kept = stats.sequences = len(examples)
    return examples, stats


def tokenize_documents(documents: list[str], tokenizer, max_length: int):
    """Raw text for domain training: BOS + text + EOS per document, every token supervised,
    cut into max_length chunks (the first token of a chunk has no context to be predicted from)."""
    stats = DataStats(rows=len(documents))
    special = SpecialIds.of(tokenizer)
    head = [] if special.bos is None else [special.bos]
    token_lists = tokenize_texts(tokenizer, documents)
    examples = []
    for doc, toks in zip(documents, token_lists):
        if not doc.strip():
            stats.dropped["empty text"] += 1
            continue
        ids = head + list(toks) + [special.eos]
        chunks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
        chunks = [c for c in chunks if len(c) >= MIN_TOKENS]
        if len(chunks) > 1:
            stats.truncated["chunked"] += 1
        for chunk in chunks:
            examples.append(_example(chunk, list(chunk)))
            stats.supervised_tokens += len(chunk) - 1
            stats.total_tokens += len(chunk)
        stats.kept += 1
    stats.sequences = len(examples)
    return examples, stats


def tokenize_items(items: list, data_cfg, tokenizer, kind: str = "conversation"):
    """(examples, stats) of parsed rows: documents (kind "document") or conversations."""
    if kind == "document":
        return tokenize_documents(items, tokenizer, data_cfg.max_length)
    return tokenize_conversations(items, tokenizer, _spec(data_cfg), data_cfg.max_length, data_cfg.train_on)


def _spec(data_cfg):
    return TemplateSpec.from_data(data_cfg)


# --------------------------------------------------------------------------- sources, splits, weights

def held_out(items: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """(train, eval): `fraction` of the items, at least one, drawn by rng; order kept."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    n_eval = min(len(items) - 1, max(1, round(len(items) * fraction)))
    chosen = set(rng.sample(range(len(items)), n_eval))
    return ([x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen])


def weighted(items: list, weight: float, rng: random.Random) -> list:
    """Every item int(weight) times, plus a random (weight - int(weight)) share of them once more."""
    whole, part = int(weight), weight - int(weight)
    extra = sorted(rng.sample(range(len(items)), round(len(items) * part))) if part else []
    return items * whole + [items[i] for i in extra]


def source_format(source, data_cfg) -> tuple[str, str]:
    """(format, how it is described): data.format, or the shape detected from the first rows."""
    if data_cfg.format == "auto":
        fmt = detect_format(source, data_cfg.columns)
        return fmt, f"{fmt} (detected)"
    if source.shape and source.shape != data_cfg.format:
        raise DataError(f"{source.name}: .txt / .md documents are format {source.shape}, but data.format is {data_cfg.format}",
                        f"set data.format: {source.shape} (or leave it out), or give {data_cfg.format} rows in a .jsonl file")
    return data_cfg.format, data_cfg.format


@dataclass
class Items:
    """Parsed rows of one split, streamed in order (possibly from several sources)."""
    streams: list = field(default_factory=list)  # callables, each giving an iterator of items
    kinds: dict = field(default_factory=dict)    # source -> "conversation" | "document"
    formats: dict = field(default_factory=dict)  # source -> format as described to the user

    def __iter__(self):
        return chain.from_iterable(stream() for stream in self.streams)

    def kind(self) -> str | None:
        kinds = set(self.kinds.values())
        if len(kinds) > 1:
            docs = [s for s, k in self.kinds.items() if k == "document"]
            raise DataError(f"{', '.join(docs)}: text documents mixed with conversations "
                            f"({', '.join(f'{s}: {self.formats[s]}' for s in self.kinds)})",
                            "train documents and conversations in separate runs, or convert one to the other")
        return next(iter(kinds), None)


def load_items(data_cfg, work: str | None = None) -> tuple[Items, Items]:
    """(train items, eval items) as parsed rows, streamed; nothing is read whole."""
    paths = data_paths(data_cfg.path)
    weights = data_cfg.weights or [1.0] * len(paths)
    train, evaluation = Items(), Items()
    for i, (path, weight) in enumerate(zip(paths, weights)):
        source = read_source(path, data_cfg.split, data_cfg.document_split)
        fmt, described = source_format(source, data_cfg)
        for items in (train, evaluation) if data_cfg.val_fraction > 0 else (train,):
            items.kinds[source.name], items.formats[source.name] = SHAPES[fmt].kind, described
        parsed = lambda source=source, fmt=fmt: parse_stream(source, fmt, data_cfg.columns)  # noqa: E731
        if data_cfg.val_fraction <= 0 and weight == 1:
            train.streams.append(parsed)  # nothing to draw: rows go straight from the file to the tokenizer
            continue
        rows = spill_items(parsed(), work)
        rng = random.Random(data_cfg.seed * 1000 + i)
        kept, held = held_out(list(range(len(rows))), data_cfg.val_fraction, rng)
        train.streams.append(lambda idx=weighted(kept, weight, rng), rows=rows: read_spilled(rows, idx))
        if held:
            evaluation.streams.append(lambda idx=held, rows=rows: read_spilled(rows, idx))
    for path in data_paths(data_cfg.val_path):
        source = read_source(path, data_cfg.split, data_cfg.document_split)
        fmt, described = source_format(source, data_cfg)
        evaluation.kinds[source.name], evaluation.formats[source.name] = SHAPES[fmt].kind, described
        evaluation.streams.append(lambda source=source, fmt=fmt: parse_stream(source, fmt, data_cfg.columns))
    return train, evaluation


# --------------------------------------------------------------------------- Arrow files on disk

_WORK: dict[str, Path] = {}  # parent folder -> this process's work folder in it


def work_file(stem: str, parent: str | None = None) -> Path:
    """A new file in this process's own work folder (under `parent`, else the system's temp
    folder), removed at exit; memory-mapped datasets read from it until then. Under the cache
    folder, a cached file is moved into its entry by a rename, never copied."""
    key = str(parent or "")
    if key not in _WORK:
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        _WORK[key] = Path(tempfile.mkdtemp(prefix=".lora-data-work-", dir=parent))
        atexit.register(shutil.rmtree, _WORK[key], True)
    fd, name = tempfile.mkstemp(prefix=stem + "-", suffix=".arrow", dir=_WORK[key])
    os.close(fd)
    return Path(name)


def batched(iterable, n: int):
    it = iter(iterable)
    while batch := list(islice(it, n)):
        yield batch


def spill_items(items, work: str | None = None):
    """Parsed rows into an Arrow file (one JSON string each), so that sampling can pick rows by
    index without holding them all in memory."""
    import pyarrow as pa
    from datasets import Dataset

    path = work_file("rows", work)
    schema = pa.schema([("item", pa.large_string())])
    with pa.ipc.new_stream(str(path), schema) as writer:
        for batch in batched(items, BATCH_ROWS):
            writer.write_batch(pa.record_batch([pa.array([json.dumps(x, ensure_ascii=False) for x in batch],
                                                         pa.large_string())], schema=schema))
    return Dataset.from_file(str(path))


def read_spilled(rows, indices: list[int]):
    selected = rows.select(indices)
    for batch in selected.iter(batch_size=BATCH_ROWS):
        yield from map(json.loads, batch["item"])


def _int_lists(lists: list[list[int]]):
    """An Arrow list<int32> column from Python lists, through numpy (far quicker than pa.array
    on nested lists)."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    values = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _examples_batch(examples: list[dict]):
    import pyarrow as pa

    columns = {c: _int_lists([e[c] for e in examples]) for c in examples[0]}
    columns["length"] = pa.array([len(e["input_ids"]) for e in examples], pa.int32())
    return pa.record_batch(list(columns.values()), names=list(columns))


def write_examples(batches, stem: str = "examples", work: str | None = None):
    """Batches of examples into one Arrow file, read back as a memory-mapped datasets.Dataset
    (None when there was no example)."""
    import pyarrow as pa
    from datasets import Dataset

    path, writer = work_file(stem, work), None
    try:
        for examples in batches:
            if not examples:
                continue
            batch = _examples_batch(examples)
            if writer is None:
                writer = pa.ipc.new_stream(str(path), batch.schema)
            writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
    return Dataset.from_file(str(path)) if writer is not None else None


def to_dataset(examples: list[dict]):
    """A datasets.Dataset, plus a `length` column for length-grouped batching."""
    return write_examples([examples])


@contextmanager
def paused_gc():
    """The cycle collector off while rows are tokenised: the millions of small lists made here
    hold no cycles and are freed by reference counting, but their number sets off full
    collections that cost about a fifth of the time (measured on 20k rows)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def tokenized_split(items: Items, data_cfg, tokenizer, work: str | None = None):
    """(dataset or None, stats) of one split, tokenised a batch at a time."""
    stats = DataStats()
    kind = items.kind()

    def batches():
        for batch in batched(items, BATCH_ROWS):
            examples, batch_stats = tokenize_items(batch, data_cfg, tokenizer, kind)
            stats.add(batch_stats)
            yield examples

    with paused_gc():
        dataset = write_examples(batches(), work=work)
    stats.formats = dict(items.formats)
    return dataset, stats


# --------------------------------------------------------------------------- packing

def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing: which examples share each sequence of at most max_length tokens
    (indices in data order inside a bin)."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n >= MIN_TOKENS:
            bisect.insort(free, (space - n, b))
    return [sorted(members) for members in bins]


def _join(examples: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
        positions += range(len(ex["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing into sequences of at most max_length tokens. Each pack keeps
    per-example position_ids (restarting at 0), from which attention is made block-diagonal,
    so packed examples never see each other. Every example's first label is already -100, so no
    token is predicted across a boundary."""
    bins = pack_bins([len(e["input_ids"]) for e in examples], max_length)
    return [_join([examples[i] for i in members]) for members in bins]


def lengths_of(dataset) -> list[int]:
    """The length column as a Python list, read in one go (a datasets Column looks values up
    one at a time)."""
    return dataset.with_format("arrow")["length"].to_pylist()


def pack_dataset(dataset, max_length: int, work: str | None = None):
    """pack_examples for a dataset on disk: bins from the length column, packs written a few
    hundred at a time."""
    bins = pack_bins(lengths_of(dataset), max_length)

    def packs():
        for group in batched(bins, 256):
            rows = dataset.select_columns(["input_ids", "labels"])[[i for members in group for i in members]]
            at, out = 0, []
            for members in group:
                n = len(members)
                out.append(_join([{"input_ids": rows["input_ids"][k], "labels": rows["labels"][k]}
                                  for k in range(at, at + n)]))
                at += n
            yield out

    return write_examples(packs(), "packed", work)


# --------------------------------------------------------------------------- the datasets

@dataclass
class SFTData:
    """What the trainer gets: tokenised training rows, held-out rows (None when the recipe
    names no validation data), and what happened to the rows on the way."""
    train: object  # datasets.Dataset with input_ids / labels / length (+ position_ids when packed)
    eval: object | None
    stats: DataStats
    eval_stats: DataStats | None = None


def build_sft_data(data_cfg, tokenizer) -> SFTData:
    """The datasets for a recipe's data section, from the cache when nothing that shapes them
    (data files, tokenizer, template, settings, this code) has changed."""
    folder = cache.entry_folder(data_cfg, tokenizer) if data_cfg.cache else None
    if folder is not None:
        cached = cache.load(folder)
        if cached is not None:
            return _from_cache(*cached)
    data = _build(data_cfg, tokenizer, str(folder.parent) if folder is not None else None)
    meta = {"train": data.stats.to_dict(), "eval": data.eval_stats.to_dict() if data.eval_stats else None}
    if folder is not None and cache.save(folder, data.train, data.eval, meta):
        saved = cache.load(folder)  # the same files, now at their place in the cache
        if saved is not None:
            data = _from_cache(*saved)
            data.stats.from_cache = False
    return data


def _from_cache(train, evaluation, meta: dict) -> SFTData:
    stats = DataStats.from_dict(meta["train"])
    stats.from_cache = True
    eval_stats = DataStats.from_dict(meta["eval"]) if meta.get("eval") else None
    return SFTData(train=train, eval=evaluation, stats=stats, eval_stats=eval_stats)


def _build(data_cfg, tokenizer, work: str | None = None) -> SFTData:
    train_items, eval_items = load_items(data_cfg, work)
    train, stats = tokenized_split(train_items, data_cfg, tokenizer, work)
    if train is None:
        raise DataError(f"{', '.join(data_paths(data_cfg.path))}: every row was dropped ({stats.summary()})",
                        "raise data.max_length or check the rows' answers")
    if data_cfg.packing:
        train = pack_dataset(train, data_cfg.max_length, work)
        stats.sequences = len(train)
    evaluation, eval_stats = None, None
    if eval_items.streams:
        evaluation, eval_stats = tokenized_split(eval_items, data_cfg, tokenizer, work)
        if evaluation is None:
            raise DataError(f"validation data: every row was dropped ({eval_stats.summary()})",
                            "check data.val_path / data.val_fraction")
    return SFTData(train=train, eval=evaluation, stats=stats, eval_stats=eval_stats)


# --------------------------------------------------------------------------- batching

class PadCollator:
    """Right-pads a batch: input_ids with the pad id, labels with -100 (never derived from
    the pad id, so an EOS that doubles as pad stays supervised)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]):
        import torch

        if "position_ids" in features[0]:
            raise ValueError("packed rows need PackedCollator (data.make_collator), or their examples would attend to each other")
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * n + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


class PackedCollator:
    """Batches of packed sequences for sdpa / eager: no attention_mask but position_ids that
    restart for every example, from which transformers builds a block-diagonal causal mask, so
    examples in one pack never attend to each other. Not for flash attention: it reads restarted
    position_ids only in a batch of one row and otherwise attends across the whole row, which is
    why flash attention gets FlattenedCollator.
    It does so only without a KV cache, and a model whose config says use_cache=True makes one
    even in training, silently mixing the examples: hence use_cache=False in every batch.
    Padding becomes one more sequence of its own, with labels -100. Unpacked rows (the eval
    set) work too: each is one sequence."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]):
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": [], "labels": [], "position_ids": []}
        for f in features:
            n, pad = len(f["input_ids"]), longest - len(f["input_ids"])
            positions = list(f["position_ids"]) if "position_ids" in f else list(range(n))
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            batch["position_ids"].append(positions + list(range(pad)))
        return {**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}, "use_cache": False}


class FlattenedCollator:
    """Padding-free batches: the whole batch becomes one row, position_ids restart for every
    example and cu_seq_lens mark where each begins. Variable-length attention
    (flash_attention_2/3) attends within examples from cu_seq_lens, with no dense mask; under
    sdpa / eager, masking_utils makes the block-diagonal mask from the restarted position_ids
    (the cu_seq_lens keywords are ignored there).
    transformers' DataCollatorWithFlattening does the flattening; packed rows are first split
    back into their examples (at each position 0), or a pack would be one long sequence.
    use_cache=False for the reason PackedCollator gives."""

    def __init__(self):
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_flash_attn_kwargs=True)

    def __call__(self, features: list[dict]):
        examples = [piece for f in features for piece in split_pack(f)]
        return {**self.flatten(examples, return_tensors="pt"), "use_cache": False}


def split_pack(feature: dict) -> list[dict]:
    """A packed row's examples (input_ids and labels), cut where position_ids restart; an
    unpacked row is returned as it is."""
    if "position_ids" not in feature:
        return [{"input_ids": feature["input_ids"], "labels": feature["labels"]}]
    positions = list(feature["position_ids"])
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [{"input_ids": list(feature["input_ids"][a:b]), "labels": list(feature["labels"][a:b])}
            for a, b in zip(starts, starts[1:])]


def make_collator(layout: str, tokenizer):
    """The collator for a batch layout (lora_cli.data.batching.batch_layout)."""

    if layout == FLATTENED:
        return FlattenedCollator()
    if layout == PACKED:
        return PackedCollator(tokenizer.pad_token_id)
    return PadCollator(tokenizer.pad_token_id)


def configure_sampling(args, group_by_length: bool):
    """TrainingArguments with length-grouped batches when asked (lengths read from the
    dataset's `length` column, not recomputed)."""
    if group_by_length:
        args.train_sampling_strategy = "group_by_length"
        args.length_column_name = "length"
    return args


def label_runs(example: dict) -> list[tuple[bool, list[int]]]:
    """The example's ids cut into stretches that are all supervised or all masked, in order:
    one prompt and one answer for alpaca, alternating turns for a conversation."""
    ids, labels = example["input_ids"], example["labels"]
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels):
        supervised = label != IGNORE_INDEX
        if runs and runs[-1][0] == supervised:
            runs[-1][1].append(token)
        else:
            runs.append((supervised, [token]))
    return runs
