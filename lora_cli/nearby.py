"""What exists instead: errors that name a missing thing list the things of that kind that are
there (checkpoints of a run, adapter folders, labels, keys), so the fix is a copy-paste away."""

from __future__ import annotations

import difflib
from pathlib import Path

MAX_LISTED = 8


def listing(names, what: str) -> str:
    """'checkpoints here: checkpoint-20, checkpoint-40' (at most MAX_LISTED, then a count)."""
    names = list(names)
    if not names:
        return f"no {what} here"
    shown = ", ".join(names[:MAX_LISTED]) + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
    return f"{what} here: {shown}"


def closest(name: str, choices) -> str:
    """' (did you mean X?)' for a near miss, else ''."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def adapter_folders(folder: Path) -> list[str]:
    """Paths of the adapter folders in `folder` and of the checkpoints inside them, newest checkpoint last."""
    from lora_cli.train.checkpoint import checkpoint_step
    from lora_cli.model.adapter_folder import ADAPTER_CONFIG

    if not folder.is_dir():
        return []
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (child / ADAPTER_CONFIG).is_file():
            found.append(child)
    checkpoints = [p for p in found if checkpoint_step(p) is not None]
    others = [p for p in found if checkpoint_step(p) is None]
    return [str(p) for p in others + sorted(checkpoints, key=checkpoint_step)]


def missing_adapter_hint(path: Path) -> str | None:
    """For an adapter path that does not exist: the adapter folders and checkpoints beside it
    (a run's checkpoints when `path` names a checkpoint of a run), or None when nothing is near."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.is_dir() and parent != parent.parent:  # runs/nosuch/checkpoint-9: look in runs/
        parent = parent.parent
    found = adapter_folders(parent)
    if not found:
        return None
    return listing(found, "adapters") + closest(str(path), found)
