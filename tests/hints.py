"""Hints a command prints (`fix: ...` in errors, `(try: ...)` after a run) are followed by the
tests, so a hint that leads nowhere fails a test."""

from __future__ import annotations

import re
import shlex

HINT = re.compile(r"(?:fix|try): (.*)")
COMMAND = re.compile(r"(lora [^;()]*?)(?=$|\)|;|,? or |, e\.g\.)")


def hinted_commands(text: str) -> list[str]:
    """Every `lora ...` command in the fix/try hints of `text`, in order."""
    found = []
    for hint in HINT.findall(text):
        found += [c.strip() for c in COMMAND.findall(hint)]
    return found


def hint_text(text: str) -> str:
    """All fix/try hints of `text`, joined."""
    return "\n".join(HINT.findall(text))


def as_args(command: str, replace: dict[str, str] | None = None) -> list[str]:
    """A hinted `lora ...` command as CLI arguments (without `lora`), placeholders replaced
    (e.g. {'rows.jsonl': real_file, '...': 'a question'})."""
    words = shlex.split(command)
    assert words[0] == "lora", command
    return [(replace or {}).get(w, w) for w in words[1:]]
