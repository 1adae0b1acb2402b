"""The recipe: one schema that declares every key, its type, default and meaning.

The same schema validates YAML files, types `--set` overrides, and renders the
README's recipe reference (`lora recipe-keys`). Nothing here imports torch, so
`lora check` and every validation error answer instantly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lora_cli.errors import LoraError, RecipeError
from lora_cli.data.formats import FORMATS, SHAPES
from lora_cli.data.sources import SUFFIXES, data_paths, looks_like_hub_id
from lora_cli.files.inputs import clip, read_text, shorten, special_kind
from lora_cli.files.yaml_input import MAX_YAML_BYTES, safe_yaml
from lora_cli.model.methods import METHOD_NAMES, METHODS
from lora_cli.train.objectives import (beta_doc, column_fields as objective_fields, LOSS_TYPES, OBJECTIVE_KEYS,
                                       OBJECTIVE_NAMES, OBJECTIVES, recipe_problems as objective_problems)
from lora_cli.data.template import TEMPLATE_NAMES, placeholder_problems
from lora_cli.tasks import TASK_NAMES, TASKS, column_fields, recipe_problems
from lora_cli.files import atomic, ownership
from lora_cli.eval.metrics import METRICS, metric_name_problems

PATH = "path"  # metadata kind: resolved against the recipe's folder


class _Required:
    def __repr__(self):
        return "required"

    def __deepcopy__(self, memo):  # dataclasses.asdict copies defaults; keep the one sentinel
        return self


REQUIRED: Any = _Required()  # default of keys a recipe must set


SEED_MAX = 2**32 - 1  # numpy's seed range (transformers' set_seed seeds numpy too)


def key(default, doc: str, *, kind: str | None = None, min: float | None = None,
        max: float | None = None, below: float | None = None, factory=None):
    """Declare one recipe key. `doc` is the one line the README and errors show; min / max
    bound a number inclusively, below exclusively (dropout < 1)."""
    meta = {"doc": doc, "kind": kind, "min": min, "max": max, "below": below}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = key(REQUIRED, "Base model: a local folder (relative to the recipe) or a hub id.", kind=PATH)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = key("auto", "Weights' dtype when loaded; auto = bfloat16 on a GPU that has it, else float32.")
    quantization: Literal["none", "8bit", "4bit"] = key("none", "none, 8bit (LLM.int8) or 4bit (NF4 + double quantization = QLoRA). Needs bitsandbytes.")
    trust_remote_code: bool = key(False, "Run code shipped with the model. Off unless you trust its author.")
    attn_implementation: Optional[Literal["auto", "sdpa", "flash_attention_2", "eager"]] = key("auto", "Attention kernel; auto (or empty) = flash_attention_2 on a GPU where flash-attn is installed and the model supports it, else sdpa where the model has it, else eager.")
    task: Literal[TASK_NAMES] = key("causal_lm", "What the model learns: " + ", ".join(f"{t.name} ({t.doc})" for t in TASKS.values()) + ".")
    labels: Optional[list[str]] = key(None, "classification: label names in id order (rows' label: a name or an id into this list); empty = read from the training data, sorted, and saved with the adapter.")


# Presets from the hyperparameter guide, mapped to the model's own module names at load time
# (Llama q_proj/v_proj, bloom query_key_value, gpt2 c_attn, ...) by lora_cli.model.targets.
TARGET_PRESETS = ("attention-qv", "attention", "all-linear")

@dataclass
class LoraConfig:
    method: Literal[METHOD_NAMES] = key("lora", "PEFT method: " + "; ".join(m.doc for m in METHODS.values()) + ".")
    r: int = key(8, "Rank of the update B·A. More = more capacity and memory; 8-64 is usual.", min=1)
    alpha: float = key(16, "Scaling numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).", min=0)
    dropout: float = key(0.05, "Dropout on the LoRA input; 0.05-0.1 is usual, 0 for short runs.", min=0, below=1)
    init: Literal["gaussian", "kaiming", "pissa", "olora"] = key("gaussian", "Start of A and B: gaussian = A ~ N(0, 1/r), B = 0 (the source article's LoRA); kaiming = peft's default (Kaiming-uniform A, B = 0); pissa / olora start from the base weights' SVD / QR (and change the base; redone at every load).")
    target_modules: Union[list[str], str] = key(None, "Modules to adapt: 'attention-qv', 'attention', 'all-linear' (presets for any architecture), a list of names, or a regex on full module names.", factory=lambda: ["q_proj", "v_proj"])
    bias: Literal["none", "all", "lora_only"] = key("none", "Which biases train too: none, all, or those of adapted modules.")
    modules_to_save: list[str] = key(None, "Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).", factory=list)
    num_virtual_tokens: int = key(20, "prompt_tuning / prefix_tuning: learned virtual tokens put before every input.", min=1)
    prompt_init_text: Optional[str] = key(None, "prompt_tuning: start the virtual tokens from this text's embeddings (empty = random).")
    adapter_dtype: Literal["float32", "bfloat16"] = key("float32", "Dtype of the trained adapter weights (and so of their gradients and AdamW state): float32 (peft's default) or bfloat16 (the QLoRA paper's; half the memory, for bf16-capable hardware).")
    init_from: Optional[str] = key(None, "Start from this trained adapter folder (e.g. runs/sft) instead of a new adapter; its own rank, targets and method are kept. With dpo / kto it is also the reference policy.", kind=PATH)


@dataclass
class DataConfig:
    path: Union[str, list[str]] = key(REQUIRED, f"Training data: {', '.join(SUFFIXES)} (.txt / .md are documents; a folder of them too), a save_to_disk folder or a hub dataset id (relative to the recipe); a list mixes several.", kind=PATH)
    weights: Optional[list[float]] = key(None, "Sampling weight per path: 2 = every row twice, 0.5 = a random half (data.seed); empty = 1 each.")
    split: str = key("train", "Split read from a hub dataset or a save_to_disk folder holding several splits.")
    format: Literal[FORMATS] = key("auto", "Row shape: " + "; ".join(f"{s.name} = {s.doc}" for s in SHAPES.values()) + "; auto = detected from each file's first rows (and said).")
    document_split: Literal["file", "blank_lines"] = key("file", ".txt / .md documents: one per file, or one per blank-line-separated paragraph.")
    columns: dict[str, str] = key(None, "Field names in your files, our name -> yours, e.g. {instruction: question, output: answer}.", factory=dict)
    template: Literal[TEMPLATE_NAMES] = key("human_assistant", "Prompt template (saved with the adapter so inference renders the same prompt); chat_template = the tokenizer's own, custom = data.prompt_format.")
    prompt_format: Optional[str] = key(None, "Custom template's user turn, with {instruction} and optionally {input}, e.g. \"<|user|>\\n{instruction}\\n<|assistant|>\\n\".")
    system_format: Optional[str] = key(None, "How a system turn reads, with {system}; empty = \"System: {system}\\n\\n\".")
    turn_separator: Optional[str] = key(None, "Text after an assistant turn's EOS, before the next turn; empty = the template's own.")
    system_prompt: Optional[str] = key(None, "System message for conversations that have none (training and inference).")
    train_on: Literal["assistant", "last", "all"] = key("assistant", "Supervised tokens: every assistant turn, only the last one, or all text (prompts too).")
    max_length: int = key(256, "Tokens per example after truncation (prompt side is cut first); text documents are chunked to it.", min=8)
    val_path: Optional[Union[str, list[str]]] = key(None, "Held-out data for evaluation (same formats as path).", kind=PATH)
    val_fraction: float = key(0.0, "Share of each training source held out for evaluation when val_path is empty (fixed by data.seed).", min=0, max=0.5)
    seed: int = key(42, "Seed for the validation split and weighted sampling.", min=0, max=SEED_MAX)
    packing: Optional[bool] = key(None, "true = best-fit examples into max_length sequences (positions restart, no cross-attention); false = one example per row; empty = padding-free batches (each forward pass's examples flattened into one row, positions restarting) with flash attention, and with sdpa/eager when the model masks by position ids and the batch shape is left empty; else one example per row.")
    group_by_length: Optional[bool] = key(None, "Batch examples of similar length together (less padding); empty = on when batches hold several padded rows.")
    cache: bool = key(True, "Reuse tokenised data from an earlier run with the same data, tokenizer, template and settings.")
    cache_dir: Optional[str] = key(None, "Where tokenised data is cached; empty = $LORA_CACHE_DIR or ~/.cache/lora.", kind=PATH)


DATA_FIELDS = {name: shape.fields for name, shape in SHAPES.items()}  # format -> the fields data.columns may map
DATA_FIELDS["auto"] = tuple(dict.fromkeys(f for fields in list(DATA_FIELDS.values()) for f in fields))


def _data_path_problems(key_name: str, value) -> list[str]:
    problems = []
    paths = data_paths(value)
    if key_name == "data.path" and not paths:
        problems.append("data.path: empty list; name at least one data file")
    for p in paths:
        path = Path(p)
        if not os.path.exists(path):  # os.path: False (not an error) for a name too long
            if not looks_like_hub_id(p):
                problems.append(f"{key_name}: {clip(p)} does not exist; point it at a {'/'.join(SUFFIXES)} file, "
                                "a save_to_disk folder or a hub dataset id (a relative path is read from the recipe's folder, one given with --set from the current folder)")
        elif special_kind(path):  # a FIFO cannot be read twice; /dev/zero never ends
            problems.append(f"{key_name}: {clip(p)}: is {special_kind(path)}, not a file; lora reads a data file "
                            "more than once, so save the data to a regular file and point the key at it")
        elif os.path.isfile(path) and path.suffix not in SUFFIXES:
            problems.append(f"{key_name}: {clip(p)} has suffix {shorten(path.suffix)}; use {', '.join(SUFFIXES)} "
                            "or a datasets save_to_disk folder")
    return problems


def data_problems(d: DataConfig, task_fields: tuple | None = None) -> list[str]:
    """The data section's cross-field checks (part of cross_checks); task_fields: the row fields
    of a non-causal model.task (lora_cli.tasks), which data.columns may map instead."""
    problems = _data_path_problems("data.path", d.path) + _data_path_problems("data.val_path", d.val_path)
    if d.weights is not None:
        if len(d.weights) != len(data_paths(d.path)):
            problems.append(f"data.weights: {len(d.weights)} weights for {len(data_paths(d.path))} paths; "
                            "give one weight per entry of data.path")
        if any(w <= 0 for w in d.weights):
            problems.append(f"data.weights: {shorten(d.weights)} has a weight <= 0; drop that path instead")
    fields = task_fields or DATA_FIELDS[d.format]
    for ours in d.columns:
        if ours not in fields:
            problems.append(f"data.columns: {shorten(ours)} is not a field of {'this task' if task_fields else 'format ' + d.format}"
                            f"{_did_you_mean(ours, fields)}; map one of: {', '.join(fields)} (our name -> yours)")
    if d.template == "custom" and not d.prompt_format:
        problems.append("data.prompt_format: required by template: custom; e.g. \"<|user|>\\n{instruction}\\n<|assistant|>\\n\"")
    if d.prompt_format is not None:
        if d.template != "custom":
            problems.append(f"data.prompt_format: only used by template: custom (template is {d.template}); "
                            "set template: custom or remove prompt_format")
        problems += placeholder_problems("prompt_format", d.prompt_format)
    if d.system_format is not None:
        problems += placeholder_problems("system_format", d.system_format)
    if d.val_path is not None and d.val_fraction > 0:
        problems.append("data.val_fraction: set together with data.val_path; use one of them")
    return problems


# train.optimizer: the Trainer's own optimizer names (transformers' OptimizerNames) that
# `lora estimate` knows how to count. Those from bitsandbytes need it installed (preflight).
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
              "lion_8bit", "paged_lion_8bit", "adafactor", "sgd")
BITSANDBYTES_OPTIMIZERS = frozenset(o for o in OPTIMIZERS if "8bit" in o or o.startswith("paged_"))


@dataclass
class TrainConfig:
    epochs: float = key(1, "Passes over the data (ignored when max_steps > 0).", min=0)
    max_steps: int = key(-1, "Stop after this many optimizer steps; -1 = run all epochs.", min=-1)
    learning_rate: float = key(1.0e-4, "Peak learning rate. LoRA: 1e-4 to 5e-4; QLoRA: 5e-5 to 2e-4.", min=0)
    batch_size: Optional[int] = key(None, "Examples (or packs) per device per forward pass; empty = as many as train.tokens_per_batch holds, up to 8 (with gradient_accumulation set: 1).", min=1)
    gradient_accumulation: Optional[int] = key(None, "Forward passes per optimizer step; effective batch = batch_size x this x devices; empty = what makes 8 examples per step (with batch_size set: 8).", min=1)
    tokens_per_batch: Optional[int] = key(None, "Token budget of one forward pass when batch_size and gradient_accumulation are empty: batch_size = this / data.max_length (a power of two, 1 to 8); empty = sized from the free memory of a CUDA GPU through the estimate, 4096 elsewhere. Set it if a run runs out of memory.", min=1)
    warmup_steps: int = key(100, "Linear warm-up steps for the learning rate.", min=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = key("linear", "Learning-rate schedule after warm-up.")
    weight_decay: float = key(0.0, "AdamW weight decay on trainable parameters.", min=0)
    max_grad_norm: float = key(1.0, "Gradient clipping norm; 0 disables.", min=0)
    logging_steps: int = key(10, "Log loss every N optimizer steps.", min=1)
    save_steps: int = key(0, "Write a checkpoint every N optimizer steps; 0 = once per epoch.", min=0)
    save_total_limit: Optional[int] = key(3, "Keep at most this many checkpoints (oldest removed); empty = keep all.", min=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = key("auto", "Mixed precision; auto = bf16 on a GPU that has it, fp32 on CPU.")
    gradient_checkpointing: bool = key(False, "Recompute activations in backward: much less memory, ~30% slower.")
    kernels: Literal["auto", "none", "liger"] = key("auto", "Fused training kernels: liger = Liger Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) via the Trainer's use_liger_kernel; needs a CUDA GPU and the liger-kernel package; auto = liger on a CUDA GPU where liger-kernel is installed, else none.")
    optimizer: Literal[OPTIMIZERS] = key("adamw_torch", "Optimizer (the Trainer's names): adamw_torch; adamw_torch_fused (GPU); adamw_8bit / paged_adamw_8bit (8-bit state, a quarter of AdamW's; paged spills to CPU RAM on memory spikes: QLoRA's); paged_adamw_32bit; lion_8bit / paged_lion_8bit (one 8-bit moment); adafactor (factored second moment); sgd (no state). 8-bit and paged ones need bitsandbytes.")
    seed: int = key(42, "Seed for data order, LoRA initialisation and dropout.", min=0, max=SEED_MAX)
    eval_steps: int = key(0, "Evaluate on the eval split (data.val_path / val_fraction) every N optimizer steps; 0 = once per epoch.", min=0)
    report_to: list[Literal["tensorboard", "wandb"]] = key(None, "Also log to these trackers (each must be installed): tensorboard, wandb.", factory=list)
    fsdp: str = key("", "FSDP sharding for multi-GPU runs, as TrainingArguments.fsdp: e.g. 'full_shard auto_wrap'; empty = DDP.")
    fsdp_config: Optional[str] = key(None, "JSON file of FSDP options (TrainingArguments.fsdp_config, e.g. recipes/fsdp/qlora.json), relative to the recipe.", kind=PATH)
    deepspeed: Optional[str] = key(None, "DeepSpeed config JSON (recipes/deepspeed/zero2.json or zero3.json), relative to the recipe; or leave empty and launch with accelerate's recipes/accelerate/deepspeed_zero*.yaml.", kind=PATH)
    objective: Literal[OBJECTIVE_NAMES] = key("sft", "What the adapter learns from: " + "; ".join(o.doc for o in OBJECTIVES.values()) + ". See docs/preference.md.")
    beta: Optional[float] = key(None, beta_doc(), min=0)
    loss_type: Optional[Literal[LOSS_TYPES]] = key(None, "dpo: sigmoid (the DPO paper's; default), ipo, hinge, robust, ... (TRL's DPO loss variants); kto: kto (default) or apo_zero_unpaired; empty = the objective's default.")
    simpo_gamma: float = key(0.5, "simpo: target reward margin gamma (TRL's simpo_gamma); the paper uses gamma / beta of 0.3-0.8.", min=0)
    orpo_lambda: float = key(0.1, "orpo: weight of the odds-ratio term added to the chosen answer's SFT loss (the paper's lambda; TRL's ORPOConfig.beta).", min=0)
    desirable_weight: float = key(1.0, "kto: loss weight of rows labelled good (label: true).", min=0)
    undesirable_weight: float = key(1.0, "kto: loss weight of rows labelled bad (label: false).", min=0)


# the names eval.metrics' doc lists (a labels metric reads a classifier, not generated text); from the registry
GENERATION_METRICS = tuple(name for name, m in METRICS.items() if m.needs != "labels")


@dataclass
class EvalConfig:
    metrics: list[str] = key(None, "Generation metrics scored on the validation split at the end of training (lora_cli/eval/metrics.py: " + ", ".join(GENERATION_METRICS) + ", or module:function), into metrics.jsonl and the run summary; empty = none.", factory=list)
    max_new_tokens: int = key(64, "Most tokens generated per validation row for eval.metrics.", min=1)
    limit: int = key(200, "Most validation rows eval.metrics answers (generation is slow); 0 = all.", min=0)
    bootstrap_resamples: int = key(1000, "Bootstrap resamples over rows for each metric's confidence interval.", min=1)


@dataclass
class Recipe:
    model: ModelConfig = key(None, "The base model.", factory=ModelConfig)
    lora: LoraConfig = key(None, "The adapter.", factory=LoraConfig)
    data: DataConfig = key(None, "The instruction data.", factory=DataConfig)
    train: TrainConfig = key(None, "Optimisation.", factory=TrainConfig)
    eval: EvalConfig = key(None, "Generation-based evaluation at the end of training (`lora eval` does it for any candidates).", factory=EvalConfig)
    output_dir: str = key(REQUIRED, "Where checkpoints and the final adapter go (relative to the recipe).", kind=PATH)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- schema walking

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_keys(cls=Recipe, prefix: str = ""):
    """Yield (dotted key, type, field) for every leaf key of the schema."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        # sorted: typing caches unions by their members, so the order an import met first can win
        # (test_cli's README check failed after test_export); one text whatever ran before
        inner = " or ".join(sorted((type_name(a) for a in args), key=lambda name: (name.startswith("list of"), name)))
        return f"{inner} (or empty)" if len(args) < len(typing.get_args(tp)) else inner
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {type_name(k)} to {type_name(v)}"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value, tp):
    """Return value as type tp, or raise ValueError with what was expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError:
                continue
        raise ValueError(type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(type_name(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ValueError(type_name(tp))
        return [_coerce(v, inner) for v in value]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(type_name(tp))
        return {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError("integer")
    if tp is float:
        number = _as_float(value)
        if number is None:
            raise ValueError("number")
        if not math.isfinite(number):  # .nan / .inf are never a setting
            raise ValueError("a finite number (not .nan or .inf)")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError("string")
    raise ValueError(type_name(tp))


def _as_float(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int too big for a float
            return None
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _range_problem(dotted: str, value, meta) -> str | None:
    """The key's declared bounds (key(min=, max=, below=)) applied to a number."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if meta.get("min") is not None and value < meta["min"]:
        return f"{dotted}: must be at least {meta['min']}, got {shorten(value)}"
    if meta.get("max") is not None and value > meta["max"]:
        return f"{dotted}: must be at most {meta['max']}, got {shorten(value)}"
    if meta.get("below") is not None and value >= meta["below"]:
        return f"{dotted}: must be below {meta['below']}, got {shorten(value)}"
    return None


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _build(cls, raw: dict, prefix: str, problems: list[str], base_dir: Path, cli_paths: set[str]):
    """Build dataclass cls from raw, appending every problem found to `problems`."""
    hints = _hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for k in raw:
        if k not in names:
            problems.append(f"{prefix}{shorten(k) if not isinstance(k, str) or len(k) > 60 else k}: unknown key{_did_you_mean(str(k)[:200], names)}; "
                            f"valid keys here: {', '.join(names)}")
    for name, f in names.items():
        dotted = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            value = raw.get(name) or {}
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a section (mapping of keys), got {shorten(value)}")
                continue
            values[name] = _build(tp, value, f"{dotted}.", problems, base_dir, cli_paths)
            continue
        if name not in raw:
            if f.default is REQUIRED:
                problems.append(f"{dotted}: required; {f.metadata['doc']}")
            continue
        value = raw[name]
        try:
            value = _coerce(value, tp)
        except ValueError as e:
            problems.append(f"{dotted}: expected {e}, got {shorten(value)}")
            continue
        meta = f.metadata
        if meta.get("kind") == PATH and _blank_path(value):
            # "" would resolve to the recipe's own folder (an output_dir there replaces it)
            if f.default is REQUIRED or isinstance(value, list):
                problems.append(f"{dotted}: empty{' entry' if isinstance(value, list) else ''}; {f.metadata['doc']}")
                continue
            value = None  # an optional path left empty is not set
        unusable = _unusable_path(value) if meta.get("kind") == PATH else None
        if unusable:
            # nothing on disk can have such a name, and the OS refuses to even look it up
            # (ENAMETOOLONG or "embedded null byte" from whichever check first touches it)
            problems.append(f"{dotted}: {unusable}")
            continue
        out_of_range = _range_problem(dotted, value, meta)
        if out_of_range:
            problems.append(out_of_range)
            continue
        if meta.get("kind") == PATH and isinstance(value, str):
            value = resolve_path(value, Path.cwd() if dotted in cli_paths else base_dir)
        elif meta.get("kind") == PATH and isinstance(value, list):  # several paths (data.path)
            value = [resolve_path(v, Path.cwd() if dotted in cli_paths else base_dir) for v in value]
        values[name] = value
    built = cls(**values)
    built._explicit = frozenset(k for k in raw if k in names and raw[k] is not None)  # see explicit_keys()
    return built


