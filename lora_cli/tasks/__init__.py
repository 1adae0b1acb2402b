"""What a recipe trains the model *for*: `model.task`, one registry every consumer reads.

- causal_lm (the default): a decoder-only language model answers prompts (data.py, template.py).
- classification: AutoModelForSequenceClassification (BERT-like encoders, and decoders with a
  `score` head); rows `text` (+ `text_pair`) and `label`; peft's SEQ_CLS task type trains and
  saves the new head whole (its modules_to_save), LoRA does the rest.
- seq2seq: AutoModelForSeq2SeqLM (T5, BART); rows `source` / `target`, or alpaca rows mapped
  onto them. The encoder input is the prompt the template renders (template.prompt_ids, the
  very ids `lora generate` / `chat` build), the labels are the target alone.

Each Task says which transformers class loads it, which peft task type wraps it, which model
configurations can do it, how its data is built and batched, and how it is evaluated. The
training loop, loading, merging, estimating, linting and sweeping read it here instead of
switching on a string. Nothing here imports torch at module level.

This module is the registry only (it imports errors and nothing else of lora_cli, so the schema,
the loader and the lint can read it). Each entry names its implementation module (`Task.impl`:
causal_lm.py, classification.py, seq2seq.py), whose `HOOKS` answer what the training run and
`lora eval` ask of a task (hooks.py declares those questions and loads the module by name, so
nothing outside a task's own module switches on its name).
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass

from lora_cli.errors import LoraError

CLASSIFICATION_FIELDS = ("text", "text_pair", "label")
SEQ2SEQ_FIELDS = ("source", "target", "instruction", "input", "output", "system")


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str       # the transformers Auto class that loads a base for this task
    peft_task_type: str   # peft.TaskType member
    generates: bool       # lora generate / chat answer with it
    predicts_labels: bool  # lora predict labels rows with it
    fields: tuple         # row fields data.columns may map (empty: data.format decides)
    doc: str              # what it learns, for model.task's doc (the README reference and `lora schema`)
    impl: str             # the module whose HOOKS implement it (tasks/hooks.py loads it by this name)
    auto_mapping: str     # transformers' model_type -> class mapping of auto_class (which bases can do it)
    # prompt + answer as one token stream a decoder reads: rows can be flattened or packed into one
    # sequence, the LM loss fused with the head (Liger), trained on preference pairs (TRL) and shown
    # by `lora data preview`; the other tasks pad their rows through their own collators
    token_stream: bool = False
    # accuracy, macro-F1 and the confusion matrix on held-out rows are what say it learned
    judged_on_held_out: bool = False
    # the recipe problem when data.format names a row shape the task does not read ({format}: the
    # value given); empty: the task reads data.format
    format_problem: str = ""
    model_hint: str = ""  # what the refusal of a base that cannot do the task says first

    def head_size(self, model_cfg) -> int:
        """Outputs of the new head this task trains whole (0: the base's own LM head)."""
        return len(model_cfg.labels or []) if self.predicts_labels else 0

    def next_step(self, adapter_dir, rows=None) -> str:
        """The command that tries a freshly trained adapter of this task (printed at the end of a
        run). A labelling task's runs as printed on `rows`, the run's own data file (it named a
        rows.jsonl that did not exist); without one, the placeholder ROWS.jsonl."""
        if self.predicts_labels:
            return (f"lora predict --adapter {adapter_dir} --file {shlex.quote(str(rows)) if rows else 'ROWS.jsonl'} "
                    "--out preds.jsonl")
        return f'lora generate --adapter {adapter_dir} "..."'

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)

    def can_load(self, config) -> bool:
        """Whether transformers has a model of this kind for `config` (a PretrainedConfig)."""
        import transformers.models.auto.modeling_auto as auto

        # a token stream is read by a decoder alone: an encoder-decoder (T5's causal-LM entry) cannot
        return config.model_type in getattr(auto, self.auto_mapping) and not (self.token_stream and config.is_encoder_decoder)


