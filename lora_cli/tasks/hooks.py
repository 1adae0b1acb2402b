"""What the training run and `lora eval` ask of model.task, answered by the task's own module.

`TaskHooks` declares the questions (data, collator, Trainer arguments, held-out report, plan
lines, the rows `lora eval` asks), with the answer of a task that has nothing to add where one
exists. Each task's module (`Task.impl` in the registry: causal_lm.py, classification.py,
seq2seq.py) defines `HOOKS`, an instance of its subclass; `of(task)` loads that module by name,
so adding a task touches the registry and its module, not this file or its callers. The module
is imported by name (importlib) because the registry, which names it, sits below data/ and may
not import it."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from lora_cli.data.formats import split_conversation
from lora_cli.data.template import tool_calls_text
from lora_cli.tasks import get_task

EVAL_REPORT_FILE = "eval_report.json"  # a run's held-out report (report_held_out), beside its adapter


def of(task: str | None) -> TaskHooks:
    """The hooks of a model.task (None: causal_lm), from the module its registry entry names."""
    hooks = importlib.import_module(get_task(task).impl).HOOKS
    assert isinstance(hooks, TaskHooks), f"{get_task(task).impl}.HOOKS is not a TaskHooks"
    return hooks


def prepare_recipe(recipe) -> None:
    """Fill in what a task reads from the data before anything is saved or compared (resume);
    train, estimate and sweep call it first."""
    of(recipe.model.task).prepare_recipe(recipe)


@dataclass
class EvalRow:
    """A row `lora eval` asks every candidate, as the task reads it."""
    where: str                      # "data.jsonl, row 7": what error messages call the row
    messages: list[dict]            # the conversation before the answer
    tools: list[dict] = field(default_factory=list)
    reference: str | None = None    # the supervised answer: the last assistant turn
    label: str | None = None        # classification rows: the gold label
    labeled: object = None          # classification rows: the tasks.classification.LabeledRow


def split_reference(conversation) -> tuple[list[dict], list[dict], str | None]:
    """(messages before the last assistant turn, tools, that turn's text); no assistant turn:
    (all messages, tools, None)."""

    messages, tools = split_conversation(conversation)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        return list(messages), tools, None
    answer = messages[last]
    text = answer["content"]
    if answer.get("tool_calls"):
        text += ("\n" if text else "") + tool_calls_text(answer["tool_calls"])
    return list(messages[:last]), tools, text if text.strip() else None


class TaskHooks(ABC):
    """What a run asks of a task. The abstract ones every task answers; the others default to
    "nothing to add" (a causal LM's answers)."""

    def prepare_recipe(self, recipe) -> None:
        """Fill in what the task reads from the data (a classifier's label set), so it is saved
        with the adapter and compared on resume."""

    @abstractmethod
    def build_data(self, recipe, tokenizer):
        """The tokenised train (and eval) datasets, with their stats (an SFTData-shaped object)."""

    @abstractmethod
    def make_collator(self, recipe, layout: str, tokenizer):
        """The collator for the batch layout (lora_cli.data.batching) the run chose."""

    def trainer_kwargs(self, recipe, data) -> dict:
        """Extra Trainer arguments (compute_metrics for an eval that reports more than the loss)."""
        return {}

    def eval_gathers_predictions(self, recipe) -> bool:
        """Whether the eval gathers logits for metrics (cheap for a label head; a causal LM's
        vocab-sized logits are not)."""
        return False

    def report_held_out(self, recipe, model, tokenizer, console, heading: str, output_file=None):
        """Print (and, given output_file, write) a report on the held-out rows; None: no report."""
        return None

    def data_report_lines(self, recipe, data) -> list[str]:
        """Extra lines for the plan (a classifier's labels and class balance)."""
        return []

    def example_lines(self, recipe, dataset, tokenizer) -> list[str] | None:
        """One decoded example as the model sees it (None: the causal LM's own masked display)."""
        return None

    @abstractmethod
    def eval_rows(self, path: str, fmt: str, columns: dict, limit: int | None) -> list[EvalRow]:
        """The rows `lora eval --data` asks, read as training reads this task's rows."""

    def held_out_rows(self, recipe) -> list[EvalRow] | None:
        """The validation rows eval.metrics scores at the end of training, split as training
        splits them; None: eval.metrics does not apply (the recipe checks refuse it)."""
        return None
