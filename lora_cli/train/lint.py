"""`lora check`'s red flags: hyperparameter combinations that validate but usually train badly.

The rules come from the hyperparameter guide the toolkit follows (rank, alpha, targets,
dropout and learning rate ranges, and its list of red-flag combinations) plus the traps that
cost a run: more optimizer steps than the data can feed, warm-up longer than the run,
whole embeddings saved with every adapter. Each finding names the key, says why it is risky
and what to set instead. Nothing here imports torch: the model's size comes from its
config.json, the data's size from counting rows in the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import LoraError
from lora_cli.data.sources import data_paths
from lora_cli.model.methods import method_of
from lora_cli.train.objectives import objective_of, red_flags
from lora_cli.train.preflight import planned_steps
from lora_cli.data.batching import batch_shape
from lora_cli.recipe.schema import Recipe
from lora_cli.tasks import get_task

# The guide's usual ranges for the peak learning rate.
LORA_LR = (1e-4, 5e-4)
QLORA_LR = (5e-5, 2e-4)  # lower: the 4-bit base adds noise to every step
QLORA_LR_RED_FLAG = 5e-4

# Every linear projection of a Llama-style block: a list naming all of them is "all modules".
ALL_BLOCK_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

# Module names that hold a vocabulary-sized matrix across the common architectures.
EMBEDDING_NAMES = {"embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out",
                   "tok_embeddings", "output", "shared"}
LARGE_EMBEDDING_PARAMS = 10_000_000  # above this, saving it with every adapter dominates the file

MAX_PASSES = 5  # more passes over a small data set than this and it is memorised, not learned


@dataclass
class Finding:
    key: str         # the recipe key to change
    problem: str     # what the recipe says, in numbers
    reason: str      # why that usually goes wrong
    suggestion: str  # what to set instead

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}\n    why: {self.reason}\n    try: {self.suggestion}"


def lint_recipe(recipe: Recipe) -> list[Finding]:
    """Every red flag in a validated recipe, in the order of the recipe's sections."""
    findings: list[Finding] = []
    for rule in RULES:
        if rule.__name__ in LOW_RANK_RULES and not is_low_rank(recipe):
            continue
        finding = rule(recipe)
        if finding is not None:
            findings.append(finding)
    findings += [Finding(*flag) for flag in red_flags(recipe)]  # the objective's own (objectives.py)
    return findings


def _warnings(findings: list[Finding]) -> str:
    return f"{len(findings)} warning{'s' if len(findings) != 1 else ''}"


def refuse_if_strict(findings: list[Finding], source, strict: bool) -> None:
    """--strict (for CI): any warning is an error (exit 2)."""
    if findings and strict:
        raise LoraError(f"{source}: {_warnings(findings)} (--strict)",
                        "change the keys named above, or drop --strict to let them pass")


def verdict(findings: list[Finding], source) -> str:
    """The last line of `lora check`: 'recipe.yaml: ok (2 warnings)'."""
    return f"{source}: ok" + (f" ({_warnings(findings)})" if findings else "")


# --------------------------------------------------------------------------- helpers

def uses_rslora(recipe: Recipe) -> bool:
    """rsLoRA scales by alpha / sqrt(r), so the alpha-vs-r rules do not apply."""
    return method_of(recipe).rslora_scaling


def is_low_rank(recipe: Recipe) -> bool:
    """r and alpha mean something only for LoRA and its variants (not IA3 or prompt tuning)."""
    return method_of(recipe).has_rank


def is_four_bit(recipe: Recipe) -> bool:
    return recipe.model.quantization == "4bit"


def targets_all_modules(recipe: Recipe) -> bool:
    tm = recipe.lora.target_modules
    if isinstance(tm, str):
        return tm in ("all-linear", "all")
    return ALL_BLOCK_PROJECTIONS <= set(tm)


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def read_model_config(name_or_path: str) -> dict | None:
    """config.json of a local model folder, or None (hub ids are not fetched by `check`)."""
    path = Path(name_or_path) / "config.json"
    try:  # inside the try: a name longer than the file system allows raises from is_file itself
        if not path.is_file():
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    text = config.get("text_config")  # multimodal configs keep the language model's here
    return {**config, **text} if isinstance(text, dict) else config


