#!/usr/bin/env python3
"""Re-lay the flat lora_cli/ package into rooms (issue 20): the mechanical part, reproducibly.

Run it in the root of any checkout of the project:

    python3 tools/relayout/relayout.py            # move + rewrite
    python3 tools/relayout/relayout.py --check    # exit 1 if anything is left to do (no writes)

It
  1. `git mv`s every module named in OLD_TO_NEW to its room (skipped when already moved), creating the
     rooms' empty __init__.py files;
  2. rewrites every reference to an old module path in lora_cli/, tests/, bench/, docs/, README.md,
     pyproject.toml and Makefile:
       - dotted paths anywhere in the text: `lora_cli.model.load_base_model` -> `lora_cli.model.load.load_base_model`
         (imports, monkeypatch / mock.patch targets, importlib strings, docs);
       - `from lora_cli import a, b as c` -> one `from lora_cli.<room> import <module> [as <name>]` per module,
         keeping the name the code binds (`from lora_cli import model` -> `from lora_cli.model import load as model`);
       - file paths `lora_cli/model.py` -> `lora_cli/model/load.py`;
       - the README's layout block lines "- `model.py`: ..." -> "- `model/load.py`: ...".
  3. once the hand-made split commits of branch issue-20 are in the tree (their new modules exist),
     carries imports of the names they moved (SYMBOL_MOVES): `from lora_cli.inputs import verify_adapter`
     -> `from lora_cli.model.adapter_folder import verify_adapter`; before that, step 3 does nothing.
It is idempotent (a second run changes nothing) and works on a tree that gained new flat modules and
functions since: an unknown module stays where it is; only its imports of moved modules are rewritten.
What it cannot see: a moved name reached through a module object (`tasks.build_data` after
`from lora_cli import tasks`); grep for those after a run (test_layers / the suite will fail on them).

Merging (the lead): on master with the feature branches merged, run this script and commit the result
("relayout: ... (generated)"), then cherry-pick issue-20's hand-made commits (all after its first),
then run this script once more (it rewrites the feature code's imports of moved names) and commit.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = "lora_cli"

# old module (dotted, under lora_cli) -> new module. Modules not listed (cli, errors, and any new ones) stay.
OLD_TO_NEW = {
    # files/: writing whole, ownership of output folders, defensive reading of what users hand in
    "atomic": "files.atomic",
    "ownership": "files.ownership",
    "inputs": "files.inputs",
    # recipe/: the one schema
    "recipe": "recipe.schema",
    # data/: sources and row shapes, templates, tokenised examples, cache, batch layout
    "formats": "data.formats",
    "template": "data.template",
    "data": "data.examples",
    "cache": "data.cache",
    "batching": "data.batching",
    # tasks/: the model.task registry (its __init__), implementations split out later
    "tasks": "tasks",
    # model/: loading, adapter methods and targets, wrapping, analysis of saved adapters
    "model": "model.load",
    "methods": "model.methods",
    "targets": "model.targets",
    "adapters": "model.adapters",
    "analyze": "model.analyze",
    # train/: the run and everything that plans, checks, guards or measures it
    "train": "train.run",
    "checkpoint": "train.checkpoint",
    "preflight": "train.preflight",
    "plot": "train.metrics",
    "lint": "train.lint",
    "estimate": "train.estimate",
    "sweep": "train.sweep",
    "preview": "train.preview",
    # infer/: engines and everything that generates
    "infer": "infer.generate",
    "backends": "infer.engines",
    "serve": "infer.serve",
    "serve_vllm": "infer.vllm",
    # export/: merged models and files for other runtimes
    "merge": "export.merge",
    "export": "export.gguf",
    # tiny/: the small offline bases of `lora build-tiny`
    "tiny": "tiny.decoder",
    "tiny_encoders": "tiny.encoders",
    # the modules that landed flat while the re-layout waited (second pass)
    "terminal": "ui.terminal",
    "progress": "ui.progress",
    "nearby": "ui.nearby",
    "token_budget": "data.token_budget",
    "kernels": "model.kernels",
    "activations": "train.activations",
    "objectives": "train.objectives",
    "preference": "train.preference",
    "serve_guard": "infer.guard",
    "metrics": "eval.metrics",
    "evaluate": "eval.run",
    "harness": "eval.harness",
    "recipe_schema": "recipe.json_schema",
}

ROOM_DOCS = {
    "files": "Writing whole (atomic), output-folder ownership, and defensive reading of user input.",
    "recipe": "The recipe schema: every key, its type, default and doc; loading, --set, checks.",
    "data": "Data: sources and row shapes, prompt templates, tokenised examples, the cache, batch layout.",
    "model": "Models: loading base + tokenizer + adapters, adapter methods and targets, wrapping.",
    "train": "Training: the run, checkpoints, pre-flight checks, metrics, lint, estimate, sweep, preview.",
    "infer": "Inference: engines, generate/chat, the OpenAI-compatible server, the vLLM launcher.",
    "export": "Export: merged models and GGUF / Ollama files.",
    "ui": "What the user sees while waiting or after a mistake: plain or rich output, progress, what exists instead.",
    "eval": "Evaluation: the metric registry, `lora eval` over candidates, lm-evaluation-harness.",
    "tiny": "The small offline bases `lora build-tiny` writes (tests and the demo use them).",
}

TEXT_FILES = ["README.md", "pyproject.toml", "Makefile"]
TEXT_DIRS = ["lora_cli", "tests", "bench", "docs"]
SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yaml", ".yml", ".json"}

# Exact, file-specific fixups the general rules cannot see (module names built at run time).
# Each is (path, old, new); applied only while `old` is present, so a rerun is a no-op.
FIXUPS = [
    # the cache key walks the package from this file's folder, which is now lora_cli/data/
    ("lora_cli/data/cache.py", "    package_dir = package_dir or Path(__file__).parent\n",
     "    package_dir = package_dir or Path(__file__).parents[1]  # lora_cli/, the room's parent\n"),
    # the recipe-key scan read "lora_cli.data.batching" in a docstring as the key data.batching
    ("tests/test_check.py", 're.findall(rf"\\b({\'|\'.join(SECTIONS)})', 're.findall(rf"(?<![.\\w])({\'|\'.join(SECTIONS)})'),
    ("tests/test_check.py", '@pytest.mark.parametrize("module", ["lint", "sweep", "estimate", "preflight"])',
     '@pytest.mark.parametrize("module", ["train.lint", "train.sweep", "train.estimate", "train.preflight"])'),
    ("tests/test_data.py", 'template = package / "template.py"', 'template = package / "data" / "template.py"'),
    ("tests/test_cli.py",
     'modules = sorted(p.name for p in (REPO / "lora_cli").glob("*.py") if p.name != "__init__.py")',
     'modules = sorted(p.relative_to(REPO / "lora_cli").as_posix() for p in (REPO / "lora_cli").rglob("*.py")\n'
     '                     if p.name != "__init__.py" or p.parent.name != "lora_cli" and has_code(p))  # a room\'s registry'),
    ("tests/test_cli.py", '\n\ndef test_readme_layout_lists_every_module_once():',
     '\n\ndef has_code(path) -> bool:\n'
     '    """More than a docstring: an __init__.py that holds code (a registry) is listed like a module."""\n'
     '    import ast\n\n'
     '    body = ast.parse(path.read_text(encoding="utf-8")).body\n'
     '    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)\n'
     '\n\ndef test_readme_layout_lists_every_module_once():'),
]


def sh(*args: str) -> None:
    subprocess.run(args, check=True)


def module_file(root: Path, dotted: str) -> Path:
    parts = dotted.split(".")
    package = root / PACKAGE / Path(*parts)
    return package / "__init__.py" if package.is_dir() else package.with_suffix(".py")


def new_file(root: Path, new: str) -> Path:
    """Where module `new` lives: a package's __init__.py when another module sits under it, else new.py."""
    parts = new.split(".")
    if any(other.startswith(new + ".") for other in OLD_TO_NEW.values()) or len(parts) == 1:
        return root / PACKAGE / Path(*parts) / "__init__.py"
    return root / PACKAGE / Path(*parts).with_suffix(".py")


