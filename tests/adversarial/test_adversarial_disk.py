"""Adversarial disk cases (issue 9, the disk half): folders and files people really have lying
around, flags that replace things, runs that collide or die mid-write.

Each table case runs the real command and asserts: the documented exit code, no traceback, the
culprit named in the message, and a snapshot of every file under the case's folder before and
after showing that nothing the user had was changed or deleted. The runtime cases below the
table (two processes on one folder, kill -9 mid-save, a full disk, changed data, the printed
resume command) use real processes and signals. To add a case: append a Case to CASES (a
`prepare` that builds the situation in the case folder, the command, the code and the words the
message must contain); docs/reliability.md lists them."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import demo_rows, write_jsonl
from lora_cli.train import checkpoint as ckpt
from lora_cli.files import ownership

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- snapshots

def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: sha256} of every file under root (symlinks by their target text)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() and not any(p.iterdir()):
            out[rel + "/"] = "empty folder"
    return out


def assert_unchanged(before: dict, after: dict) -> None:
    lost = sorted(set(before) - set(after))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    added = sorted(set(after) - set(before))
    assert not lost and not changed and not added, f"lost {lost}, changed {changed}, added {added}"


def assert_clean_refusal(r, code: int, culprits: list[str]) -> None:
    assert r.code == code, r
    assert "Traceback" not in r.out + r.err, r
    for word in culprits:
        assert word in r.err, (word, r)


# --------------------------------------------------------------------------- the world each case starts from

@pytest.fixture(scope="module")
def world_template(tmp_path_factory, tiny_random):
    """A user's folder: a base model, data, a recipe, a finished run (checkpoint-1, checkpoint-2
    and the final adapter), an exported adapter, a merged model and a folder of their own."""
    from lora_cli.cli import run

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_random, w / "base")
    write_jsonl(w / "data.jsonl", demo_rows(16))
    write_jsonl(w / "prompts.jsonl", [{"instruction": "hi"}])
    recipe(w)
    assert run(["train", str(w / "recipe.yaml"), "--set", "train.max_steps=3", "--set", "train.save_steps=1"]) == 0
    assert run(["save", str(w / "run"), "--out", str(w / "export")]) == 0
    assert run(["merge", "--adapter", str(w / "run"), "--out", str(w / "merged")]) == 0
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("my own work\n")
    (w / "notes.txt").write_text("a file\n")
    return w


def recipe(w: Path, **train) -> Path:
    """The recipe of a world; paths are absolute so copies of the world stay independent."""
    body = {"model": {"name_or_path": str(w / "base")},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "data": {"path": str(w / "data.jsonl"), "max_length": 128},
            "train": {"epochs": 1, "max_steps": 2, "learning_rate": 1e-3, "batch_size": 2, "gradient_accumulation": 1,
                      "warmup_steps": 0, "logging_steps": 1, "seed": 0, **train},
            "output_dir": str(w / "run")}
    (w / "recipe.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return w / "recipe.yaml"


@pytest.fixture
def world(world_template, tmp_path):
    """A private copy of the template, with its own recipe pointing at its own files."""
    w = tmp_path / "w"
    shutil.copytree(world_template, w, symlinks=True)
    for f in [*w.rglob("*.yaml"), *w.rglob("*.json")]:  # what lora recorded names the copy's files
        f.write_text(f.read_text(encoding="utf-8").replace(f"{world_template}/", f"{w}/"), encoding="utf-8")
    recipe(w)
    return w


# --------------------------------------------------------------------------- the table

def note(*parts: str) -> Callable[[Path], None]:
    def prepare(w: Path) -> None:
        path = w.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's own notes\n")
    return prepare


def data_inside_run(w: Path) -> None:
    shutil.copy(w / "data.jsonl", w / "run" / "data.jsonl")
    (w / "recipe.yaml").write_text((w / "recipe.yaml").read_text().replace(str(w / "data.jsonl"),
                                                                            str(w / "run" / "data.jsonl")))


def unmarked(folder: str) -> Callable[[Path], None]:
    def prepare(w: Path) -> None:
        (w / folder / ownership.OWNER_FILE).unlink()  # as written by an older lora, or by hand
    return prepare


@dataclass
class Case:
    id: str
    args: list[str]                      # "{w}" is the case folder
    culprits: list[str]                  # words the message must contain ("{w}" allowed)
    prepare: Callable[[Path], None] = lambda w: None
    code: int = 2
    skip: tuple[str, ...] = field(default_factory=tuple)  # paths the command may legitimately write


TRAIN = ["train", "{w}/recipe.yaml"]
CASES = [
    # `lora train --overwrite` once deleted any folder holding a lora_recipe.yaml
    Case("train-overwrite-exported-adapter-with-notes", TRAIN + ["--set", "output_dir={w}/export", "--overwrite"],
         ["--overwrite refused", "{w}/export", "notes.txt"], note("export", "notes.txt")),
    Case("train-overwrite-exported-adapter", TRAIN + ["--set", "output_dir={w}/export", "--overwrite"],
         ["written by `lora save`, not `lora train`"]),
    Case("train-overwrite-merged-model", TRAIN + ["--set", "output_dir={w}/merged", "--overwrite"],
         ["written by `lora merge`, not `lora train`"]),
    Case("train-overwrite-run-with-user-note", TRAIN + ["--overwrite"], ["did not write", "my-notes.md"],
         note("run", "my-notes.md")),
    Case("train-overwrite-note-inside-checkpoint", TRAIN + ["--overwrite"], ["checkpoint-1/eval-by-hand.txt"],
         note("run", "checkpoint-1", "eval-by-hand.txt")),
    Case("train-overwrite-user-subfolder", TRAIN + ["--overwrite"], ["analysis/plot.txt"],
         note("run", "analysis", "plot.txt")),
    Case("train-overwrite-user-folder", TRAIN + ["--set", "output_dir={w}/mine", "--overwrite"],
         ["was not written by `lora train`", "thesis.tex"]),
    Case("train-overwrite-run-without-marker", TRAIN + ["--overwrite"], [ownership.OWNER_FILE, "lora_recipe.yaml"],
         unmarked("run")),
    # the same flag deleted a data file that lived in the old run folder
    Case("train-overwrite-data-inside-old-run", TRAIN + ["--overwrite"],
         ["output_dir {w}/run contains the training data (data.path)"], data_inside_run),
    Case("train-val-data-inside-output-dir", TRAIN + ["--set", "data.val_path={w}/run/val.jsonl", "--overwrite"],
         ["contains the validation data"], lambda w: write_jsonl(w / "run" / "val.jsonl", demo_rows(4))),
    Case("train-output-dir-is-the-data-file", TRAIN + ["--set", "output_dir={w}/data.jsonl"],
         ["output_dir {w}/data.jsonl is the training data"]),
    Case("train-output-dir-is-the-base", TRAIN + ["--set", "output_dir={w}/base", "--overwrite"],
         ["is the base model"]),
    Case("train-output-dir-inside-the-base", TRAIN + ["--set", "output_dir={w}/base/runs/a"],
         ["is inside the base model"]),
    Case("train-output-dir-contains-the-inputs", TRAIN + ["--set", "output_dir={w}", "--overwrite"],
         ["output_dir {w} contains the"]),
    Case("train-output-dir-is-a-file", TRAIN + ["--set", "output_dir={w}/notes.txt"], ["exists and is not a folder"]),
    Case("train-existing-run-without-flag", TRAIN, ["already holds files from another run", "--overwrite"]),
    # `lora merge --force` / `lora save --force` replaced any folder, inputs included
    Case("merge-out-is-the-adapter", ["merge", "--adapter", "{w}/export", "--out", "{w}/export", "--force"],
         ["--out {w}/export is the adapter"]),
    Case("merge-out-inside-the-adapter", ["merge", "--adapter", "{w}/run", "--out", "{w}/run/merged"],
         ["is inside the adapter"]),
    Case("merge-out-contains-the-adapter", ["merge", "--adapter", "{w}/run", "--out", "{w}", "--force"],
         ["--out {w} contains the adapter"]),
    Case("merge-out-is-the-base", ["merge", "--adapter", "{w}/run", "--base", "{w}/base", "--out", "{w}/base", "--force"],
         ["is the base model"]),
    Case("merge-force-onto-user-folder", ["merge", "--adapter", "{w}/run", "--out", "{w}/mine", "--force"],
         ["--force refused", "thesis.tex"]),
    Case("merge-force-onto-exported-adapter", ["merge", "--adapter", "{w}/run", "--out", "{w}/export", "--force"],
         ["written by `lora save`, not `lora merge`"]),
    Case("merge-force-onto-merge-with-notes", ["merge", "--adapter", "{w}/run", "--out", "{w}/merged", "--force"],
         ["did not write", "README-mine.md"], note("merged", "README-mine.md")),
    Case("merge-existing-out-without-force", ["merge", "--adapter", "{w}/run", "--out", "{w}/merged"],
         ["already exists", "--force"]),
    Case("save-out-is-the-source", ["save", "{w}/run", "--out", "{w}/run", "--force"], ["--out {w}/run is the adapter"]),
    Case("save-out-is-the-checkpoints-run", ["save", "{w}/run/checkpoint-2", "--out", "{w}/run", "--force"],
         ["--out {w}/run contains the adapter"]),
    Case("save-force-onto-user-folder", ["save", "{w}/run", "--out", "{w}/mine", "--force"], ["thesis.tex"]),
    Case("save-force-onto-a-run", ["save", "{w}/export", "--out", "{w}/run", "--force"],
         ["written by `lora train`, not `lora save`"]),
    Case("save-force-onto-export-with-notes", ["save", "{w}/run", "--out", "{w}/export", "--force"],
         ["did not write", "notes.txt"], note("export", "notes.txt")),
    Case("generate-out-is-the-prompt-file", ["generate", "--adapter", "{w}/export", "--file", "{w}/prompts.jsonl",
                                             "--out", "{w}/prompts.jsonl", "--force"], ["is the prompt file"]),
]


def fill(text: str, w: Path) -> str:
    return text.replace("{w}", str(w))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nothing_of_the_user_is_lost(case, world, cli):
    case.prepare(world)
    before = snapshot(world, case.skip)
    r = cli(*[fill(a, world) for a in case.args])
    assert_clean_refusal(r, case.code, [fill(c, world) for c in case.culprits])
    assert_unchanged(before, snapshot(world, case.skip))


# --------------------------------------------------------------------------- what the flags may still do

@pytest.mark.slow
def test_flags_still_replace_what_the_same_command_wrote(world, cli):
    """The refusals above are not everything refused: a folder a command wrote, holding only
    its files, is replaced."""
    old = (world / "export" / "adapter_model.safetensors").stat().st_ino
    r = cli("save", world / "run" / "checkpoint-1", "--out", world / "export", "--force")
    assert r.code == 0, r
    assert (world / "export" / "adapter_model.safetensors").stat().st_ino != old
    assert ownership.read_claim(world / "export")["command"] == "save"

    keep = snapshot(world, ("run",))
    r = cli("train", world / "recipe.yaml", "--overwrite")
    assert r.code == 0, r
    assert not (world / "run" / "checkpoint-2").exists()  # the old run's checkpoints went with it
    assert sorted(json.loads(x)["step"] for x in (world / "run" / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)) == [1, 2]
    assert_unchanged(keep, snapshot(world, ("run",)))


# --------------------------------------------------------------------------- runtime faults

def _spawn(args: list[str], cwd: Path, extra_env: dict | None = None, code: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "lora_cli.cli", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


@pytest.mark.slow
def test_second_run_on_one_folder_is_refused_naming_the_first(world, cli):
    """Two real processes: while the first trains, a second on the same output_dir exits 2
    naming the first's PID, with or without --overwrite, and touches nothing."""
    shutil.rmtree(world / "run")
    recipe(world, max_steps=400, save_steps=0)
    first = _spawn(["train", str(world / "recipe.yaml")], world)
    try:
        metrics = world / "run" / "metrics.jsonl"
        _wait_for(lambda: metrics.is_file() and metrics.read_text().strip(), first)
        # the first run is still writing those (its metrics, staged checkpoints, and its claim of
        # what it wrote, updated as checkpoints land): the refused runs must touch everything else
        first_writes = ("run/metrics.jsonl", "run/.lora-staged-checkpoints", "run/.lora-owner.json")
        before = snapshot(world, first_writes)
        for extra in ([], ["--overwrite"]):
            r = cli("train", world / "recipe.yaml", *extra)
            assert_clean_refusal(r, 2, [f"in use by another `lora train` (PID {first.pid})"])
        after = snapshot(world, first_writes)
        # a checkpoint the first run published meanwhile is its own, new; nothing it had may go or change
        after = {k: v for k, v in after.items() if k in before or not k.startswith("run/checkpoint-")}
        assert_unchanged(before, after)
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 143, (out, err)