NAME_MAX = 255  # one file or folder name: bytes on ext4 and APFS, UTF-16 units on NTFS


def _name_size(name: str) -> int:
    if os.name == "nt":
        return len(name.encode("utf-16-le", "surrogatepass")) // 2
    return len(name.encode("utf-8", "surrogatepass"))


def _unusable_path(value) -> str | None:
    """Why no file system can hold this path (or an entry of a list of them), or None: a NUL
    character, or one name (a part between separators) longer than NAME_MAX."""
    for entry in [value] if isinstance(value, str) else value or []:
        if not isinstance(entry, str):
            continue
        if "\0" in entry:
            return f"{shorten(entry)} holds a NUL character (\\x00), which no file or folder name can"
        # a backslash separates names on Windows only; on POSIX it is part of the name
        for part in re.split(r"[\\/]" if os.altsep else "/", entry):
            if _name_size(part) > NAME_MAX:
                return (f"the name {shorten(part)} is longer than the {NAME_MAX} bytes a file or folder "
                        "name can have; give a shorter one")
    return None


def _blank_path(value) -> bool:
    """A path key given as "" or spaces, alone or in a list (a --set key= without a value)."""
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value)


def explicit_keys(section) -> frozenset:
    """The keys of a built section that the recipe (or --set) wrote, as opposed to defaults.
    An empty value (`key:` or --set key=null) counts as not written."""
    return getattr(section, "_explicit", frozenset())


