"""What every adversarial case asserts: the command refused cleanly (exit code, no traceback,
the culprit named) and the user's files are exactly as they were.

Shared by test_adversarial_inputs.py and test_adversarial_disk.py."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """Every entry under root (root itself excluded): relative path -> (kind, mode, content
    digest or link target). Symlinks are recorded, never followed, so a loop is fine."""
    root = Path(root)
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", mode, None)
            elif not stat.S_ISREG(st.st_mode):  # a FIFO or socket: reading it would block
                snap[rel] = ("special", mode, stat.S_IFMT(st.st_mode))
            else:
                snap[rel] = ("file", mode, _digest(path) if mode & stat.S_IRUSR else f"size {st.st_size}")
    return snap


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # builtin open: cases may patch Path.open to simulate EACCES
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_changes(before: dict, after: dict) -> list[str]:
    """What differs between two snapshots, one line per path."""
    changes = [f"deleted {p}" for p in sorted(before.keys() - after.keys())]
    changes += [f"created {p}" for p in sorted(after.keys() - before.keys())]
    changes += [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys())
                if before[p] != after[p]]
    return changes


def assert_tree_unchanged(before: dict, after: dict) -> None:
    changes = tree_changes(before, after)
    assert not changes, "the command changed the user's files:\n  " + "\n  ".join(changes)


def assert_clean_refusal(result, culprit: str, code: int = 2) -> None:
    """`result` (the cli fixture's CliResult or a subprocess.CompletedProcess) exited `code`,
    printed no traceback, and its output names `culprit`."""
    got = getattr(result, "code", getattr(result, "returncode", None))
    out = getattr(result, "out", getattr(result, "stdout", "")) or ""
    err = getattr(result, "err", getattr(result, "stderr", "")) or ""
    text = out + err
    assert "Traceback (most recent call last)" not in text, f"traceback in output:\n{text[-3000:]}"
    assert got == code, f"exit code {got}, expected {code}; output:\n{text[-3000:]}"
    flat = " ".join(text.split())  # messages may wrap on narrow terminals
    assert " ".join(culprit.split()) in flat, f"output does not name {culprit!r}:\n{text[-3000:]}"
