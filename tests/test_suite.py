"""The suite's own plumbing.

Under `make test` (pytest-xdist, --dist loadgroup) every test of a file runs on one worker, so a
file's module-scoped fixtures (trained adapters, the bench quick runs) are built once. xdist names
a test's group by appending it to the node id; pytest 9.2 stopped that from taking effect
(pytest-xdist issue 1386) and every test became its own group, nothing failing: the first test
is what fails then.

tests/ mirrors the package's rooms; what several rooms' tests share lives in conftest.py or in a
helper module at tests/ (inference_helpers, preference_helpers, ...), never in another room's
test file: the second test keeps it so."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_a_file_is_one_xdist_group(request):
    if not (hasattr(request.config, "workerinput") and request.config.getvalue("loadgroup")):
        return  # not an xdist worker under --dist loadgroup: there are no groups to check
    assert request.node.nodeid.endswith("@tests/test_suite.py"), request.node.nodeid


def test_no_test_file_imports_another_rooms_test_file():
    rooms = {p.stem: p.parent for p in TESTS.rglob("test_*.py")}
    crossing = []
    for path in TESTS.rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            crossing += [f"{path.relative_to(TESTS)} imports {name}" for name in names
                         if name in rooms and rooms[name] != path.parent]
    assert not crossing, crossing