def embedding_shape(config: dict) -> tuple[int, int] | None:
    vocab = config.get("vocab_size")
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    if isinstance(vocab, int) and isinstance(hidden, int):
        return vocab, hidden
    return None


def count_rows(path: str | Path) -> int | None:
    """Rows in a .jsonl / .json / .csv / .parquet file or a save_to_disk folder, without
    tokenising or torch. None when they cannot be counted cheaply (e.g. a hub dataset id)."""
    path = Path(path)
    try:
        if path.is_file() and path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                return sum(1 for line in f if line.strip())
        if path.is_file() and path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and len(rows) == 1:
                rows = next(iter(rows.values()))
            return len(rows) if isinstance(rows, list) else None
        if path.is_file() and path.suffix == ".csv":
            import csv

            with path.open(encoding="utf-8", newline="") as f:
                return max(0, sum(1 for _ in csv.reader(f)) - 1)  # minus the header
        if path.is_file() and path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(str(path)).metadata.num_rows
        if path.is_dir():
            return _count_saved_rows(path)
    except (OSError, ValueError, ImportError):
        return None
    return None


def training_rows(recipe: Recipe) -> int | None:
    """Rows the trainer will see per epoch, as far as counting files can tell: every path
    (times its sampling weight) minus the held-out share. None when a source cannot be
    counted, or when rows are not examples (text documents are chunked)."""
    d = recipe.data
    if d.format == "text":
        return None
    paths = data_paths(d.path)
    weights = d.weights or [1.0] * len(paths)
    total = 0.0
    for p, w in zip(paths, weights):
        n = count_rows(p)
        if n is None:
            return None
        total += n * w
    total *= 1 - d.val_fraction
    return max(1, int(total)) if total else None


def _count_saved_rows(path: Path) -> int | None:
    """A datasets save_to_disk folder (or its 'train' split): sum the Arrow files' rows."""
    if (path / "dataset_dict.json").is_file():
        path = path / "train"
    state = path / "state.json"
    if not state.is_file():
        return None
    import pyarrow as pa

    files = json.loads(state.read_text(encoding="utf-8")).get("_data_files", [])
    total = 0
    for entry in files:
        with pa.memory_map(str(path / entry["filename"])) as source:
            total += pa.ipc.open_stream(source).read_all().num_rows
    return total


# --------------------------------------------------------------------------- rules

def rank_with_heavy_dropout(r: Recipe) -> Finding | None:
    if r.lora.r > 256 and r.lora.dropout > 0.2:
        return Finding("lora.dropout", f"dropout {r.lora.dropout} with rank {r.lora.r}",
                       "a rank above 256 with dropout above 0.2 is over-regularised: the extra "
                       "capacity is paid for and then switched off",
                       "lora.dropout: 0.05 (0.05-0.1 is usual), or a smaller rank")
    return None


def alpha_below_rank(r: Recipe) -> Finding | None:
    if uses_rslora(r) or r.lora.alpha >= r.lora.r:
        return None
    return Finding("lora.alpha", f"alpha {r.lora.alpha:g} is below rank {r.lora.r} "
                                 f"(update scaled by {r.lora.alpha / r.lora.r:.2g})",
                   "alpha < r usually leaves the adapter's capacity unused: the update is "
                   "shrunk before it reaches the model",
                   f"lora.alpha: {2 * r.lora.r} (2 x r; alpha = r is the conservative choice)")


def all_modules_low_rank(r: Recipe) -> Finding | None:
    if targets_all_modules(r) and r.lora.r < 8:
        return Finding("lora.r", f"rank {r.lora.r} on every linear module",
                       "all modules with a rank below 8 spreads the adapter too thin: many "
                       "tiny updates, none with room to learn",
                       "lora.r: 16, or keep the rank and target only attention (q_proj, v_proj)")
    return None


