"""Walk the README as a user would: every block marked `<!-- readme-test -->` is run, in the
order written, in a fresh folder holding copies of recipes/ and data/ (so relative paths read as
they do from the repository root).

Two kinds of block:
- ```bash: each line is a command (a trailing `# comment` is dropped); it must exit 0.
- ```console: `$ CMD` lines are commands, the lines after one are its output as printed (stdout
  then stderr, plain: what a piped or NO_COLOR run shows). `...` stands for any text within a
  line, and a line holding only `...` for any number of lines. `$ echo $?` prints the exit code
  of the command before it; a command not followed by `echo $?` must exit 0.

Commands run in-process through `lora_cli.cli.run` (one torch import for the whole walk).
`lora build-tiny` with the demo's arguments is the suite's tiny_base (conftest._tiny_model, the
same builder with build-tiny's defaults), built once per run or taken from LORA_TEST_MODEL_CACHE.
The demo run always trains: a cached run would name another walk's base folder."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = "<!-- readme-test -->"


@dataclass
class Step:
    command: str
    expected: list[str] | None  # None: output not compared (bash blocks)
    line: int                   # README line of the command
    code: int | None = None
    output: str = ""
    seconds: float = 0.0        # wall time, for the walk-through note (never asserted)


@dataclass
class Walk:
    root: Path
    steps: list[Step] = field(default_factory=list)


def readme_steps(text: str) -> list[Step]:
    """The commands of every marked block, in order, with the output the README shows."""
    lines = text.splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != MARK:
            i += 1
            continue
        fence = i + 1
        kind = lines[fence].strip().removeprefix("```")
        body_start = fence + 1
        end = next(j for j in range(body_start, len(lines)) if lines[j].strip() == "```")
        body = lines[body_start:end]
        if kind == "bash":
            for k, raw in enumerate(body):
                words = shlex.split(raw, comments=True)
                if words:
                    steps.append(Step(shlex.join(words), None, body_start + k + 1))
        elif kind == "console":
            for k, raw in enumerate(body):
                if raw.startswith("$ "):
                    steps.append(Step(raw[2:].strip(), [], body_start + k + 1))
                elif steps and steps[-1].expected is not None:
                    steps[-1].expected.append(raw)
                else:
                    raise AssertionError(f"README line {body_start + k + 1}: output before any `$ ` command")
        else:
            raise AssertionError(f"README line {fence + 1}: a readme-test block must be ```bash or ```console")
        i = end + 1
    return steps


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line-by-line match; `...` inside a line is any text, a line of just `...` any lines."""
    if not expected:
        return not actual
    head, rest = expected[0], expected[1:]
    if head.strip() == "...":
        return any(matches(rest, actual[k:]) for k in range(len(actual) + 1))
    if not actual:
        return False
    pattern = ".*".join(re.escape(part) for part in head.rstrip().split("..."))
    return re.fullmatch(pattern, actual[0].rstrip()) is not None and matches(rest, actual[1:])


def _run_lora(args: list[str]) -> tuple[int, str]:
    from lora_cli.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(args)
    return code, out.getvalue() + err.getvalue()


def run_step(step: Step, previous: Step | None, repo: Path, root: Path) -> None:
    words = shlex.split(step.command)
    if words == ["echo", "$?"]:
        step.code, step.output = 0, f"{previous.code}\n"
        return
    if words[0] != "lora":
        raise AssertionError(f"README line {step.line}: only `lora ...` and `echo $?` lines can be run: {step.command}")
    args = words[1:]
    if args == ["build-tiny", "--out", "models/tiny-llama", "--data", "data/demo.jsonl"]:
        from conftest import BUILD_TINY_DEFAULTS, _tiny_model  # the suite's own builder and cache

        _tiny_model(root / "models" / "tiny-llama", **BUILD_TINY_DEFAULTS)  # the tiny_base fixture's build
        step.code = 0
        return
    step.code, step.output = _run_lora(args)


def walk_readme(repo: Path, root: Path) -> Walk:
    """Run every marked block of repo/README.md in `root`; returns each step with its exit code and output."""
    for folder in ("recipes", "data"):
        shutil.copytree(repo / folder, root / folder)
    steps = readme_steps((repo / "README.md").read_text(encoding="utf-8"))
    walk = Walk(root)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        previous = None
        for step in steps:
            start = time.monotonic()
            run_step(step, previous, repo, root)
            step.seconds = time.monotonic() - start
            walk.steps.append(step)
            previous = step
    finally:
        os.chdir(cwd)
    return walk


def problems(walk: Walk) -> list[str]:
    """Every step that failed or printed something other than the README shows."""
    found = []
    for k, step in enumerate(walk.steps):
        checked_by_echo = k + 1 < len(walk.steps) and walk.steps[k + 1].command == "echo $?"
        if step.code != 0 and not checked_by_echo:
            found.append(f"README line {step.line}: `{step.command}` exited {step.code}:\n{step.output[-3000:]}")
        elif step.expected is not None and not matches(step.expected, step.output.splitlines()):
            found.append(f"README line {step.line}: `{step.command}` printed\n{step.output}\n"
                         f"but the README shows\n" + "\n".join(step.expected))
    return found
