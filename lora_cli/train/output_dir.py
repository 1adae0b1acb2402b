"""Where a run writes, checked before anything loads: output_dir is not one of the run's inputs,
no other run holds it, and it holds no other run unless --overwrite may replace it. Light on
purpose (no torch, no Trainer): `lora train` refuses a finished or busy folder at once, before
the libraries' seconds of import."""

from __future__ import annotations

import os
from pathlib import Path

from lora_cli.data.sources import data_paths
from lora_cli.errors import LoraError
from lora_cli.files import ownership
from lora_cli.model.adapter_folder import RECIPE_FILE
from lora_cli.recipe.schema import Recipe
from lora_cli.train import checkpoint as ckpt


def refuse_output_dir(recipe: Recipe, *, dry_run: bool = False, overwrite: bool = False, resume=None,
                      recipe_path: str | Path | None = None) -> None:
    """Every refusal of output_dir that needs nothing loaded (a resumed run's checkpoint is
    checked later, against the recipe as the task prepared it)."""
    output_dir = Path(recipe.output_dir)
    if resume is not None and (overwrite or dry_run):
        raise LoraError("--resume / --resume-from cannot be combined with --overwrite or --dry-run",
                        "--resume continues the run in output_dir; --overwrite starts it again")
    check_inputs_apart(recipe, recipe_path)
    if not dry_run and is_main_process():
        # another run is writing there: say so before anything else. Rank 0 alone asks: the
        # other ranks of this very job (a second node starting later) would find rank 0's lock.
        ownership.check_unlocked(output_dir)
    if not dry_run and resume is None:
        check_output_dir(output_dir, overwrite)


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- output folder

def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder holding another run, unless told to replace it; replace
    only a folder `lora train` wrote that holds nothing else (lora_cli.files.ownership)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise LoraError(f"output_dir: {output_dir} exists and is not a folder", "choose another output_dir")
    if ownership.is_empty(output_dir):
        return
    if not overwrite:
        resumable = None if ckpt.run_finished(output_dir) else ckpt.newest_complete(output_dir)  # a finished run is never resumed
        also = f", or continue it from {resumable.name} with --resume" if resumable else ""
        raise LoraError(f"output_dir: {output_dir} already holds files from another run",
                        f"set another output_dir (e.g. --set output_dir=runs/new), pass --overwrite to replace that run{also}")
    ownership.check_replaceable(output_dir, "train", "--overwrite")


def check_inputs_apart(recipe: Recipe, recipe_path: str | Path | None) -> None:
    """output_dir may not be, hold, or sit inside anything the run reads: --overwrite and
    resume tidy-ups would delete it, and the run would write into it."""

    output_dir = Path(recipe.output_dir)
    if recipe_path and Path(recipe_path).resolve() == (output_dir / RECIPE_FILE).resolve():
        recipe_path = None  # the run's own saved recipe (the printed resume command): lora wrote it there
    inputs = [("base model (model.name_or_path)", recipe.model.name_or_path), ("recipe", recipe_path),
              ("FSDP config (train.fsdp_config)", recipe.train.fsdp_config),
              ("DeepSpeed config (train.deepspeed)", recipe.train.deepspeed)]
    inputs += [("training data (data.path)", p) for p in data_paths(recipe.data.path)]
    inputs += [("validation data (data.val_path)", p) for p in data_paths(recipe.data.val_path)]
    ownership.check_not_inputs(output_dir, inputs, "output_dir")