def move_modules(root: Path, dry: bool) -> list[str]:
    todo = []
    for old, new in OLD_TO_NEW.items():
        src = root / PACKAGE / f"{old}.py"
        dst = new_file(root, new)
        if not src.is_file():
            continue  # already moved (or never existed on this branch)
        todo.append(f"move {src.relative_to(root)} -> {dst.relative_to(root)}")
        if dry:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        sh("git", "mv", str(src), str(dst))
    rooms = sorted({new.split(".")[0] for new in OLD_TO_NEW.values()})
    for room in rooms:
        init = root / PACKAGE / room / "__init__.py"
        if init.exists():
            continue
        todo.append(f"create {init.relative_to(root)}")
        if dry:
            continue
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(f'"""{ROOM_DOCS.get(room, room)}"""\n', encoding="utf-8")
        sh("git", "add", str(init))
    return todo


# --------------------------------------------------------------------------- rewriting references

def _new_submodule_names() -> set[str]:
    """Every dotted name (under lora_cli) that is a new module or room: text already pointing at one is done."""
    names = set()
    for new in OLD_TO_NEW.values():
        parts = new.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


NEW_NAMES = _new_submodule_names()
# Dotted strings that look like module paths but are data written into users' files: never rewritten.
PROTECTED = ("lora_cli.export.written_by",)  # GGUF metadata key that marks a file `lora export` wrote
# longest first, so `serve_vllm` is tried before `serve`
OLD_NAMES = sorted((o for o, n in OLD_TO_NEW.items() if o != n), key=len, reverse=True)
DOTTED = re.compile(rf"\b{PACKAGE}\.({'|'.join(map(re.escape, OLD_NAMES))})\b((?:\.[A-Za-z_]\w*)*)")


