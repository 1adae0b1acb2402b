"""What exists instead: errors that name a missing thing list the things of that kind that are
there (checkpoints of a run, adapter folders, labels, keys), so the fix is a copy-paste away."""

from __future__ import annotations

import difflib

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
