"""Checkpoints that are either whole or absent, and picking one to resume from.

The Trainer writes each checkpoint into output_dir/STAGING/checkpoint-N (its output_dir points
there); the on_save hook gives it a completion marker and only then renames it to
output_dir/checkpoint-N (lora_cli.files.atomic: a rename within one filesystem is atomic).
A crash, a full disk or a kill at any moment therefore leaves either the previous checkpoints
untouched or a new complete one; never a half-written folder that resume would trust.
Nothing here imports torch, so resume checks answer before anything heavy loads."""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lora_cli.files import atomic
from lora_cli.errors import LoraError
from lora_cli.model.adapter_folder import ADAPTER_CONFIG, CHECKPOINT_PREFIX, checkpoint_step
from lora_cli.ui.nearby import listing
from lora_cli.data.cache import source_fingerprint
from lora_cli.data.sources import data_paths

PREFIX = CHECKPOINT_PREFIX
MARKER = "lora_checkpoint_complete.json"  # written last, inside the staging folder
STAGING = atomic.STAGED_PREFIX + "checkpoints"  # beside the checkpoints, so the rename stays on one filesystem
FINAL_ADAPTER = ADAPTER_CONFIG            # moved into output_dir last: its presence means the run finished


def run_finished(output_dir: Path) -> bool:
    """Whether `lora train` finished in output_dir (see train.save_final_adapter)."""
    return (Path(output_dir) / FINAL_ADAPTER).is_file()


def is_complete(path: Path) -> bool:
    return checkpoint_step(path) is not None and (Path(path) / MARKER).is_file()


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Folders without the marker are ignored."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=checkpoint_step)


