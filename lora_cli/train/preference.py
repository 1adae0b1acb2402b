"""Preference data tokenised, and the TRL trainers behind `train.objective: dpo | orpo | simpo | kto`.

Rows come in the shapes data/pairs.py parses and checks (pairs, alpaca_pairs, chat_pairs,
sharegpt_pairs, implicit_pairs; unpaired for kto). A chosen / rejected side is a string, an assistant message ({"role", "content"} or {"from", "value"})
or a list of messages ending in the answer. Every row becomes (prompt messages, answer[s]) and is
rendered through template.py (conversation_segments + encode_segments: the path SFT and inference
take), so the adapter's saved template is the one the pairs were trained with. The ids go to
TRL already tokenised; the prompt is masked (TRL's completion mask covers the answer and its EOS).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from lora_cli.data.examples import DataStats, fit_to_length, held_out, weighted
from lora_cli.errors import DataError
from lora_cli.data.sources import data_paths
from lora_cli.train.objectives import PAIRS, UNPAIRED, objective_of
from lora_cli.data.template import (adds_bos, conversation_segments, encode_segments, IGNORE_INDEX,
                                    segment_token_lists, TemplateSpec)
from lora_cli.model.adapters import BASE_CHANGING_INITS
from lora_cli.model.load import load_tokenizer
from lora_cli.ui.terminal import plain
from lora_cli.data.pairs import Labelled, Pair, read_preference_rows



# --------------------------------------------------------------------------- tokenising

def render(spec, tokenizer, messages: list[dict], answer: str, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + EOS) of one answer to a prompt, through the template path SFT
    and inference share: the prompt ids are exactly those `lora generate` builds for it.
    max_length: what _fit keeps, so a 10 MB field is never tokenised whole (segment_token_lists)."""

    segments = conversation_segments(spec, messages + [{"role": "assistant", "content": answer}], tokenizer,
                                     train_on="last")
    ids, labels = encode_segments(tokenizer, segments, segment_token_lists(tokenizer, segments, max_length))
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:start], ids[start:]


def _fit(prompt: list[int], answers: list[list[int]], max_length: int, keep_first: int, stats: DataStats):
    """Cut like SFT (fit_to_length: the prompt's oldest tokens first, never below half the budget,
    then the answers' ends), so that the longest answer fits; what was cut is counted."""
    longest = max(answers, key=len)
    kept, _, cut = fit_to_length(prompt, longest, max_length, keep_first)
    if cut:
        stats.truncated[cut] += 1
    room = max_length - len(kept)
    return kept, [a[:room] for a in answers]


def tokenize_pairs(pairs: list[Pair], tokenizer, spec, max_length: int) -> tuple[list[dict], DataStats]:
    stats = DataStats(rows=len(pairs))
    keep_first = 1 if adds_bos(tokenizer) else 0
    examples = []
    for pair in pairs:
        prompt, chosen = render(spec, tokenizer, pair.messages, pair.chosen, max_length)
        prompt_r, rejected = render(spec, tokenizer, pair.messages, pair.rejected, max_length)
        if prompt != prompt_r:  # a chat template whose prompt text depends on the answer
            raise DataError(f"{pair.where}: data.template {spec.name} renders this prompt differently before the "
                            "chosen and the rejected answer, so they would not answer the same prompt",
                            "use data.template human_assistant (or a template whose prompt does not depend on the answer)")
        prompt, (chosen, rejected) = _fit(prompt, [chosen, rejected], max_length, keep_first, stats)
        examples.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
        stats.supervised_tokens += len(chosen) + len(rejected)
        stats.total_tokens += 2 * len(prompt) + len(chosen) + len(rejected)
    stats.kept, stats.sequences = len(examples), 2 * len(examples)
    return examples, stats


def tokenize_labelled(rows: list[Labelled], tokenizer, spec, max_length: int) -> tuple[list[dict], DataStats]:
    stats = DataStats(rows=len(rows))
    keep_first = 1 if adds_bos(tokenizer) else 0
    examples = []
    for row in rows:
        prompt, completion = render(spec, tokenizer, row.messages, row.completion, max_length)
        prompt, (completion,) = _fit(prompt, [completion], max_length, keep_first, stats)
        examples.append({"prompt_ids": prompt, "completion_ids": completion, "label": row.label})
        stats.supervised_tokens += len(completion)
        stats.total_tokens += len(prompt) + len(completion)
    stats.kept = stats.sequences = len(examples)
    return examples, stats


TOKENIZERS = {PAIRS: tokenize_pairs, UNPAIRED: tokenize_labelled}


@dataclass
class PreferenceData:
    """What the trainer gets for a preference run (the shape of data.SFTData)."""
    train: object  # datasets.Dataset: prompt_ids + chosen_ids / rejected_ids, or completion_ids / label
    eval: object | None
    stats: DataStats
    eval_stats: DataStats | None = None


