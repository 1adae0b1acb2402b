"""The dependency pins behind `make lock` and `make test-floors`.

    python tools/pins.py floors            every declared dependency at its floor, as NAME==VERSION
    python tools/pins.py lock VENV         VENV's installed set as constraints.txt (torch and lora left out)

Reads pyproject.toml, the one declaration of the ranges."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK_HEADER = """\
# The exact set `make test` passes with (made by `make lock`; refresh there, never by hand).
# torch is not here: `make setup` installs the build that fits the machine first (TORCH_SPEC).
"""
# torch's floor is the build on the machine (TORCH_SPEC): its CPU and CUDA wheels differ, and an
# unpinned resolution would fetch gigabytes of CUDA packages on a CPU machine.
NOT_PINNED = {"torch", "lora-cli"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def declared(extras: tuple[str, ...] = ("test",)) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"].get(extra, [])
    return reqs


def floors() -> list[str]:
    """NAME==FLOOR for every requirement with a >= floor (the highest, when two are declared)."""
    found: dict[str, str] = {}
    for req in declared():
        m = re.search(r">=\s*([0-9][^,;\s]*)", req)
        name = _name(req)
        if m and name not in NOT_PINNED:
            if name not in found or _key(m.group(1)) > _key(found[name]):
                found[name] = m.group(1)
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def _key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+]", version))


def lock(venv: Path) -> str:
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    keep = [line for line in frozen if line and not line.startswith("#") and _name(line) not in NOT_PINNED]
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"],
                         capture_output=True, text=True, check=True).stdout.split()[1]
    return LOCK_HEADER + "\n".join(sorted(keep, key=str.lower) + [f"pip=={pip}"]) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["floors"]:
        print("\n".join(floors()))
    elif sys.argv[1:2] == ["lock"] and len(sys.argv) == 3:
        sys.stdout.write(lock(Path(sys.argv[2])))
    else:
        sys.exit(__doc__)
