"""The README, read top to bottom and run as a newcomer would (tests/readme_walk.py)."""

from __future__ import annotations

import pytest

from conftest import REPO
from readme_walk import MARK, Walk, matches, problems, readme_steps, run_step

# the README walk runs once per worker: this file and test_hints.py go to the same one
pytestmark = pytest.mark.xdist_group("readme_walk")


def test_the_walker_reads_blocks_and_matches_output_as_documented():
    text = "\n".join([
        "prose", MARK, "```bash", "lora build-tiny --out m   # a comment", "", "```",
        "```bash", "lora not-run", "```",
        MARK, "```console", "$ lora check r.yaml", "r.yaml: ok (2 warnings)", "$ echo $?", "0", "```"])
    steps = readme_steps(text)
    assert [s.command for s in steps] == ["lora build-tiny --out m", "lora check r.yaml", "echo $?"]
    assert steps[0].expected is None and steps[1].expected == ["r.yaml: ok (2 warnings)"]
    assert matches(["a ... z", "...", "end"], ["a b c z", "x", "y", "end"])
    assert matches(["...", "end"], ["end"])
    assert not matches(["a ... z"], ["a b c"])              # a contradicting line fails
    assert not matches(["one"], ["one", "extra line"])      # so does output the README does not show
    assert not matches(["one", "two"], ["one"])


def test_every_readme_block_marked_for_running_is_runnable():
    steps = readme_steps((REPO / "README.md").read_text(encoding="utf-8"))
    commands = [s.command for s in steps]
    assert commands[:3] == ["lora build-tiny --out models/tiny-llama --data data/demo.jsonl",
                            "lora train recipes/demo.yaml", "lora generate --adapter runs/demo '用一句话解释什么是LoRA'"]
    assert all(c.startswith("lora ") or c == "echo $?" for c in commands)


def test_the_walks_tiny_base_is_what_build_tiny_makes_by_default():
    """The walk's `lora build-tiny` is the suite's tiny_base build (conftest.BUILD_TINY_DEFAULTS)."""
    import inspect

    from conftest import BUILD_TINY_DEFAULTS
    from lora_cli.cli import build_tiny

    params = inspect.signature(build_tiny).parameters
    assert {name: params[name].default for name in BUILD_TINY_DEFAULTS} == BUILD_TINY_DEFAULTS


@pytest.mark.slow
def test_the_readme_runs_in_order_and_prints_what_it_shows(readme_walk):
    for step in readme_walk.steps:  # shown with -s: the walk-through's timings
        print(f"{step.seconds:8.1f} s  exit {step.code}  {step.command}")
    found = problems(readme_walk)
    assert not found, "\n\n".join(found)


def test_the_docs_print_the_errors_and_warnings_they_show(monkeypatch):
    """The marked blocks of docs/commands.md (a recipe error) and docs/hyperparameters.md (the
    --strict lint) run from the repository root as the README's do: they read the recipe and
    write nothing."""
    monkeypatch.chdir(REPO)
    walk = Walk(REPO)
    for doc in ("commands.md", "hyperparameters.md"):
        steps = readme_steps((REPO / "docs" / doc).read_text(encoding="utf-8"))
        assert steps and steps[-1].command == "echo $?", doc
        for step in steps:
            run_step(step, walk.steps[-1] if walk.steps else None, REPO, REPO)
            walk.steps.append(step)
    found = problems(walk)
    assert not found, "\n\n".join(found)