def _to_dataset(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(examples)


def build_preference_data(recipe, tokenizer) -> PreferenceData:
    """Rows read and checked (exit 2 naming file, row and field), split, rendered and tokenised."""

    d, kind = recipe.data, objective_of(recipe).rows
    spec = TemplateSpec.from_data(d)
    train, held, formats = [], [], {}
    paths = data_paths(d.path)
    for i, (path, weight) in enumerate(zip(paths, d.weights or [1.0] * len(paths))):
        rows, shape = read_preference_rows(path, d.split, d.columns, kind)
        formats[path] = f"{shape} (detected)"
        rng = random.Random(d.seed * 1000 + i)  # the draws SFT's load_items makes: same split, same sampling
        kept, out = held_out(list(range(len(rows))), d.val_fraction, rng) if d.val_fraction > 0 else (range(len(rows)), [])
        train += [rows[k] for k in (weighted(list(kept), weight, rng) if weight != 1 else kept)]
        held += [rows[k] for k in out]
    for path in data_paths(d.val_path):
        held += read_preference_rows(path, d.split, d.columns, kind)[0]
    _check_labels(recipe, train)
    examples, stats = TOKENIZERS[kind](train, tokenizer, spec, d.max_length)
    stats.formats = formats
    data = PreferenceData(_to_dataset(examples), None, stats)
    if held:
        eval_examples, data.eval_stats = TOKENIZERS[kind](held, tokenizer, spec, d.max_length)
        data.eval = _to_dataset(eval_examples)
    return data


def _check_labels(recipe, rows: list) -> None:
    """KTO learns from both kinds of answer: data with only one kind cannot teach it."""
    if objective_of(recipe).rows != UNPAIRED:
        return
    counts = Counter(r.label for r in rows)
    if len(counts) < 2:
        only = "good (label true)" if True in counts else "bad (label false)"
        raise DataError(f"{', '.join(data_paths(recipe.data.path))}: every row is {only}; kto needs both good and bad answers",
                        "add rows of the other kind (or use train.objective sft on the good ones)")


# --------------------------------------------------------------------------- showing a row

def example_lines(recipe, dataset, tokenizer) -> list[str]:
    """One row as the model sees it: the masked prompt and what is supervised on each side."""
    ex = dataset[1 if len(dataset) > 1 else 0]
    lines = [f"prompt (masked):     {tokenizer.decode(ex['prompt_ids'])!r}"]
    if "chosen_ids" in ex:
        lines += [f"chosen (supervised): {tokenizer.decode(ex['chosen_ids'])!r}",
                  f"rejected (supervised): {tokenizer.decode(ex['rejected_ids'])!r}"]
    else:
        lines.append(f"completion ({'good' if ex['label'] else 'bad'}, supervised): {tokenizer.decode(ex['completion_ids'])!r}")
    return lines


def summary_lines(data: PreferenceData) -> list[str]:
    kind = "pairs" if "chosen_ids" in data.train.column_names else "labelled answers"
    lines = [f"{len(data.train)} {kind}; {data.stats.summary()}"]
    if kind != "pairs":
        counts = Counter(data.train["label"])
        lines.append(f"labels  {counts.get(True, 0)} good, {counts.get(False, 0)} bad")
    return lines


# --------------------------------------------------------------------------- the trainer

def _pass_through_prepare(self, dataset, processing_class, args, dataset_name):
    """Our rows arrive tokenised by template.py (the path inference shares); TRL 1.16's DPO and
    KTO trainers have no public switch for pre-tokenised rows, so their own preparation (which
    would re-render text through the tokenizer's chat template) is skipped here."""
    return dataset


def _kl_rows(examples: dict) -> dict:
    examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
    return examples


def _kto_prepare(self, dataset, processing_class, args, dataset_name):
    """As _pass_through_prepare, plus the one step of TRL's KTO preparation that is not
    tokenising: the mismatched (KL) completion of each row, the completions rotated by one within
    each batch, exactly as kto_trainer._prepare_dataset builds them."""
    if not self.calculate_KL:
        return dataset
    return dataset.map(_kl_rows, batched=True, batch_size=args.per_device_train_batch_size)


def _tokenize_row_from_ids(self, feature, model=None) -> dict:
    """ORPO / CPO's public per-row hook: build their fields from our ids instead of from text."""
    prompt = list(feature["prompt_ids"])
    out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        ids = prompt + list(feature[f"{side}_ids"])
        out[f"{side}_input_ids"] = ids
        out[f"{side}_attention_mask"] = [1] * len(ids)
        out[f"{side}_labels"] = [-100] * len(prompt) + list(feature[f"{side}_ids"])
    return out


HOOKS = {"trl:DPOTrainer": {"_prepare_dataset": _pass_through_prepare},
         "trl:KTOTrainer": {"_prepare_dataset": _kto_prepare},
         "trl.experimental.orpo:ORPOTrainer": {"tokenize_row": _tokenize_row_from_ids},
         "trl.experimental.cpo:CPOTrainer": {"tokenize_row": _tokenize_row_from_ids}}


def trainer_class(objective, safe_trainer):
    """The objective's TRL trainer under our SafeTrainer (non-finite guard, exact resume of the
    logged loss), reading our tokenised rows."""
    base = objective.trl_class("trainer")
    return type(f"Safe{base.__name__}", (safe_trainer, base),
                {**HOOKS[objective.trainer], "reports_perplexity": False})  # a preference loss is no LM loss


def training_config(objective, recipe, kwargs: dict):
    """The TRL config: our TrainingArguments keywords plus the objective's own settings."""
    cls = objective.trl_class("config")
    extra = {"max_length": recipe.data.max_length}  # rows are cut already; this only bounds the collator
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    if "disable_dropout" in names:
        extra["disable_dropout"] = True  # policy and reference must see the same network (TRL's default)
    if "dataset_num_proc" in names:
        extra["dataset_num_proc"] = None
    return cls(**kwargs, **extra, **objective.config_kwargs(recipe))


def setup_trainer(recipe, model, tokenizer, data, kwargs: dict, callbacks: list, carried_loss, safe_trainer):
    """The trainer of a preference run: TRL's, with our callbacks and rows. With peft and no
    ref_model, TRL's reference pass runs the same model with the adapter disabled (or, when
    lora.init_from loaded a trained adapter, a frozen copy of that adapter): one base in memory."""
    from transformers.trainer_callback import PrinterCallback

    import datasets

    datasets.disable_progress_bars()  # TRL maps our rows once more; its bars would land on stderr
    objective = objective_of(recipe)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = trainer_class(objective, safe_trainer)(
        model=model,
        args=training_config(objective, recipe, kwargs),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        carried_loss=carried_loss,
    )
    trainer.remove_callback(PrinterCallback)
    if not starts_trained(recipe):
        drop_reference_copy(trainer.model)
    return trainer


REFERENCE_ADAPTER = "ref"  # the frozen copy of the start adapter TRL's DPO / KTO trainers add to a PeftModel


def starts_trained(recipe) -> bool:
    """Whether the adapter training starts from already differs from the base: a lora.init_from
    adapter, or an init that rewrites the base weights (pissa / olora: the base with the adapter
    off is no longer the original model). Then TRL's frozen copy of it is the reference."""

    return bool(recipe.lora.init_from) or recipe.lora.init in BASE_CHANGING_INITS


def reference_description(recipe) -> str:
    if recipe.lora.init_from:
        return "the adapter of lora.init_from (a frozen copy of its start)"
    if starts_trained(recipe):
        return f"a frozen copy of the {recipe.lora.init}-initialised adapter (the base weights were rewritten)"
    return "the base with the adapter disabled"


def drop_reference_copy(model) -> None:
    """A new adapter starts as the identity (B = 0), so the reference is exactly the base with the
    adapter disabled, which is what TRL computes when no reference adapter exists: the copy it
    made is dropped, leaving one base and one adapter in memory."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)


def finished_model(model):
    """The trained adapter alone: a frozen reference copy is not part of the result (also not
    of an SFT run, where there is none)."""
    drop_reference_copy(model)
    return model


def preview_pairs(recipe, console, rows: int = 3) -> None:
    """`lora data preview` for a preference recipe: each shown row's prompt (masked) and what is
    supervised on each side, then the counts."""
    from rich.text import Text

    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.trust_remote_code)
    data = build_preference_data(recipe, tokenizer)
    console.print(f"[bold]data[/]      {recipe.data.path} (objective {recipe.train.objective}, "
                  f"format {', '.join(sorted(set(data.stats.formats.values())))}, template {recipe.data.template}, "
                  f"max_length {recipe.data.max_length})")
    rule = "--" if plain() else "──"
    for i in range(min(rows, len(data.train))):
        ex = data.train[i]
        # each line says in words what is masked and what is supervised: colour only repeats it
        console.print(Text(f"{rule} row {i + 1}", style="bold"))
        console.print(Text("  prompt (masked): ", style="bold").append(tokenizer.decode(ex["prompt_ids"]), style="dim"))
        sides = (("chosen (supervised)", "chosen_ids"), ("rejected (supervised)", "rejected_ids")) if "chosen_ids" in ex \
            else ((f"completion ({'good' if ex['label'] else 'bad'}, supervised)", "completion_ids"),)
        for label, column in sides:
            console.print(Text(f"  {label}: ", style="bold").append(tokenizer.decode(ex[column]), style="green"))
    for line in summary_lines(data):
        console.print(line, highlight=False, markup=False)
    if data.eval is not None:
        console.print(f"[bold]eval[/]      {len(data.eval)} held-out rows")