def newest_complete(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


# --------------------------------------------------------------------------- writing

def staging_dir(output_dir: Path) -> Path:
    return Path(output_dir) / STAGING


def publish(staged: Path, output_dir: Path, step: int, loss_window: dict | None = None) -> Path:
    """Mark the staged checkpoint complete and move it into place as checkpoint-<step>.
    `loss_window` (the train loss summed since the last logged step) lets a resumed run log
    the same losses as an uninterrupted one."""
    record = {"step": step, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "files": sorted(p.name for p in staged.iterdir() if p.name != MARKER)}
    if loss_window is not None:
        record["loss_window"] = loss_window
    atomic.write_text(staged / MARKER, json.dumps(record))
    final = Path(output_dir) / f"{PREFIX}-{step}"
    atomic.publish_folder(staged, final, replace=True)  # resumed from an older one: this step again
    try:
        staged.parent.rmdir()  # the staging folder is only there while a save is under way
    except OSError:
        pass
    return final


def loss_window(checkpoint: Path) -> dict | None:
    """What publish recorded of the unlogged train loss at this checkpoint (None for older ones)."""
    try:
        return json.loads((Path(checkpoint) / MARKER).read_text(encoding="utf-8")).get("loss_window")
    except (OSError, ValueError):
        return None


def rotate(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; return what was removed."""
    if keep is None:
        return []
    done = complete_checkpoints(output_dir)
    doomed = done[: max(0, len(done) - keep)]
    for path in doomed:
        atomic.remove_tree(path)
    return doomed


def clear_leftovers(output_dir: Path) -> None:
    """Staging and trash folders left by an interrupted save: never resumable, safe to drop."""
    atomic.clear_leftovers(output_dir)


# --------------------------------------------------------------------------- resuming

@dataclass(frozen=True)
class Resume:
    """Where `lora train` continues a run from: the newest complete checkpoint in output_dir
    (`--resume`, folder None), or a named folder (`--resume-from DIR`, or `--resume DIR`):
    output_dir itself or one checkpoint-N in it."""
    folder: Path | None = None


def resolve_resume(output_dir: Path, resume: Resume) -> Path:
    """The checkpoint to continue from."""
    output_dir = Path(output_dir).resolve()
    if resume.folder is None:
        where = output_dir
    else:
        where = Path(resume.folder).expanduser().resolve()
        if not where.exists():

            there = listing([p.name for p in complete_checkpoints(output_dir)], "complete checkpoints")
            raise LoraError(f"--resume-from: {resume.folder} does not exist ({there})",
                            f"pass a checkpoint-N folder inside {output_dir}, or --resume for the newest")
    if where == output_dir:
        if not output_dir.is_dir():
            raise LoraError(f"--resume: output_dir {output_dir} does not exist, so there is no run to resume",
                            "drop --resume to start the run")
        found = newest_complete(output_dir)
        if found is None:
            partial = sorted(p.name for p in output_dir.glob(f"{PREFIX}-*"))
            extra = f" ({', '.join(partial)} lack the completion marker {MARKER})" if partial else ""
            raise LoraError(f"--resume: {output_dir} holds no complete checkpoint{extra}",
                            "start again with --overwrite, or set train.save_steps so runs leave checkpoints")
        return found
    if where.parent != output_dir:
        raise LoraError(f"--resume-from: {where} is not a checkpoint of this recipe's output_dir ({output_dir})",
                        f"resume inside its own run: --set output_dir={where.parent}")
    if not is_complete(where):
        raise LoraError(f"--resume-from: {where} is not a complete checkpoint (no {MARKER}); "
                        "it was cut off while being written",
                        "resume from the newest complete one with --resume")
    return where


PICKLED_STATE_SUFFIXES = (".pt", ".pth", ".bin")  # optimizer, scheduler, scaler and RNG state: torch.save pickles


def verify_resumable(checkpoint: Path) -> None:
    """Refuse a checkpoint the Trainer would resume wrongly or unsafely: one that lost a file it
    was written with (the Trainer silently starts a fresh optimizer when optimizer.pt is gone),
    or whose pickled state holds more than tensors and the plain types the Trainer allows
    (torch.load(weights_only=True) would stop it, but with a traceback and no file named)."""
    checkpoint = Path(checkpoint)
    try:
        written = json.loads((checkpoint / MARKER).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        written = []
    missing = [name for name in written if not (checkpoint / name).exists()]
    if missing:
        raise LoraError(f"--resume: {checkpoint} lacks {', '.join(missing)}, which it was written with; resuming "
                        "would not continue the same run (a lost optimizer.pt means a fresh optimizer)",
                        "restore the files, resume from another checkpoint with --resume-from DIR, "
                        "or start again with --overwrite")
    for path in sorted(checkpoint.iterdir()):
        if path.suffix in PICKLED_STATE_SUFFIXES and path.is_file():
            _refuse_unsafe_pickle(path)


def _refuse_unsafe_pickle(path: Path) -> None:
    """Read the pickle's instructions (not its tensors, never running it) and refuse any global
    that torch's weights-only loader, with the Trainer's own numpy allowlist, would not accept."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch.save zip archive at all: damaged or foreign
        raise LoraError(f"--resume: {path} is not a checkpoint file torch can read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})",
                        "resume from another checkpoint with --resume-from DIR, or start again with --overwrite") from None
    if unsafe:
        raise LoraError(f"--resume: {path} holds objects that are not plain tensors ({', '.join(unsafe[:5])}); "
                        "lora never runs code from a pickle",
                        "resume only checkpoints lora train wrote; resume from another with --resume-from DIR, "
                        "or start again with --overwrite")


# Keys that may change between the first run and its resumption: they steer bookkeeping,
# not the numbers the run computes.
RESUME_MAY_DIFFER = {"output_dir", "train.logging_steps", "train.save_steps", "train.save_total_limit",
                     "train.eval_steps", "train.report_to", "data.cache", "data.cache_dir"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> now' for every key that matters and differs. Keys the saved recipe does
    not have (written by an older lora) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return [f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in sorted(old)
            if k not in RESUME_MAY_DIFFER and k in new and old[k] != new[k]]


def check_same_run(saved_recipe_file: Path, current: dict) -> None:
    if not saved_recipe_file.is_file():
        raise LoraError(f"--resume: {saved_recipe_file.parent} was not written by `lora train` (no {saved_recipe_file.name})",
                        "resume only runs started by lora train")
    saved = yaml.safe_load(saved_recipe_file.read_text(encoding="utf-8")) or {}
    diffs = recipe_differences(saved, current)
    if diffs:
        raise LoraError("--resume: the recipe differs from the one this run started with, so the run would not "
                        "continue the same way:\n    " + "\n    ".join(diffs),
                        f"resume with the saved recipe: lora train {shlex.quote(str(saved_recipe_file))} --resume "
                        "(or start a new run in another output_dir)")


# --------------------------------------------------------------------------- the data a run trains on

DATA_FILE = "lora_data.json"  # in output_dir: what the run's data was, so --resume can tell a change


def examples_fingerprint(dataset) -> dict:
    """Rows, tokens and a digest of the tokenised examples (ids, labels, positions, in order)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:]  # in dataset order, selections applied
    h = hashlib.sha256()
    tokens = 0
    # preference rows (lora_cli.train.preference) keep their prompt and answers apart
    columns = {"input_ids", "labels", "position_ids", "prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "label"}
    for name in sorted(columns & set(table.column_names)):
        column = table.column(name).combine_chunks()
        if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
            h.update(name.encode() + column.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            continue  # one label per row (model.task classification)
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
        h.update(name.encode() + lengths.tobytes())
        h.update(column.flatten().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        if name == "input_ids":
            tokens = int(lengths.sum())
    return {"rows": table.num_rows, "tokens": tokens, "sha256": h.hexdigest()}


def data_fingerprint(data_cfg, data) -> dict:
    """Digests of every data source the recipe names and of the tokenised examples built from them."""

    sources = {p: source_fingerprint(p, data_cfg.split) for p in data_paths(data_cfg.path) + data_paths(data_cfg.val_path)}
    return {"sources": sources, "train": examples_fingerprint(data.train),
            "eval": examples_fingerprint(data.eval) if data.eval is not None else None}


def _describe(ex: dict | None) -> str:
    return "none" if ex is None else f"{ex['rows']} rows, {ex['tokens']} tokens"


def data_differences(saved: dict, current: dict) -> list[str]:
    diffs = [f"{path}: its content changed since the run started" for path, digest in saved.get("sources", {}).items()
             if current["sources"].get(path, digest) != digest]
    for part in ("train", "eval"):
        old, new = saved.get(part), current.get(part)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            same_size = old and new and (old["rows"], old["tokens"]) == (new["rows"], new["tokens"])
            diffs.append(f"tokenised {part} examples: {_describe(old)} -> {_describe(new)}"
                         + (" (same size, different tokens)" if same_size else ""))
    return diffs


def check_same_data(output_dir: Path, current: dict) -> None:
    """Refuse to resume on data that is not what the run started with: the run would no longer
    be the one its checkpoints belong to. Runs written before this check have no record."""
    saved_file = Path(output_dir) / DATA_FILE
    if not saved_file.is_file():
        return
    diffs = data_differences(json.loads(saved_file.read_text(encoding="utf-8")), current)
    if diffs:
        raise LoraError("--resume: the training data differs from the data this run started with, so it would "
                        "not continue the same run:\n    " + "\n    ".join(diffs),
                        "restore the data as it was, or start a new run on the new data "
                        "(another output_dir, or --overwrite)")