ROOT = Path.cwd()


def is_new_module(room: str, name: str) -> bool:
    """Whether lora_cli.<room>.<name> is a module of a room: listed here, or made later in the tree."""
    if f"{room}.{name}" in NEW_NAMES:
        return True
    path = ROOT / PACKAGE / room / name
    return (ROOT / PACKAGE / room).is_dir() and (path.with_suffix(".py").is_file() or path.is_dir())


def _dotted(match: re.Match) -> str:
    old, rest = match.group(1), match.group(2)
    if match.group(0) in PROTECTED:
        return match.group(0)
    first = rest.split(".")[1] if rest else ""
    if first and is_new_module(old, first):
        return match.group(0)  # already a new path (lora_cli.model.load...)
    imported = IMPORTED.match(match.string, match.end())
    if not rest and imported and is_new_module(old, imported.group(1)):
        return match.group(0)  # already `from lora_cli.train import run as ...`: a room's module
    return f"{PACKAGE}.{OLD_TO_NEW[old]}{rest}"


IMPORTED = re.compile(r"[ \t]+import[ \t]+\(?\s*([A-Za-z_]\w*)")

FROM_PACKAGE = re.compile(rf"^(?P<indent>[ \t]*)from {PACKAGE} import (?P<names>\([^)]*\)|[^\n#]+?)(?P<comment>[ \t]*#[^\n]*)?$",
                          re.M)


