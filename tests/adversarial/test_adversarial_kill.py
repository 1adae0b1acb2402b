"""kill -9 at any instant (issue 26, class 3): whatever instant a writer dies at, the next
command can use what is left, and nothing hidden stays behind after it succeeds.

- Every instant of a replacement: a child process replaces an output lora wrote (a folder, as
  merge/save/export --format ollama do, and a file, as export/generate/predict/plots do) and
  SIGKILLs itself at its k-th file-system call, for every k until it finishes. Each time the
  next run's output check must find the output whole (old or new, never missing, even killed
  between the two renames of a replacement), and after the next success no staged, aside or
  trash copy may remain.
- A live writer's staging is never taken for a dead one's; two writers never share a name.
- Real runs: `lora train` killed while claiming its folder and while writing its first
  checkpoint is overwritten (and the refusal never lists lora's own files as the user's); a
  `lora merge` killed mid-save leaves no hidden copy after the next success.
docs/reliability.md lists these cases."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, make_recipe
from inference_helpers import random_adapter

from lora_cli.files import atomic, ownership

CHILD = r"""
import os, signal, sys
from pathlib import Path
from lora_cli.files import ownership

kill_at, kind, out = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
calls = 0
if len(sys.argv) > 4:  # the killed writer under the emulated Windows rules too
    sys.path.insert(0, sys.argv[4])
    from windows_rules import WindowsRules
    WindowsRules().install()

def killing(fn):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return call

for name in ("rename", "replace", "unlink", "rmdir", "mkdir", "open", "fsync", "scandir"):
    setattr(os, name, killing(getattr(os, name)))
if kind == "folder":
    ownership.check_output(out, "merge", force=True, inputs=[], folder=True)
    with ownership.writing_folder(out, "merge", True) as staging:
        (staging / "weights").write_bytes(b"new" * 4000)
        (staging / "config").write_text("new")
else:
    ownership.check_output(out, "export", force=True, inputs=[])
    with ownership.writing_file(out, "export") as tmp:
        Path(tmp).write_bytes(b"new" * 4000)
print("finished")
"""


def _write(out: Path, kind: str, version: str) -> None:
    """What lora itself does, in this process: check, then write `version` whole."""
    if kind == "folder":
        ownership.check_output(out, "merge", force=True, inputs=[], folder=True)
        with ownership.writing_folder(out, "merge", True) as staging:
            (staging / "weights").write_bytes(version.encode() * 4000)
            (staging / "config").write_text(version)
    else:
        ownership.check_output(out, "export", force=True, inputs=[])
        with ownership.writing_file(out, "export") as tmp:
            Path(tmp).write_bytes(version.encode() * 4000)


def _version(out: Path, kind: str) -> str:
    """'old' or 'new' when `out` is whole; anything else fails the test."""
    if kind == "folder":
        weights, config = (out / "weights").read_bytes(), (out / "config").read_text()
        assert weights == config.encode() * 4000, "a folder mixing two writes"
        assert ownership.read_claim(out)["command"] == "merge"
        return config
    data = out.read_bytes()
    assert data in (b"old" * 4000, b"new" * 4000), "a half-written file"
    return data[:3].decode()


LEFTOVERS = (".lora-staged-", ".lora-aside-", ".lora-trash-", ".lora-lock-")  # the names lora works under


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(LEFTOVERS))


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_kill_at_every_instant_of_a_replacement_leaves_a_usable_output(kind, tmp_path, file_rules):
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    _write(pristine / "out", kind, "old")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    seen = {"old": 0, "new": 0}
    for kill_at in range(1, 400):
        world = tmp_path / f"k{kill_at}"
        shutil.copytree(pristine, world, symlinks=True)
        _reclaim_copy(world / "out", kind)
        rules = [str(REPO / "tests")] if file_rules is not None else []
        child = subprocess.run([sys.executable, "-c", CHILD, str(kill_at), kind, str(world / "out"), *rules],
                               env=env, capture_output=True, text=True, timeout=60)
        if child.returncode == 0:
            assert "finished" in child.stdout
            assert _version(world / "out", kind) == "new" and not _hidden(world)
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        # the next run: its output check recovers what the kill left, whichever instant it was
        ownership.check_output(world / "out", "merge" if kind == "folder" else "export", force=True, inputs=[],
                               folder=kind == "folder")
        seen[_version(world / "out", kind)] += 1
        _write(world / "out", kind, "new")  # ... and succeeds
        assert _version(world / "out", kind) == "new"
        assert not _hidden(world), f"killed at call {kill_at}: {_hidden(world)} left behind"
    else:
        pytest.fail("the writer never finished")
    assert seen["old"] and seen["new"], seen  # kills fell both before and after the rename


def _reclaim_copy(out: Path, kind: str) -> None:
    """A copy has a new inode: claim the copied file again, as lora would have written it there."""
    if kind == "file":
        ownership.claim_file(out, out, "export")
        ownership.settle_file(out)


def test_kill_between_the_two_renames_is_recovered_by_the_next_run(tmp_path, file_rules):
    """The window named in the issue: target moved aside, the new copy not yet renamed in."""
    out = tmp_path / "merged"
    _write(out, "folder", "old")
    staged = atomic.sibling_name(out, atomic.STAGED_PREFIX)
    shutil.copytree(out, staged)
    os.rename(out, atomic.sibling_name(out, ".lora-aside-"))  # what the killed process had done
    assert not out.exists() and len(_hidden(tmp_path)) == 2
    ownership.check_output(out, "merge", force=True, inputs=[], folder=True)
    assert _version(out, "folder") == "old" and not _hidden(tmp_path)


def test_a_live_writers_staging_is_never_taken_for_a_dead_ones(tmp_path, file_rules):
    out = tmp_path / "model.gguf"
    with atomic.staged_file(out) as mine:
        Path(mine).write_bytes(b"half")
        atomic.recover(out)  # another command's output check, meanwhile
        assert Path(mine).read_bytes() == b"half"
    with atomic.staged_folder(tmp_path / "merged") as staging:
        atomic.recover(tmp_path / "merged")
        assert staging.is_dir()
    assert out.read_bytes() == b"half" and (tmp_path / "merged").is_dir() and not _hidden(tmp_path)


def test_two_writers_of_one_output_never_share_a_staging_name(tmp_path, file_rules):
    names, errors, barrier = [], [], threading.Barrier(8)

    def stage(target: Path):
        try:
            with atomic.staged_file(target) as tmp:
                names.append(tmp.name)
                barrier.wait(timeout=10)  # all eight staged at once
                Path(tmp).write_text("x")
        except Exception as e:  # a thread's exception would otherwise only be printed
            errors.append(e)

    for target in (tmp_path / ".lora-owner.json", tmp_path / "a.gguf"):
        names.clear()
        threads = [threading.Thread(target=stage, args=(target,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(names)) == 8 and not errors, (names, errors)
        assert all(n.endswith(target.suffix) for n in names)


# --------------------------------------------------------------------------- real runs, killed

KILL_AT = r"""
import os, signal, sys
from pathlib import Path
import lora_cli.files.atomic as atomic
from lora_cli.cli import run

