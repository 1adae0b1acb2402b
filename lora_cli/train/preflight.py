"""Checks made before a run spends anything: each one catches, in seconds, a problem that would
otherwise surface after the model has loaded, or at the first checkpoint hours later."""

from __future__ import annotations

import importlib
import math
import os
import shutil
import tempfile
from pathlib import Path

from lora_cli.files import atomic
from lora_cli.errors import LoraError
from lora_cli.libraries import install_hint
from lora_cli.recipe.schema import BITSANDBYTES_OPTIMIZERS, quantized_sharding_problems
from lora_cli.data.batching import batch_shape

# Packages that train.report_to names, and the module that proves each is installed.
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _importable(*names: str) -> bool:
    for name in names:
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def precision_flags(recipe) -> dict:
    """TrainingArguments' bf16/fp16 flags, refusing combinations the hardware cannot run."""
    import torch

    want = recipe.train.precision
    cuda = torch.cuda.is_available()
    if want == "auto":
        want = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if want == "fp16" and not cuda:
        raise LoraError("train.precision: fp16 needs a CUDA GPU; this machine has none",
                        "use precision: fp32 (or auto) on CPU")
    if want == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise LoraError("train.precision: bf16 is not supported by this GPU (it needs compute capability 8.0+)",
                        "use precision: fp16 (or auto)")
    return {"bf16": want == "bf16", "fp16": want == "fp16"}


def nearest_existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def check_writable(output_dir: Path) -> None:
    """Create and delete a file where output_dir is (or will be). os.access is not enough:
    it says yes to root on a read-only mount."""
    output_dir = Path(output_dir)
    anchor = nearest_existing(output_dir)
    if not anchor.is_dir():
        raise LoraError(f"output_dir: {output_dir} cannot be created because {anchor} is a file",
                        "choose an output_dir whose parents are folders")
    try:
        # named as lora's staging, so a kill right here leaves nothing that looks like the user's
        with tempfile.NamedTemporaryFile(dir=anchor, prefix=atomic.STAGED_PREFIX + "write-test."):
            pass
    except OSError as e:
        raise LoraError(f"output_dir: cannot write in {anchor} ({e.strerror or e})",
                        "choose an output_dir you can write to (--set output_dir=...)") from None


def check_packages(recipe) -> list[str]:
    """Optional packages the recipe needs; every missing one is listed."""
    problems = []
    if recipe.model.quantization != "none" and not _importable("bitsandbytes"):
        problems.append(f"model.quantization: {recipe.model.quantization} needs bitsandbytes, which is not installed; "
                        f"{install_hint('quant')}, or set model.quantization: none")
    for name in recipe.train.report_to:
        if not _importable(*REPORTERS[name]):
            problems.append(f"train.report_to: {name} is not installed; pip install {name}, "
                            f"or remove it from train.report_to")
    if recipe.train.kernels == "liger" and not _importable("liger_kernel"):
        problems.append("train.kernels: liger needs the liger-kernel package, which is not installed; "
                        f"{install_hint('liger')}, or set train.kernels: none")
    if recipe.model.attn_implementation == "flash_attention_2" and not _importable("flash_attn"):
        problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
                        "installed; pip install flash-attn, or set model.attn_implementation: auto")
    if sharding_engine(recipe) == "deepspeed" and not _importable("deepspeed"):
        problems.append(f"{_sharding_source(recipe)}: DeepSpeed is asked for but the deepspeed package is not "
                        "installed; pip install deepspeed, or train without DeepSpeed")
    if recipe.train.optimizer in BITSANDBYTES_OPTIMIZERS and not _importable("bitsandbytes"):
        problems.append(f"train.optimizer: {recipe.train.optimizer} comes from bitsandbytes, which is not installed; "
                        f"{install_hint('quant')}, or set train.optimizer: adamw_torch")
    return problems


# --------------------------------------------------------------------------- sharding

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def sharding_engine(recipe) -> str | None:
    """'fsdp', 'deepspeed' or None. Either the recipe asks (train.fsdp / train.deepspeed) or
    `accelerate launch --config_file` does: accelerate hands its choice to the Trainer through
    these environment variables, and the Trainer's Accelerator reads them."""
    if recipe.train.fsdp or _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if recipe.train.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def _sharding_source(recipe) -> str:
    """Where the sharding request came from, for messages."""
    if recipe.train.fsdp:
        return "train.fsdp"
    if recipe.train.deepspeed:
        return "train.deepspeed"
    return "the accelerate launch config (ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED)"


def check_sharding(recipe, cuda: bool) -> list[str]:
    """FSDP and DeepSpeed shard over CUDA GPUs, and a quantized base only in a float storage dtype."""
    engine = sharding_engine(recipe)
    if engine is None:
        return []
    name, source = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[engine], _sharding_source(recipe)
    problems = []
    if not cuda:
        problems.append(f"{source}: {name} shards the model over CUDA GPUs and this machine has none; on CPU "
                        "train with plain data parallelism instead (torchrun --nproc_per_node N -m lora_cli.cli train "
                        "RECIPE, or accelerate launch --config_file recipes/accelerate/ddp.yaml), without "
                        "train.fsdp / train.deepspeed")
    # (recipe validation already applied these when train.fsdp / train.deepspeed asked for it)
    return problems + quantized_sharding_problems(recipe.model, name)