def resolve_path(value: str, base_dir: Path) -> str:
    """A relative path is read against base_dir; a bare hub id ('org/name') stays as it is."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (base_dir / p).resolve()
    if looks_like_hub_id(value) and not os.path.exists(candidate) and not os.path.exists(Path.cwd() / p):
        return value
    return str(candidate)


# --------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.learning_rate=3e-4' -> (['train', 'learning_rate'], 0.0003), typed by YAML."""
    if "=" not in text:
        raise RecipeError("--set", [f"{shorten(text)}: expected KEY=VALUE, e.g. train.learning_rate=3e-4"])
    dotted, _, raw_value = text.partition("=")
    parts = dotted.strip().split(".")
    if not all(re.fullmatch(r"\w+", part) for part in parts):
        raise RecipeError("--set", [f"{shorten(text)}: {shorten(dotted)} is not a recipe key; "
                                    "write section.key=value, e.g. train.learning_rate=3e-4 (see lora recipe-keys)"])
    try:
        value = safe_yaml(raw_value, f"--set {parts[-1]}") if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> set[str]:
    """Merge --set overrides into raw; return the dotted keys they set."""
    dotted_keys = set()
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
        dotted_keys.add(".".join(parts))
    return dotted_keys


# --------------------------------------------------------------------------- loading

