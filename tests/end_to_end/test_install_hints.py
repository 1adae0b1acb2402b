"""Every install hint lora prints works as printed: it names packages that pyproject.toml
declares for that part of lora (never `lora-cli[...]`, which no package index has), and
those names are real distributions (the locked test set installs them)."""

from __future__ import annotations

import re
import shlex
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from lora_cli.libraries import install_hint

REPO = Path(__file__).resolve().parents[2]
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def _hinted_extras() -> set[str]:
    found = set()
    for path in (REPO / "lora_cli").rglob("*.py"):
        found |= set(re.findall(r"install_hint\(['\"](\w+)['\"]\)", path.read_text(encoding="utf-8")))
    return found


def test_no_message_names_a_package_the_index_lacks():
    for path in (REPO / "lora_cli").rglob("*.py"):
        assert "lora-cli[" not in path.read_text(encoding="utf-8"), path


@pytest.mark.parametrize("extra", sorted(_hinted_extras()))
def test_hint_installs_what_the_extra_declares(extra):
    assert extra in EXTRAS, f"install_hint({extra!r}) names an extra pyproject.toml does not declare"
    words = shlex.split(install_hint(extra))
    assert words[:2] == ["pip", "install"]
    assert sorted(words[2:]) == sorted(r.replace(" ", "") for r in EXTRAS[extra])
    tested = {re.split(r"[<>=!~\[]", r)[0] for r in EXTRAS["test"]}  # what the locked test set installs
    for requirement in words[2:]:
        name = re.split(r"[<>=!~\[]", requirement)[0]
        if name in tested:
            assert metadata.version(name), name  # a real distribution, installed from the index


def test_docs_name_the_locked_versions():
    locked = dict(line.lower().split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    table = re.findall(r"^\| ([\w-]+) \| ([0-9][^ |]*) \|$", (REPO / "docs/install.md").read_text(), re.M)
    assert len(table) >= 8
    for name, version in table:
        assert locked.get(name.lower()) == version, f"docs/install.md says {name} {version}, constraints.txt {locked.get(name.lower())}"