def test_lock_is_refused_in_process_and_released_with_the_holder(tmp_path, file_rules):
    lock = ownership.FolderLock(tmp_path / "run").acquire()
    with pytest.raises(Exception) as refused:
        ownership.FolderLock(tmp_path / "run").acquire()
    assert f"PID {os.getpid()}" in str(refused.value)
    lock.release()
    ownership.FolderLock(tmp_path / "run").acquire().release()  # free again: no stale lock


SLOW_SAVE = """
import os, sys, time
from pathlib import Path
from transformers import Trainer

original = Trainer._save_rng_state

def slow(self, output_dir):  # test-only: hold the process inside the save of step 2
    if self.state.global_step == 2:
        Path(os.environ["SAVE_STARTED"]).touch()
        time.sleep(600)
    return original(self, output_dir)

Trainer._save_rng_state = slow
from lora_cli.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_save_leaves_a_resumable_run_and_no_stale_lock(world, cli):
    shutil.rmtree(world / "run")
    recipe(world, max_steps=4, save_steps=1)
    started = world.parent / "save-started"
    user_before = snapshot(world, ("run",))
    proc = _spawn(["train", str(world / "recipe.yaml")], world, {"SAVE_STARTED": str(started)}, code=SLOW_SAVE)
    _wait_for(started.exists, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = world / "run"
    # the half-written checkpoint never took its name; the one before is whole
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1"]
    assert not (run / "checkpoint-2").exists() and (run / ckpt.STAGING / "checkpoint-2").is_dir()
    assert not (run / "adapter_config.json").exists()
    assert_unchanged(user_before, snapshot(world, ("run",)))

    resumed = cli("train", world / "recipe.yaml", "--resume")  # the dead process's lock is gone with it
    assert resumed.code == 0, resumed
    assert not (run / ckpt.STAGING).exists()
    assert sorted(json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(x)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_save(world, cli, monkeypatch):
    """ENOSPC while the optimizer state of step 2 is written: exit 2, the culprit named, the
    earlier checkpoint whole, nothing partial left, the user's files untouched."""
    import torch

    shutil.rmtree(world / "run")
    recipe(world, max_steps=4, save_steps=1)
    original = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    user_before = snapshot(world, ("run",))
    monkeypatch.setattr(torch, "save", disk_full)
    r = cli("train", world / "recipe.yaml")
    assert_clean_refusal(r, 2, ["could not write the checkpoint of step 2", "No space left on device",
                                "checkpoint-1 is intact", "--resume"])
    run = world / "run"
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["checkpoint-1"]
    assert not (run / "checkpoint-2").exists() and not (run / ckpt.STAGING).exists()
    assert_unchanged(user_before, snapshot(world, ("run",)))


