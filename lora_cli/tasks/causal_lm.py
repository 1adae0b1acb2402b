"""model.task causal_lm: rows of any data.format (data/examples.py tokenises, masks, packs and
caches them), the collator of the batch layout, and the conversations `lora eval` asks (the
reference is the last assistant turn; of preference pairs, the chosen answer)."""

from __future__ import annotations

from lora_cli.data.examples import build_sft_data, load_items, make_collator
from lora_cli.data.formats import detect_format, SHAPES
from lora_cli.data.sources import read_source
from lora_cli.data.pairs import PAIR_SHAPES
from lora_cli.errors import DataError
from lora_cli.tasks.hooks import EvalRow, split_reference, TaskHooks


def conversation_rows(path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
    """Any row shape training accepts; the reference is the last assistant turn (of preference
    pairs, the chosen answer)."""

    source = read_source(path)
    if fmt == "auto" and _holds_pairs(source, columns):
        return _pair_rows(source, columns, limit)
    fmt = detect_format(source, columns) if fmt == "auto" else fmt
    if SHAPES[fmt].kind != "conversation":
        raise DataError(f"--data {path}: {fmt} rows are documents, with no answer to compare an answer with",
                        "evaluate alpaca or chat rows (the reference is the last assistant turn)")
    rows = []
    for where, raw in source.stream():
        if limit and len(rows) >= limit:
            break
        messages, tools, reference = split_reference(SHAPES[fmt].parse(raw, where, columns, answered=False))
        if not messages or messages[-1]["role"] not in ("user", "tool"):
            raise DataError(f"{where}: nothing to ask (no user turn before the answer)",
                            "each row needs a question (instruction / user turn) and its answer")
        rows.append(EvalRow(where, messages, tools, reference))
    return rows


def _holds_pairs(source, columns: dict) -> bool:
    """Whether the first row is a preference pair (chosen and rejected: what dpo / orpo / simpo train on)."""
    first = next(iter(source.stream()), (None, None))[1]
    return isinstance(first, dict) and all(first.get(columns.get(f, f)) is not None for f in ("chosen", "rejected"))


def _pair_rows(source, columns: dict, limit: int | None) -> list[EvalRow]:
    """Preference pairs, read and checked as preference training reads them (every pair shape):
    the prompt is asked and the chosen answer is the reference."""

    shape = PAIR_SHAPES[detect_format(source, columns, PAIR_SHAPES)]
    rows = []
    for where, raw in source.stream():
        if limit and len(rows) >= limit:
            break
        pair = shape.parse(raw, where, columns)
        rows.append(EvalRow(where, pair.messages, [], pair.chosen))
    return rows


class CausalLMHooks(TaskHooks):
    def build_data(self, recipe, tokenizer):
        return build_sft_data(recipe.data, tokenizer)  # cached on disk (data/cache.py)

    def make_collator(self, recipe, layout: str, tokenizer):
        return make_collator(layout, tokenizer)  # flattened / packed rows: no cross-attention

    def eval_rows(self, path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
        return conversation_rows(path, fmt, columns, limit)

    def held_out_rows(self, recipe) -> list[EvalRow]:
        """The validation conversations as training split them (data.load_items)."""
        _, held = load_items(recipe.data)
        return [EvalRow(f"validation row {i}", *split_reference(conv)) for i, conv in enumerate(held, 1)]


HOOKS = CausalLMHooks()