def _from_package(match: re.Match) -> str:
    """`from lora_cli import a, b as c`: each moved module gets its own line from its room."""
    indent, comment = match.group("indent"), match.group("comment") or ""
    names = [n.strip() for n in match.group("names").strip("()").replace("\n", " ").split(",") if n.strip()]
    if not any(n.split(" as ")[0].strip() in OLD_TO_NEW and OLD_TO_NEW[n.split(" as ")[0].strip()] != n.split(" as ")[0].strip()
               for n in names):
        return match.group(0)
    stay, rooms = [], {}
    for n in names:
        name, _, alias = (p.strip() for p in n.partition(" as "))
        new = OLD_TO_NEW.get(name, name)
        if new == name:
            stay.append(n)
            continue
        room, _, leaf = new.rpartition(".")
        bound = alias or name
        rooms.setdefault(room, []).append(leaf + (f" as {bound}" if bound != leaf else ""))
    lines = [f"from {PACKAGE}.{room} import {', '.join(leaves)}" for room, leaves in rooms.items()]
    if stay:
        lines.insert(0, f"from {PACKAGE} import {', '.join(stay)}")
    lines[-1] += comment
    return "\n".join(indent + line for line in lines)


MOVED = sorted(OLD_TO_NEW, key=len, reverse=True)  # tasks.py -> tasks/__init__.py keeps its dotted name
FILE_PATH = re.compile(rf"\b{PACKAGE}/({'|'.join(map(re.escape, MOVED))})\.py\b")
LAYOUT_LINE = re.compile(rf"^- `({'|'.join(map(re.escape, MOVED))})\.py`", re.M)


def _path_of(old: str) -> str:
    new = OLD_TO_NEW[old]
    if any(other.startswith(new + ".") for other in OLD_TO_NEW.values()) or "." not in new:
        return new.replace(".", "/") + "/__init__.py"
    return new.replace(".", "/") + ".py"


# --------------------------------------------------------------------------- names that left their module

# The hand-made split commits on top of the generated one move some names to a new module of the
# same room. (new module, old module, names): applied only once the new module exists in the tree,
# so on an older tree this does nothing; on a merged tree it carries the imports others wrote.
SYMBOL_MOVES = [
    ("infer.settings", "infer.generate", ["GenerationSettings"]),
    ("model.adapter_folder", "files.inputs",
     ["ADAPTER_WEIGHTS", "verify_adapter", "LORA_KINDS", "adapter_config_problems", "lora_shape_problems"]),
    ("model.adapter_folder", "model.load", ["RECIPE_FILE", "AdapterInfo", "find_recipe_file", "read_adapter"]),
    ("model.adapter_folder", "train.checkpoint", ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]),
    # tasks/__init__ keeps the registry (Task, TASKS, get_task, recipe checks, load kwargs, bind_tokenizer)
    ("tasks.hooks", "tasks", ["prepare_recipe", "build_data", "make_collator", "trainer_kwargs",
                              "eval_gathers_predictions", "report_held_out", "EVAL_REPORT_FILE", "data_report_lines",
                              "example_lines", "DRY_RUN_EVAL_ROWS"]),
    ("tasks.classification", "tasks",
     ["LabeledRow", "read_labeled_rows", "labels_from_rows", "label_id", "resolve_labels", "tokenize_labeled",
      "ClassificationStats", "ClassificationData", "split_items", "labeled_items", "build_classification_data",
      "to_dataset", "ClassificationCollator", "pad_right", "ClassificationReport", "classification_metrics",
      "predict_probabilities", "evaluate_rows", "eval_rows", "predict_file", "IMBALANCE_RATIO"]),
    ("tasks.seq2seq", "tasks", ["seq2seq_pair", "tokenize_seq2seq", "build_seq2seq_data", "Seq2SeqCollator"]),
    ("model.adapter_folder", "tasks", ["refuse_unless"]),
    # data/formats.py keeps the row shapes; reading sources moved out
    ("data.sources", "data.formats", ["TEXT_SUFFIXES", "SUFFIXES", "Source", "data_paths", "looks_like_hub_id",
                                      "read_source", "read_rows", "load_hub_dataset"]),
    # train/run.py keeps the set-up order; the Trainer subclass and its callbacks moved out
    ("train.trainer", "train.run", ["SafeTrainer", "RunGuard", "AtomicCheckpoints", "RichProgress", "TrainingStopped",
                                    "EXIT_NONFINITE"]),
]