def high_lr_with_4bit(r: Recipe) -> Finding | None:
    lr = r.train.learning_rate
    if is_four_bit(r) and lr > QLORA_LR_RED_FLAG:
        return Finding("train.learning_rate", f"{_fmt_lr(lr)} with a 4-bit base",
                       f"above {_fmt_lr(QLORA_LR_RED_FLAG)} on a quantized base is likely to be "
                       "unstable (loss spikes, NaN)",
                       f"train.learning_rate: {_fmt_lr(QLORA_LR[1])}")
    return None


def lr_outside_usual_range(r: Recipe) -> Finding | None:
    lr = r.train.learning_rate
    if is_four_bit(r) and lr > QLORA_LR_RED_FLAG:
        return None  # high_lr_with_4bit already says it, more strongly
    if objective_of(r).preference:
        return None  # preference tuning has its own, lower range (objectives.red_flags)
    kind, (low, high) = ("QLoRA", QLORA_LR) if is_four_bit(r) else ("LoRA", LORA_LR)
    if low <= lr <= high:
        return None
    side = "above" if lr > high else "below"
    effect = ("large steps can overshoot and forget what the base knew" if lr > high
              else "the adapter learns slowly and may look like it is not training")
    return Finding("train.learning_rate", f"{_fmt_lr(lr)} is {side} the usual {kind} range "
                                          f"{_fmt_lr(low)} to {_fmt_lr(high)}",
                   effect, f"train.learning_rate: {_fmt_lr(high if lr > high else low)} "
                           "(tiny toy models are the exception)")


def scaling_far_from_one_to_two(r: Recipe) -> Finding | None:
    """alpha / r between 1 and 2 is the guide's rule; alpha < r is its own rule above."""
    if uses_rslora(r):
        return None
    scaling = r.lora.alpha / r.lora.r
    if scaling <= 4:
        return None
    return Finding("lora.alpha", f"alpha / r = {r.lora.alpha:g} / {r.lora.r} = {scaling:g}",
                   "a scaling far above 1-2 multiplies every update: training is unstable unless "
                   "the learning rate is cut to match",
                   f"lora.alpha: {2 * r.lora.r} (2 x r), or rsLoRA (alpha / sqrt(r)) for high ranks"
                   " with lora.method: rslora")


def embedding_in_modules_to_save(r: Recipe) -> Finding | None:
    names = [m for m in r.lora.modules_to_save if m.rsplit(".", 1)[-1] in EMBEDDING_NAMES]
    if not names:
        return None
    config = read_model_config(r.model.name_or_path)
    shape = embedding_shape(config) if config else None
    if shape is not None:
        params = shape[0] * shape[1]
        if params < LARGE_EMBEDDING_PARAMS:
            return None
        size = (f"each is a {shape[0]:,d} x {shape[1]:,d} matrix ({params / 1e6:.1f}M parameters, "
                f"{2 * params * len(names) / 1e6:,.0f} MB at 16-bit, twice that in fp32)")
    else:
        size = "each is a vocabulary x hidden matrix, usually hundreds of MB"
    return Finding("lora.modules_to_save", f"{', '.join(names)} trained in full; {size}",
                   "modules_to_save are copied, trained and saved whole with every adapter and "
                   "checkpoint, so the adapter grows from megabytes to the embedding's size, and "
                   "AdamW keeps two more copies in memory",
                   "lora.modules_to_save: [] unless you added tokens to the vocabulary")


