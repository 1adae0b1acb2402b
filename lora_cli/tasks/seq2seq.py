"""model.task seq2seq: source/target rows (or alpaca rows mapped onto them), the encoder input the
template renders, the target alone as labels, their collator, and the rows `lora eval` asks (the
reference is the target)."""

from __future__ import annotations

from lora_cli.data.examples import DataStats, SFTData
from lora_cli.data.formats import alpaca_conversation
from lora_cli.data.sources import read_source
from lora_cli.data.template import IGNORE_INDEX, prompt_ids, TemplateSpec, tokenize_texts
from lora_cli.data.token_budget import clip_for_tokens
from lora_cli.errors import DataError
from lora_cli.tasks.classification import pad_right, split_items, to_dataset
from lora_cli.tasks.hooks import EvalRow, TaskHooks


# --------------------------------------------------------------------------- seq2seq data

def seq2seq_pair(row, where: str, columns: dict) -> tuple[list[dict], str]:
    """(messages up to the answer, target) of one row: {source, target}, or an alpaca row."""
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


def seq2seq_items(d) -> tuple[list, list]:
    """(train, eval) (messages, target) pairs of a data section, split as every task splits rows."""

    def pairs_of(path):
        source = read_source(path, d.split)
        return [seq2seq_pair(row, where, d.columns) for where, row in source.stream()]

    return split_items(d, pairs_of)


def build_seq2seq_data(recipe, tokenizer):
    d = recipe.data
    spec = TemplateSpec.from_data(d)
    train, evaluation = seq2seq_items(d)
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
        ids, mask = pad_right([f["input_ids"] for f in features], self.pad_token_id)
        labels, _ = pad_right([f["labels"] for f in features], IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------- what the run and `lora eval` ask

def seq2seq_rows(path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
    """source / target rows (or alpaca rows), read by the parser seq2seq training uses; the
    reference is the target."""

    rows = []
    for where, raw in read_source(path).stream():
        if limit and len(rows) >= limit:
            break
        messages, target = seq2seq_pair(raw, where, columns)
        rows.append(EvalRow(where, messages, [], target))
    return rows


class Seq2SeqHooks(TaskHooks):
    def build_data(self, recipe, tokenizer):
        return build_seq2seq_data(recipe, tokenizer)

    def make_collator(self, recipe, layout: str, tokenizer):
        return Seq2SeqCollator(tokenizer.pad_token_id)  # padded rows, whatever the layout

    def example_lines(self, recipe, dataset, tokenizer) -> list[str]:
        example = dataset[1 if len(dataset) > 1 else 0]
        return [f"encoder input:     {tokenizer.decode(example['input_ids'])!r}",
                f"target (labels):   {tokenizer.decode(example['labels'])!r}"]

    def eval_rows(self, path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
        return seq2seq_rows(path, fmt, columns, limit)

    def held_out_rows(self, recipe) -> list[EvalRow]:
        """The validation source/target rows as seq2seq training splits them."""
        _, held = seq2seq_items(recipe.data)
        return [EvalRow(f"validation row {i}", messages, [], target) for i, (messages, target) in enumerate(held, 1)]


HOOKS = Seq2SeqHooks()
