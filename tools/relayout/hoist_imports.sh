#!/bin/bash
# Issue 20, commit "Imports at the top": regenerate it instead of cherry-picking it. Run in the repository
# root, on a clean tree whose layering is already fixed (tests/test_layers.py: no loop, no upward import):
#   bash tools/relayout/hoist_imports.sh && python -m pyflakes lora_cli && pytest -q tests/test_layers.py
# 1_hoist.py moves every function-level lora_cli import outside cli.py to the module's top (KEEP lists the
# ones a test monkeypatches on their home module), 2_tidy.py merges same-module imports and drops blank
# lines left at the start of function bodies, 3_wrap.py wraps import lines over 120 characters.
# Read the diff: a hoisted name that a function also assigns, or that a test patches on its home module,
# must go back inside its function.
set -e
here=$(dirname "$0")
python3 "$here/1_hoist.py"
python3 "$here/2_tidy.py" >/dev/null
python3 "$here/3_wrap.py"