def _from_module(pattern_module: str) -> re.Pattern:
    return re.compile(rf"^(?P<indent>[ \t]*)from {PACKAGE}\.{re.escape(pattern_module)} import "
                      rf"(?P<names>\([^)]*\)|[^\n#(]+?)(?P<comment>[ \t]*#[^\n]*)?$", re.M)


def move_symbols(root: Path, text: str) -> str:
    for new, old, names in SYMBOL_MOVES:
        if not module_file(root, new).is_file():
            continue
        for name in names:  # dotted uses: mock.patch("lora_cli.files.inputs.verify_adapter")
            text = re.sub(rf"\b{PACKAGE}\.{re.escape(old)}\.{name}\b", f"{PACKAGE}.{new}.{name}", text)

        def split(match: re.Match) -> str:
            parts = [n.strip() for n in match.group("names").strip("()").replace("\n", " ").split(",") if n.strip()]
            moved = [n for n in parts if n.split(" as ")[0].strip() in names]
            if not moved:
                return match.group(0)
            kept = [n for n in parts if n not in moved]
            indent, comment = match.group("indent"), match.group("comment") or ""
            lines = ([f"from {PACKAGE}.{old} import {', '.join(kept)}"] if kept else []) + \
                [f"from {PACKAGE}.{new} import {', '.join(moved)}"]
            lines[-1] += comment
            return "\n".join(indent + line for line in lines)

        text = _from_module(old).sub(split, text)
    return text


def rewrite_text(text: str, *, readme: bool = False, root: Path | None = None) -> str:
    text = DOTTED.sub(_dotted, text)
    if root is not None:
        text = move_symbols(root, text)
    text = FROM_PACKAGE.sub(_from_package, text)
    text = FILE_PATH.sub(lambda m: f"{PACKAGE}/{_path_of(m.group(1))}", text)
    if readme and "<!-- layout:start -->" in text:
        head, _, rest = text.partition("<!-- layout:start -->")
        block, _, tail = rest.partition("<!-- layout:end -->")
        block = LAYOUT_LINE.sub(lambda m: f"- `{_path_of(m.group(1))}`", block)
        text = f"{head}<!-- layout:start -->{block}<!-- layout:end -->{tail}"
    return text


def candidate_files(root: Path) -> list[Path]:
    files = [root / f for f in TEXT_FILES if (root / f).is_file()]
    for d in TEXT_DIRS:
        files += [p for p in sorted((root / d).rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                  and "__pycache__" not in p.parts]
    return files


def rewrite_all(root: Path, dry: bool) -> list[str]:
    changed = []
    for path in candidate_files(root):
        text = path.read_text(encoding="utf-8")
        new = rewrite_text(text, readme=path.name == "README.md", root=root)
        rel = path.relative_to(root).as_posix()
        for file, old, fixed in FIXUPS:
            if rel == file and old in new and fixed not in new:
                new = new.replace(old, fixed)
        if new != text:
            changed.append(f"rewrite {rel}")
            if not dry:
                path.write_text(new, encoding="utf-8")
    return changed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report what is left to do; change nothing")
    args = parser.parse_args()
    root = Path.cwd()
    if not (root / PACKAGE).is_dir():
        sys.exit(f"run me in the root of a checkout: no {PACKAGE}/ in {root}")
    todo = move_modules(root, args.check) + rewrite_all(root, args.check)
    for line in todo:
        print(line)
    if args.check:
        return 1 if todo else 0
    print(f"{len(todo)} change(s)" if todo else "nothing to do: already re-laid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