TASKS = {
    "causal_lm": Task("causal_lm", "AutoModelForCausalLM", "CAUSAL_LM", generates=True, predicts_labels=False,
                      fields=(), doc="prompt -> answer, decoder-only",
                      impl="lora_cli.tasks.causal_lm", auto_mapping="MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
                      token_stream=True),
    "classification": Task("classification", "AutoModelForSequenceClassification", "SEQ_CLS", generates=False,
                           predicts_labels=True, fields=CLASSIFICATION_FIELDS,
                           doc="text -> label; BERT-like or decoder + head",
                           impl="lora_cli.tasks.classification",
                           auto_mapping="MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", judged_on_held_out=True,
                           format_problem="data.format: not read by model.task classification (rows are text, "
                                          "optional text_pair, label); remove data.format"),
    "seq2seq": Task("seq2seq", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", generates=True, predicts_labels=False,
                    fields=SEQ2SEQ_FIELDS, doc="source -> target; T5, BART",
                    impl="lora_cli.tasks.seq2seq", auto_mapping="MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
                    format_problem="data.format: model.task seq2seq reads source/target rows or alpaca rows; "
                                   "{format} is not one of them (remove data.format)",
                    model_hint="seq2seq needs an encoder-decoder model (T5, BART shapes); "),
}
TASK_NAMES = tuple(TASKS)  # the recipe's model.task choices


def get_task(name: str | None) -> Task:
    return TASKS[name or "causal_lm"]


# --------------------------------------------------------------------------- recipe checks (no torch)

def recipe_problems(r) -> list[str]:
    """The task's cross-field checks (part of recipe.cross_checks)."""
    task, problems = get_task(r.model.task), []
    if r.model.labels is not None:
        if not task.predicts_labels:
            readers = ", ".join(t.name for t in TASKS.values() if t.predicts_labels)
            problems.append(f"model.labels: only read by model.task {readers} (task is {task.name}); remove it")
        elif len(r.model.labels) < 2:
            problems.append(f"model.labels: {r.model.labels} names fewer than 2 classes; a classifier needs at least 2")
        else:
            dupes = sorted(n for n, c in Counter(r.model.labels).items() if c > 1)
            if dupes:
                problems.append(f"model.labels: {dupes} listed more than once; each label once, in id order")
    if task.token_stream:  # reads data.format and may pack its rows
        return problems
    if task.predicts_labels and r.eval.metrics:  # the end-of-run eval generates answers; a classifier has none
        generators = " and ".join(t.name for t in TASKS.values() if t.generates)
        problems.append(f"eval.metrics: generation metrics are for {generators} runs; a classifier's eval "
                        "(data.val_fraction) already logs eval_accuracy and eval_macro_f1; remove eval.metrics")
    if r.data.packing:
        packers = ", ".join(t.name for t in TASKS.values() if t.token_stream)
        problems.append(f"data.packing: only for model.task {packers} (task is {task.name}); set data.packing: false")
    fmt = r.data.format if r.data.format not in ("auto",) else "alpaca"  # auto: the task's own rows
    if task.format_problem and fmt != "alpaca":
        problems.append(task.format_problem.format(format=r.data.format))
    return problems


def column_fields(r) -> tuple | None:
    """The row fields data.columns may map for this recipe's task; None = data.format decides."""
    return get_task(r.model.task).fields or None


# --------------------------------------------------------------------------- models

def check_model_can(model_cfg) -> None:
    """Refuse, before loading weights, a base that cannot do model.task (exit 2, folder named)."""
    from transformers import AutoConfig

    task = get_task(model_cfg.task)
    try:
        config = AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError):
        return  # load_base_model reports an unreadable folder in its own words
    if task.can_load(config):
        return
    kinds = [t.name for t in TASKS.values() if t.can_load(config)]
    hint = task.model_hint + (f"this model can do: {', '.join(kinds)}; set model.task to one of them" if kinds else
                              "transformers has no head of any supported kind for this model")
    raise LoraError(f"model.task: {task.name} cannot run on {model_cfg.name_or_path} "
                    f"({config.model_type}: no {task.auto_class} for it)", hint)


def load_kwargs(model_cfg) -> dict:
    """Extra from_pretrained arguments: a labelling head's size and label names."""
    task = get_task(model_cfg.task)
    if not task.predicts_labels:
        return {}
    labels = list(model_cfg.labels or [])
    if not labels:
        raise LoraError("model.labels: unknown, so the classification head cannot be built",
                        f"train with model.task {task.name} (labels are read from the data and saved), "
                        "or list them in model.labels")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)}}


def bind_tokenizer(model, tokenizer) -> None:
    """A decoder classifies from its last non-pad token, so its config must know the pad id the
    batches use (load_tokenizer may have made EOS the pad)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