def _unfinished(world: Path) -> None:
    """The template run, as if stopped after checkpoint-2 (its final adapter not yet written)."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (world / "run" / name).unlink(missing_ok=True)
    recipe(world, max_steps=3, save_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("change, culprit", [
    ("append", "tokenised train examples: 16 rows"),
    ("edit", "tokenised train examples"),
])
def test_resume_on_changed_data_is_refused(world, cli, change, culprit):
    _unfinished(world)
    rows = demo_rows(17)
    if change == "append":
        write_jsonl(world / "data.jsonl", rows)
    else:  # the same rows, one letter changed
        rows = rows[:16]
        rows[3] = {**rows[3], "output": rows[3]["output"].replace("a", "e", 1) or "x"}
        write_jsonl(world / "data.jsonl", rows)
    before = snapshot(world)
    r = cli("train", world / "recipe.yaml", "--resume")
    assert_clean_refusal(r, 2, ["training data differs from the data this run started with",
                                f"{world / 'data.jsonl'}: its content changed", culprit])
    assert_unchanged(before, snapshot(world))


@pytest.mark.slow
def test_printed_resume_command_keeps_the_set_overrides(world, cli, monkeypatch):
    from lora_cli.train.callbacks import RichProgress

    shutil.rmtree(world / "run")
    original = RichProgress.on_step_end

    def stop_at_2(self, args, state, control, **kwargs):  # a real SIGINT, as Ctrl-C sends
        original(self, args, state, control, **kwargs)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(RichProgress, "on_step_end", stop_at_2)
        stopped = cli("train", world / "recipe.yaml", "--set", "train.max_steps=5", "--set", "train.save_steps=3")
    assert stopped.code == 130, stopped
    printed = stopped.err.split("continue the run with: ", 1)[1].split()
    assert printed[:2] == ["lora", "train"] and printed[-1] == "--resume"
    # as the recipe file alone would say: a different run, refused with the overrides named
    plain = cli("train", world / "recipe.yaml", "--resume")
    assert plain.code == 2 and "train.max_steps: 5 -> 2" in plain.err, plain
    resumed = cli(*printed[1:])
    assert resumed.code == 0, resumed
    logged = [json.loads(x) for x in (world / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(x["step"] for x in logged if "loss" in x) == [1, 2, 3, 4, 5]  # max_steps=5 kept


def test_claim_lists_what_was_written_and_forgets_what_was_deleted(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    ownership.claim(folder, "train", ["a.txt", "checkpoint-1/x", "checkpoint-2/x"])
    for f in ("a.txt", "checkpoint-2/x"):
        (folder / f).parent.mkdir(exist_ok=True)
        (folder / f).write_text("1")
    ownership.check_replaceable(folder, "train", "--overwrite")  # only its own files: allowed
    ownership.forget(folder, ["checkpoint-1"])
    assert ownership.read_claim(folder)["files"] == ["a.txt", "checkpoint-2/x"]
    (folder / "checkpoint-2" / "mine.txt").write_text("2")
    with pytest.raises(Exception, match="checkpoint-2/mine.txt"):
        ownership.check_replaceable(folder, "train", "--overwrite")
    with pytest.raises(Exception, match="written by `lora train`, not `lora save`"):
        ownership.check_replaceable(folder, "save", "--force")


def test_build_tiny_never_fills_a_folder_it_did_not_write(cli, tmp_path):
    """build-tiny writes config, weights and tokenizer files: a user's model folder is refused
    before anything is built, and nothing in it changes."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}', encoding="utf-8")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for arch in ("llama", "bert"):
        res = cli("build-tiny", "--out", folder, "--arch", arch, "--steps", "1", "--force")
        assert res.code == 2, res
        assert "was not written by `lora build-tiny`" in " ".join(res.err.split())
        assert "Traceback" not in res.err + res.out
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
