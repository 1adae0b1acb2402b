"""Every hint leads somewhere: the next steps and fixes commands print are followed here, on the
README's own demo run (the `readme_walk` fixture), and errors that name a missing thing list
what exists instead."""

from __future__ import annotations

import os
import re

import pytest

from hints import as_args, hint_text, hinted_commands

# the README walk runs once per worker: this file and test_readme.py go to the same one
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("readme_walk")]


@pytest.fixture
def in_walk(readme_walk):
    cwd = os.getcwd()
    os.chdir(readme_walk.root)
    yield readme_walk.root
    os.chdir(cwd)


def test_the_finished_demo_run_ends_with_a_hint_that_works(in_walk, cli, readme_walk):
    train = next(s for s in readme_walk.steps if s.command == "lora train recipes/demo.yaml")
    if train.output:  # empty when the run came from LORA_TEST_MODEL_CACHE
        (hinted,) = hinted_commands(train.output)
        res = cli(*as_args(hinted, {"...": "用一句话解释什么是LoRA"}))
        assert res.code == 0 and res.out.strip(), res
    from lora_cli.tasks import TASKS

    res = cli(*as_args(TASKS["causal_lm"].next_step("runs/demo"), {"...": "What is LoRA?"}))
    assert res.code == 0 and res.out.strip(), res


def test_a_finished_run_is_not_offered_resume(in_walk, cli):
    again = cli("train", "recipes/demo.yaml")
    assert again.code == 2 and "already holds files from another run" in again.err
    assert "--resume" not in hint_text(again.err), again.err  # it would be refused:
    resumed = cli("train", "recipes/demo.yaml", "--resume")
    assert resumed.code == 2 and "already finished" in resumed.err
    # what the hint does offer works: another output_dir (checked with a dry run) or --overwrite
    assert "--set output_dir=runs/new" in again.err and "--overwrite" in again.err
    assert cli("train", "recipes/demo.yaml", "--set", "output_dir=runs/new", "--dry-run").code == 0


def test_a_missing_checkpoint_lists_those_that_exist(in_walk, cli):
    res = cli("save", "runs/demo/checkpoint-40", "--out", "adapters/nope")
    assert res.code == 2 and "runs/demo/checkpoint-40 does not exist" in res.err, res
    listed = re.findall(r"runs/demo/checkpoint-\d+", res.err.split("fix:")[1])
    assert listed, res.err
    existing = {f"runs/demo/{p.name}" for p in (in_walk / "runs" / "demo").glob("checkpoint-*")}
    assert set(listed) == existing
    saved = cli("save", listed[-1], "--out", "adapters/from-hint")
    assert saved.code == 0, saved
    resumed = cli("train", "recipes/demo.yaml", "--resume-from", "runs/demo/checkpoint-1")
    assert resumed.code == 2 and "complete checkpoints here: checkpoint-" in resumed.err, resumed


def test_a_missing_adapter_lists_the_adapters_beside_it(in_walk, cli):
    res = cli("generate", "--adapter", "runs/dmeo", "hi")
    assert res.code == 2 and "runs/dmeo does not exist" in res.err
    assert "adapters here: runs/demo" in res.err and "did you mean runs/demo?" in res.err, res.err


def test_the_readme_checks_try_lines_clear_their_warnings(cli):
    """`lora check recipes/demo.yaml` (the README's worked example) ends each warning with
    `try: KEY: VALUE`; set as `--set KEY=VALUE`, each clears its own warning."""
    import json

    from conftest import REPO

    recipe = REPO / "recipes" / "demo.yaml"
    warnings = json.loads(cli("check", recipe, "--json").out)["warnings"]
    assert {w["key"] for w in warnings} == {"train.learning_rate", "train.epochs"}
    for w in warnings:
        key, value = re.match(r"([\w.]+): ([^\s,(]+)", w["try"]).groups()
        assert key == w["key"], w
        res = cli("check", recipe, "--set", f"{key}={value}", "--json")
        assert res.code == 0 and key not in {x["key"] for x in json.loads(res.out)["warnings"]}, (w, res.out)


def test_analyzes_sweep_hint_runs_as_printed(in_walk, cli):
    """`lora analyze runs/demo` finds the demo's rank limiting and offers a sweep to confirm it:
    the hinted command runs (each rank cut to one step here: the hint, not the sweep, is tested)."""
    res = cli("analyze", "runs/demo", "--no-base")
    assert res.code == 0 and "under-provisioned" in res.out, res
    (hinted,) = hinted_commands(res.out)
    assert hinted == ("lora sweep runs/demo/lora_recipe.yaml --ranks 16,32,64 "
                      "--set output_dir=runs/demo-sweep"), hinted
    swept = cli(*as_args(hinted), "--set", "train.max_steps=1")
    assert swept.code == 0, swept
    assert sorted(p.name for p in (in_walk / "runs" / "demo-sweep").glob("r*") if p.is_dir()) == ["r16", "r32", "r64"]