def load_yaml(path: Path) -> dict:
    if not os.path.isfile(path):
        kind = special_kind(path)
        what = ("a folder, not a file" if os.path.isdir(path) else f"is {kind}, not a file" if kind else "file not found")
        raise RecipeError(str(path), [f"{what}; give the path to a recipe .yaml (see recipes/)"])
    try:
        raw = safe_yaml(read_text(path, max_bytes=MAX_YAML_BYTES), str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(str(path), [f"YAML syntax error at {where}: {problem}; check indentation and quoting there"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [f"expected a mapping of sections (model, lora, data, train), got {type(raw).__name__}"])
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises RecipeError listing every problem at once."""
    path = Path(path)
    raw = load_yaml(path)
    cli_paths = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw, base_dir=path.resolve().parent, source=str(path), cli_paths=cli_paths)


def recipe_from_dict(raw: dict, base_dir: Path | str = ".", source: str = "recipe",
                     cli_paths: set[str] = frozenset()) -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems, Path(base_dir).resolve(), set(cli_paths))
    if not problems:
        problems += cross_checks(recipe)
    else:  # cross-key checks need every key valid; files named by keys that did parse are still checked
        problems += file_problems(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def file_problems(r: Recipe) -> list[str]:
    """Missing data files, checked even when other keys are wrong, so one run lists every problem."""
    return [p for key_name in ("data.path", "data.val_path")
            for value in [getattr(r.data, key_name.split(".")[1])] if value is not REQUIRED
            for p in _data_path_problems(key_name, value)]


def cross_checks(r: Recipe) -> list[str]:
    """Checks that involve more than one key, or the filesystem."""
    problems = []
    tm = r.lora.target_modules
    if isinstance(tm, list) and not tm:
        problems.append("lora.target_modules: empty list; name modules (e.g. [q_proj, v_proj]) or use 'all-linear'")
    if isinstance(tm, str) and tm not in TARGET_PRESETS:
        try:
            re.compile(tm)
        except re.error as e:
            problems.append(f"lora.target_modules: {shorten(tm)} is not a valid regex ({e}); use a list of names, "
                            f"a preset ({', '.join(TARGET_PRESETS)}), or a valid regex")
    problems += lora_method_problems(r)
    problems += data_problems(r.data, column_fields(r) or objective_fields(r))
    problems += recipe_problems(r)
    problems += objective_problems(r, explicit_keys(r.train))
    if r.lora.init_from is not None and not os.path.isfile(os.path.join(r.lora.init_from, "adapter_config.json")):
        problems.append(f"lora.init_from: {clip(r.lora.init_from)} holds no adapter (no adapter_config.json); "
                        "point it at a finished run's folder or one of its checkpoint-N folders")
    if r.train.max_steps == 0:
        problems.append("train.max_steps: 0 would train nothing; use -1 to run all epochs or a positive number")
    if r.train.max_steps < 0 and r.train.epochs == 0:
        problems.append("train.epochs: 0 with max_steps -1 would train nothing; set epochs > 0 or max_steps > 0")
    problems += _parallel_checks(r.train)

    problems += metric_name_problems(r.eval.metrics, "eval.metrics")
    if r.train.fsdp or r.train.deepspeed:
        problems += quantized_sharding_problems(r.model, "FSDP" if r.train.fsdp else "DeepSpeed")
    if r.lora.adapter_dtype == "bfloat16" and r.train.precision == "fp16":
        problems.append("lora.adapter_dtype: bfloat16 adapters cannot train under train.precision fp16 (the fp16 "
                        "gradient scaler expects fp16/fp32 weights); use precision bf16, or adapter_dtype float32")
    return problems


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload", "auto_wrap")


def _parallel_checks(t: TrainConfig) -> list[str]:
    """train.fsdp / fsdp_config / deepspeed: one engine at a time, files that exist."""
    problems = []
    unknown = [w for w in t.fsdp.split() if w not in FSDP_OPTIONS]
    if unknown:
        problems.append(f"train.fsdp: unknown option(s) {unknown}; use words from {', '.join(FSDP_OPTIONS)} "
                        "(e.g. 'full_shard auto_wrap')")
    if t.fsdp and t.deepspeed:
        problems.append("train.fsdp and train.deepspeed are both set; choose one sharding engine")
    if t.fsdp_config and not t.fsdp:
        problems.append("train.fsdp_config is set but train.fsdp is empty; set train.fsdp (e.g. 'full_shard auto_wrap')")
    for name in ("fsdp_config", "deepspeed"):
        value = getattr(t, name)
        if value and not os.path.isfile(value):
            problems.append(f"train.{name}: {value} does not exist; give a JSON file (relative to the recipe's folder)")
    return problems


def quantized_sharding_problems(model: ModelConfig, engine: str) -> list[str]:
    """A quantized base under FSDP / DeepSpeed (engine: their display name) shards only when its
    packed weights are stored in a float dtype (the peft/bitsandbytes FSDP-QLoRA recipe). Read
    by recipe validation (train.fsdp / train.deepspeed) and by preflight (an accelerate config)."""
    problems = []
    if model.quantization == "8bit":
        problems.append(f"model.quantization: 8bit (LLM.int8) weights cannot be sharded by {engine}; use 4bit "
                        "(QLoRA), whose packed weights shard with the rest")
    if model.quantization == "4bit" and model.dtype not in ("bfloat16", "float16"):
        problems.append(f"model.dtype: {engine} with a 4-bit base stores the packed weights in model.dtype "
                        f"(bnb_4bit_quant_storage), so it must be a 16-bit float, not {model.dtype!r}; "
                        "set model.dtype: bfloat16")
    return problems


ADAPTER_KEYS = {"method", "init_from"}  # lora.* keys every method reads


def lora_method_problems(r: Recipe) -> list[str]:
    """Options that the chosen lora.method (or the quantization) cannot use."""
    lora, method = r.lora, r.lora.method
    reads = METHODS[method].keys
    problems = [f"lora.{k}: does not apply to lora.method {method} (it reads: {', '.join(sorted(reads))}); "
                f"remove lora.{k} or choose a method that uses it"
                for k in sorted(explicit_keys(lora) - reads - ADAPTER_KEYS)]
    if lora.init == "pissa" and r.model.quantization != "none":
        problems.append(f"lora.init: pissa needs the full-precision weights (peft takes their SVD), not a "
                        f"{r.model.quantization} base; use init olora or gaussian, or model.quantization: none")
    if METHODS[method].learns_virtual_tokens and r.data.packing:
        problems.append(f"data.packing: true cannot train lora.method {method}: peft ignores position_ids for "
                        "virtual-token methods, so packed examples would attend to each other; remove data.packing "
                        "(or set it to false)")
    return problems + METHODS[method].problems(r)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML, saved beside every adapter. The lora section keeps only the
    keys its method reads, and the train section only its objective's own keys, so the saved
    recipe loads again as a recipe."""
    data = recipe.to_dict()
    data["lora"] = {k: v for k, v in data["lora"].items()
                    if k == "method" or (k == "init_from" and v is not None) or k in METHODS[recipe.lora.method].keys}
    reads = OBJECTIVES[recipe.train.objective].keys  # likewise the train keys of other objectives
    data["train"] = {k: v for k, v in data["train"].items() if k not in OBJECTIVE_KEYS or k in reads}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def reference_markdown() -> str:
    """The README's recipe reference, generated from the schema so they cannot disagree."""
    lines = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    defaults = Recipe().to_dict()
    for dotted, tp, f in iter_keys():
        node = defaults
        for part in dotted.split("."):
            node = node[part]
        default = "required" if node is REQUIRED else "" if node is None else yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()
        cells = [f"`{dotted}`", type_name(tp), f"`{default}`" if default else "empty", f.metadata["doc"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


README_MARKERS = ("<!-- recipe-keys:start -->", "<!-- recipe-keys:end -->")


def update_reference(readme_file: Path) -> None:
    """Rewrite the reference block of a README in place (`lora recipe-keys --update`)."""
    text = read_text(Path(readme_file), "--update")
    if not all(m in text for m in README_MARKERS):
        raise LoraError(f"{readme_file}: no {README_MARKERS[0]} ... {README_MARKERS[1]} block",
                        "add both markers where the table goes")

    with ownership.turning_disk_errors(Path(readme_file), "--update"):  # a read-only or full disk: exit 2 naming it
        atomic.write_text(Path(readme_file), with_reference(text))


def with_reference(readme: str) -> str:
    """README text with the block between README_MARKERS replaced by reference_markdown()."""
    start, end = README_MARKERS
    head, _, rest = readme.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{reference_markdown()}\n{end}{tail}"
