"""What the output may look like: colour, box drawing and live bars on a terminal; plain text
when stdout is piped or NO_COLOR is set (https://no-color.org). Meaning never rides on colour
alone: every coloured mark also has a text form, so plain output loses nothing."""

from __future__ import annotations

import os
import sys


def plain() -> bool:
    """True when output should carry no colour, no box drawing and no live redraws."""
    if os.environ.get("NO_COLOR"):
        return True
    if os.environ.get("FORCE_COLOR") or os.environ.get("TTY_COMPATIBLE") == "1":
        return False
    stream = sys.stdout
    return not (hasattr(stream, "isatty") and stream.isatty())


def table_box():
    """rich's box for tables: its default heavy head on a terminal, Markdown pipes otherwise
    (readable in a log, pasteable into an issue)."""
    from rich import box

    return box.MARKDOWN if plain() else box.HEAVY_HEAD