def more_steps_than_data(r: Recipe) -> Finding | None:
    rows = training_rows(r)
    if not rows:
        return None
    t = r.train
    shape = batch_shape(t, r.data.max_length)
    per_step = shape.rows_per_step
    if per_step > rows:
        return Finding("train.gradient_accumulation",
                       f"one optimizer step needs {per_step} examples (batch_size {shape.batch_size} x "
                       f"gradient_accumulation {shape.gradient_accumulation}) but the data has {rows} rows",
                       "an epoch is shorter than one step: the Trainer rounds up to one step per "
                       "epoch on a partial batch, so epochs and the schedule mean less than they say",
                       f"train.gradient_accumulation: {max(1, rows // shape.batch_size)} or fewer, or more data")
    steps = planned_steps(r, rows)
    passes = steps * per_step / rows
    if passes <= MAX_PASSES:
        return None
    key = "train.max_steps" if t.max_steps > 0 else "train.epochs"
    fix = (f"train.max_steps: {max(1, math.ceil(3 * rows / per_step))} (3 passes)" if t.max_steps > 0
           else "train.epochs: 3")
    return Finding(key, f"{steps} optimizer steps x {per_step} examples = {passes:.0f} passes over "
                        f"{rows} rows",
                   "more optimizer steps than the data can feed: each row is seen so often that "
                   "the adapter memorises it (training loss near 0, worse answers on new prompts)",
                   f"{fix}, or more data")


def warmup_longer_than_run(r: Recipe) -> Finding | None:
    rows = training_rows(r)
    if r.train.max_steps <= 0 and not rows:
        return None
    steps = planned_steps(r, rows or 1)
    warmup = r.train.warmup_steps
    if warmup < steps:
        return None
    return Finding("train.warmup_steps", f"warm-up of {warmup} steps in a run of {steps} optimizer steps",
                   "the learning rate is still climbing when training stops: the run never trains "
                   "at the rate you set",
                   f"train.warmup_steps: {max(1, steps // 10)} (about 10% of the run)")


def classifier_without_eval(r: Recipe) -> Finding | None:
    if not get_task(r.model.task).judged_on_held_out or r.data.val_path or r.data.val_fraction > 0:
        return None
    return Finding("data.val_fraction", "a classifier trained with no held-out rows",
                   "accuracy, macro-F1 and the confusion matrix are measured on held-out rows; without "
                   "them a head that memorised its training rows looks as good as one that learned",
                   "data.val_fraction: 0.2, or data.val_path: a labelled file")


# The attention projections of the model kinds model.task reaches beyond Llama-style decoders,
# by config model_type: what a hand-written target list must name on them.
ATTENTION_NAMES = {"bert": ("query", "key", "value"), "roberta": ("query", "key", "value"),
                   "distilbert": ("q_lin", "k_lin", "v_lin"), "t5": ("q", "k", "v", "o"),
                   "mt5": ("q", "k", "v", "o"), "bart": ("q_proj", "k_proj", "v_proj", "out_proj"),
                   "mbart": ("q_proj", "k_proj", "v_proj", "out_proj")}


def targets_foreign_to_model_kind(r: Recipe) -> Finding | None:
    targets = r.lora.target_modules
    if not isinstance(targets, list) or method_of(r).learns_virtual_tokens:
        return None
    config = read_model_config(r.model.name_or_path) or {}
    names = ATTENTION_NAMES.get(config.get("model_type"))
    if names is None or any(t.rsplit(".", 1)[-1] in names for t in targets):
        return None
    return Finding("lora.target_modules", f"{targets} on a {config['model_type']} model, whose attention "
                                          f"projections are {', '.join(names)}",
                   "peft matches target names against the model's own module names; these match none "
                   "of its attention layers, so training stops at the start (or adapts something else)",
                   f"lora.target_modules: attention-qv (here: {names[0]}, {names[2]}), or [{names[0]}, {names[2]}]")


LOW_RANK_RULES = {"rank_with_heavy_dropout", "alpha_below_rank", "scaling_far_from_one_to_two", "all_modules_low_rank"}

RULES = [
    rank_with_heavy_dropout,
    alpha_below_rank,
    scaling_far_from_one_to_two,
    all_modules_low_rank,
    embedding_in_modules_to_save,
    high_lr_with_4bit,
    lr_outside_usual_range,
    more_steps_than_data,
    warmup_longer_than_run,
    classifier_without_eval,
    targets_foreign_to_model_kind,
]
