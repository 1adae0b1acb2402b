"""Outputs over inputs (issue 26, class 5): every command that writes a file goes through the
one output check (lora_cli.files.ownership.check_output). No --out / --plot may be, hold or sit inside
one of the command's inputs (adapter, base, data, prompt file, the recipe and its data); an
existing file is replaced only with --force, and only when the same lora command wrote it.

Each case runs the real command in-process on a user's folder and asserts exit 2, no traceback,
the culprit named, and every file of the folder as it was. docs/reliability.md lists the cases
(`test_docs_list_every_output_case` keeps the two in step)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import REPO, demo_rows, make_recipe, write_jsonl
from inference_helpers import random_adapter
from safety_helpers import assert_clean_refusal, assert_tree_unchanged, snapshot_tree


@dataclass
class User:
    root: Path
    base: Path
    adapter_src: Path

    def adapter(self) -> Path:
        dest = self.root / "adapter"
        if not dest.exists():
            shutil.copytree(self.adapter_src, dest)
        return dest

    def file(self, name: str, text: str = "the user's own notes\n") -> Path:
        (self.root / name).write_text(text, encoding="utf-8")
        return self.root / name

    def prompts(self) -> Path:
        return write_jsonl(self.root / "prompts.jsonl", [{"instruction": "hi"}])

    def recipe(self) -> Path:
        return make_recipe(self.root, self.base, train={"max_steps": 1})


@dataclass
class Case:
    name: str
    setup: Callable[[User], list]
    culprit: str


def _analyze(plot: Callable[[User], Path], *extra):
    return lambda u: ["analyze", u.adapter(), "--no-base", "--plot", plot(u), *extra]


def _generate(out: Callable[[User], Path], *extra):
    return lambda u: ["generate", "--adapter", u.adapter(), "--file", u.prompts(), "--out", out(u), *extra]


def _export(out: Callable[[User], Path], *extra):
    return lambda u: ["export", "--adapter", u.adapter(), "--format", "gguf", "--out", out(u), *extra]


def _sweep(plot: Callable[[User], Path]):
    def argv(u):
        recipe = u.recipe()
        return ["sweep", recipe, "--ranks", "2,4", "--plot", plot(u), "--force"]
    return argv


def _predict(out: Callable[[User], Path], rows: Callable[[User], Path]):
    return lambda u: ["predict", "--adapter", u.adapter(), "--file", rows(u), "--out", out(u), "--force"]


def _rows(u):
    return write_jsonl(u.root / "rows.jsonl", [{"text": "a row"}])


def _weights(u):
    return u.adapter() / "adapter_model.safetensors"


def _tiny(out: Callable[[User], Path], *extra):
    def argv(u):
        data = write_jsonl(u.root / "data.jsonl", demo_rows(4))
        return ["build-tiny", "--out", out(u), "--data", data, "--steps", "1", *extra]
    return argv


def _users_model(u):
    folder = u.root / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}', encoding="utf-8")
    return folder


CASES = [
    # analyze --plot replaced the adapter's weights with a PNG, and a user's file without --force
    Case("analyze-plot-over-adapter-weights", _analyze(_weights, "--force"), "is inside the adapter"),
    Case("analyze-plot-is-the-adapter", _analyze(lambda u: u.adapter(), "--force"), "is the adapter"),
    Case("analyze-plot-over-user-file", _analyze(lambda u: u.file("notes.txt")), "--plot"),
    Case("analyze-plot-force-over-user-file", _analyze(lambda u: u.file("plot.png"), "--force"),
         "was not written by `lora analyze`"),
    # sweep --plot replaced the recipe's own training data
    Case("sweep-plot-over-training-data", _sweep(lambda u: u.root / "data.jsonl"), "is the training data"),
    Case("sweep-plot-over-recipe", _sweep(lambda u: u.root / "recipe.yaml"), "is the recipe"),
    # predict --out replaced its input rows
    Case("predict-out-over-input-rows", _predict(_rows, _rows), "is the rows (--file)"),
    Case("predict-out-over-adapter-weights", _predict(_weights, _rows), "is inside the adapter"),
    Case("predict-force-over-user-file", _predict(lambda u: u.file("labels.jsonl"), _rows),
         "was not written by `lora predict`"),
    # generate --out --force replaced the adapter it had just read
    Case("generate-out-over-adapter-weights", _generate(_weights, "--force"), "is inside the adapter"),
    Case("generate-out-over-base-config", lambda u: ["generate", "--base", u.root / "base", "--file", u.prompts(),
                                                     "--out", u.root / "base" / "config.json", "--force"],
         "is inside the base model (--base)"),
    Case("generate-force-over-user-file", _generate(lambda u: u.file("answers.jsonl"), "--force"),
         "was not written by `lora generate`"),
    Case("generate-out-existing-without-force", _generate(lambda u: u.file("answers.jsonl")), "already exists"),
    Case("generate-out-symlink-to-user-file", _generate(lambda u: _symlink(u, "answers.jsonl", u.file("mine.txt")),
                                                        "--force"), "was not written by `lora generate`"),
    # export: the same rule, by the same check
    Case("export-out-over-adapter-weights", _export(_weights, "--force"), "is inside the adapter"),
    Case("export-force-over-user-file", _export(lambda u: u.file("model.gguf"), "--force"),
         "was not written by `lora export`"),
    # build-tiny: its --data and a user's model folder
    Case("build-tiny-out-is-the-data", _tiny(lambda u: u.root / "data.jsonl", "--force"), "is the data (--data)"),
    Case("build-tiny-out-over-user-model", _tiny(_users_model), "already exists"),
    Case("build-tiny-force-over-user-model", _tiny(_users_model, "--force"), "was not written by `lora build-tiny`"),
]


def _symlink(u: User, name: str, target: Path) -> Path:
    link = u.root / name
    link.symlink_to(target)
    return link


@pytest.fixture(scope="module")
def adapter_src(tiny_random, tmp_path_factory) -> Path:
    return random_adapter(tiny_random, tmp_path_factory.mktemp("adapters") / "valid", seed=3)


@pytest.fixture
def user(tmp_path, tiny_random, adapter_src) -> User:
    root = tmp_path / "user"
    root.mkdir()
    shutil.copytree(tiny_random, root / "base")
    return User(root, tiny_random, adapter_src)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_output_never_replaces_an_input_or_a_users_file(case, user, cli):
    argv = case.setup(user)
    before = snapshot_tree(user.root)
    result = cli(*argv)
    assert_clean_refusal(result, case.culprit)
    assert_tree_unchanged(before, snapshot_tree(user.root))


# --------------------------------------------------------------------------- what --force still replaces

def test_force_replaces_a_file_the_same_command_wrote_and_nothing_else(user, cli):
    plot = user.root / "plots" / "a.png"
    assert cli("analyze", user.adapter(), "--no-base", "--plot", plot).code == 0
    first = plot.stat().st_ino
    again = cli("analyze", user.adapter(), "--no-base", "--plot", plot)
    assert again.code == 2 and "already exists" in again.err
    assert cli("analyze", user.adapter(), "--no-base", "--plot", plot, "--force").code == 0
    assert plot.stat().st_ino != first  # replaced: a new file took the name
    # the user edits the plot: it is theirs now
    plot.write_bytes(plot.read_bytes() + b"\n")
    edited = cli("analyze", user.adapter(), "--no-base", "--plot", plot, "--force")
    assert_clean_refusal(edited, "was not written by `lora analyze` (or was changed since)")
    # another command's file is not this command's to replace
    other = cli("generate", "--adapter", user.adapter(), "--file", user.prompts(), "--out", user.root / "plots" / "b.png",
                "--max-new-tokens", "2")
    assert other.code == 0, other
    refused = cli("analyze", user.adapter(), "--no-base", "--plot", user.root / "plots" / "b.png", "--force")
    assert_clean_refusal(refused, "was written by `lora generate`, not `lora analyze`")


def test_the_file_claim_survives_a_claim_of_the_folder(tmp_path):
    """A folder claim (a run writing checkpoints) and file claims share one marker; neither
    rewrite drops the other."""
    from lora_cli.files import ownership

    ownership.check_output(tmp_path / "a.jsonl", "generate", force=False, inputs=[])
    ownership.write_output_text(tmp_path / "a.jsonl", "x\n", "generate")
    ownership.claim(tmp_path, "train", ["metrics.jsonl"])
    ownership.forget(tmp_path, ["checkpoint-1"])
    assert ownership.file_written_by(tmp_path / "a.jsonl") == "generate"
    assert ownership.read_claim(tmp_path)["files"] == ["metrics.jsonl"]


# --------------------------------------------------------------------------- one check, one place

WRITERS_THROUGH_THE_CHECK = ("cli.py", "export/merge.py", "export/gguf.py", "model/analyze.py", "train/sweep.py", "tiny/decoder.py",
                             "tiny/encoders.py")


def test_user_named_outputs_are_written_only_through_the_one_check():
    """Modules that write a path the user named may not stage or replace files themselves:
    atomic.* and raw renames belong to ownership.writing_file / writing_folder."""
    pattern = re.compile(r"atomic\.(write_text|write_bytes|staged_file|staged_folder|publish_folder)|\.replace\(out|"
                         r"with_name\(f\"\.|os\.replace|os\.rename")
    offenders = []
    for name in WRITERS_THROUGH_THE_CHECK:
        for number, line in enumerate((REPO / "lora_cli" / name).read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line) and "RESULT_FILE" not in line:  # a rank's record, inside its claimed run
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_docs_list_every_output_case():
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.name for c in CASES if f"`{c.name}`" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"