def check_before_loading(recipe) -> dict:
    """Everything that can be known before loading the model. Returns the precision flags."""
    import torch

    check_writable(Path(recipe.output_dir))
    problems = check_packages(recipe) + check_sharding(recipe, torch.cuda.is_available())
    if problems:
        raise LoraError("this recipe cannot run here as it stands:\n    " + "\n    ".join(problems))
    check_gpu_kernels(recipe)
    return precision_flags(recipe)


def check_gpu_kernels(recipe) -> None:
    """Kernels that exist only for CUDA GPUs, refused on a machine without one."""
    import torch

    if torch.cuda.is_available():
        return
    if recipe.train.kernels == "liger":
        raise LoraError("train.kernels: liger runs Triton kernels on a CUDA GPU; this machine has none",
                        "set train.kernels: none on CPU")
    if recipe.model.attn_implementation == "flash_attention_2":
        raise LoraError("model.attn_implementation: flash_attention_2 needs a CUDA GPU; this machine has none",
                        "set model.attn_implementation: auto (sdpa on CPU)")


# --------------------------------------------------------------------------- disk

MIB = 1 << 20
# Per checkpoint: the trainable weights, AdamW's two moments of the same size (3x in all), plus
# the tokenizer the Trainer copies in and a margin for scheduler, RNG and trainer state.
OPTIMIZER_FACTOR = 3
CHECKPOINT_OVERHEAD = 2 * MIB


def planned_checkpoints(save_total_limit: int | None, planned_saves: int) -> int:
    """How many checkpoints sit on disk at the worst moment: those kept, plus the one being
    staged before the oldest is rotated out."""
    kept = planned_saves if save_total_limit is None else min(save_total_limit, planned_saves)
    return kept + 1


def required_bytes(adapter_bytes: int, tokenizer_bytes: int, checkpoints: int) -> int:
    per_checkpoint = OPTIMIZER_FACTOR * adapter_bytes + tokenizer_bytes + CHECKPOINT_OVERHEAD
    return checkpoints * per_checkpoint + adapter_bytes + tokenizer_bytes  # + the final adapter


def check_disk(output_dir: Path, adapter_bytes: int, tokenizer_bytes: int, save_total_limit: int | None,
               planned_saves: int) -> int:
    """Refuse a run whose checkpoints will not fit. Returns the bytes it needs."""
    need = required_bytes(adapter_bytes, tokenizer_bytes, planned_checkpoints(save_total_limit, planned_saves))
    anchor = nearest_existing(Path(output_dir))
    free = shutil.disk_usage(anchor).free
    if free < need:
        raise LoraError(
            f"output_dir: {anchor} has {free / MIB:,.1f} MiB free, but this run needs about {need / MIB:,.1f} MiB "
            f"for its checkpoints ({planned_checkpoints(save_total_limit, planned_saves)} at once, each the adapter "
            f"({adapter_bytes / MIB:,.1f} MiB) x{OPTIMIZER_FACTOR} for optimizer state, plus tokenizer) and the final adapter",
            "free some space, lower train.save_total_limit, save less often (train.save_steps), "
            "or choose an output_dir on a larger disk")
    return need


def trainable_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens")
UNKNOWN_TOKENIZER_BYTES = 32 * MIB  # a hub id: not on disk yet, so assume a large tokenizer


def tokenizer_bytes(name_or_path: str) -> int:
    """Size of the tokenizer files each checkpoint copies; a guess for models not on disk."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return UNKNOWN_TOKENIZER_BYTES
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.name.startswith(TOKENIZER_FILES) or p.suffix == ".model"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def planned_steps(recipe, rows: int, processes: int | None = None) -> int:
    """Optimizer steps the Trainer will take on `rows` training sequences: train.max_steps, or
    epochs x steps per epoch. Each of the processes (world size) reads its share of the batches,
    ceil(rows / (batch_size x processes)) of them, and an epoch ends with a partial accumulation
    step, so it has ceil(batches / gradient_accumulation) optimizer steps, at least one
    (transformers' Trainer.set_initial_training_values). The batch shape is lora_cli.data.batching's."""

    train_cfg = recipe.train
    if train_cfg.max_steps > 0:
        return train_cfg.max_steps
    shape = batch_shape(train_cfg, recipe.data.max_length)
    processes = processes or world_size()
    batches = math.ceil(rows / (shape.batch_size * processes))
    per_epoch = max(1, math.ceil(batches / shape.gradient_accumulation))
    return math.ceil(per_epoch * train_cfg.epochs)