when = os.environ["KILL_WHEN"]
original_replace, original_save = os.replace, None

def replace(src, dst, *a, **k):  # the claim of the run folder is being renamed into place
    if when == "claim" and Path(dst).name == ".lora-owner.json":
        os.kill(os.getpid(), signal.SIGKILL)
    return original_replace(src, dst, *a, **k)

atomic.os.replace = replace
if when == "first-checkpoint":
    from transformers import Trainer
    original_save = Trainer._save_rng_state

    def save_rng(self, output_dir):  # inside the save of the first checkpoint, files half there
        os.kill(os.getpid(), signal.SIGKILL)

    Trainer._save_rng_state = save_rng
if when == "merge":
    from transformers import PreTrainedModel

    def save_pretrained(self, folder, **kw):  # part of the weights on disk, then killed
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)

    PreTrainedModel.save_pretrained = save_pretrained
sys.exit(run(sys.argv[1:]))
"""


def _killed(args: list, when: str, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KILL_WHEN": when}
    proc = subprocess.run([sys.executable, "-c", KILL_AT, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout[-2000:], proc.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["claim", "first-checkpoint"])
def test_train_killed_early_is_overwritten_without_deleting_lora_files_by_hand(when, tmp_path, tiny_random, cli):
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 2, "save_steps": 1})
    _killed(["train", recipe], when, tmp_path)
    run = tmp_path / "run"
    assert _hidden(run) or list(run.rglob(".lora-staged-*")), sorted(p.name for p in run.iterdir())
    plain = cli("train", recipe)
    if when == "claim":  # nothing of the run was claimed: the folder holds lora's leftovers only
        assert plain.code == 0, plain
    else:
        assert plain.code == 2 and "--overwrite" in plain.err and ".lora-staged" not in plain.err, plain
        resumed = cli("train", recipe, "--resume")
        assert resumed.code == 2 and "--overwrite" in resumed.err and ".lora-staged" not in resumed.err, resumed
        again = cli("train", recipe, "--overwrite")
        assert again.code == 0, again
    assert (run / "adapter_config.json").is_file() and not list(run.rglob(".lora-staged-*"))
    assert ownership.foreign_files(run, ownership.read_claim(run)) == []


@pytest.mark.slow
def test_merge_killed_mid_save_leaves_no_hidden_copy_after_the_next_success(tmp_path, tiny_random, cli):
    adapter = random_adapter(tiny_random, tmp_path / "adapter", seed=4)
    _killed(["merge", "--adapter", adapter, "--out", tmp_path / "merged"], "merge", tmp_path)
    assert _hidden(tmp_path), "the kill left no staging copy: the test proves nothing"
    assert not (tmp_path / "merged").exists()
    result = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
    assert result.code == 0, result
    assert not _hidden(tmp_path)


def test_docs_list_the_kill_cases():
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    names = [n for n in dir(sys.modules[__name__]) if n.startswith("test_") and n != "test_docs_list_the_kill_cases"]
    missing = [n for n in names if f"`{n}`" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"
