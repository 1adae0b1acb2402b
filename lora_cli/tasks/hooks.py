"""What the training run asks of model.task: its data, collator, Trainer arguments, held-out report
and the lines the plan prints (causal_lm: data/examples.py; the others: classification.py and
seq2seq.py)."""

from __future__ import annotations

import json

from lora_cli.data.examples import build_sft_data
from lora_cli.data.examples import make_collator as causal_collator
from lora_cli.tasks.classification import (ClassificationCollator, ClassificationReport, build_classification_data,
                                           classification_metrics, eval_rows, evaluate_rows, resolve_labels)
from lora_cli.tasks.seq2seq import Seq2SeqCollator, build_seq2seq_data

DRY_RUN_EVAL_ROWS = 512  # the base's held-out report in a dry run reads at most this many rows


def prepare_recipe(recipe) -> None:
    """Fill in what a task reads from the data before anything is saved or compared (resume):
    the label set of a classification run, so it is written with the adapter."""
    if recipe.model.task == "classification" and not recipe.model.labels:
        recipe.model.labels = resolve_labels(recipe)



# --------------------------------------------------------------------------- the training hooks

def build_data(recipe, tokenizer):
    """The datasets for a recipe, by task (causal_lm: data.build_sft_data, cached)."""
    if recipe.model.task == "classification":
        return build_classification_data(recipe, tokenizer)
    if recipe.model.task == "seq2seq":
        return build_seq2seq_data(recipe, tokenizer)
    return build_sft_data(recipe.data, tokenizer)


def make_collator(recipe, layout: str, tokenizer):
    """The task's collator; a causal LM's follows the batch layout (lora_cli.data.batching), the
    other tasks pad their rows."""
    if recipe.model.task == "classification":
        return ClassificationCollator(tokenizer.pad_token_id)
    if recipe.model.task == "seq2seq":
        return Seq2SeqCollator(tokenizer.pad_token_id)
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
