"""lora's writers (files/atomic.py, files/ownership.py) under Windows' documented file rules, as
tests/windows_rules.py emulates them on Linux (an emulation, not Windows): every test that takes
`file_rules` runs twice, once as this OS behaves and once under the rules; the kill tests run
the killed writer under the rules too. What the rules forbid: os.open of a folder, renaming or
deleting anything a handle has open, reading or writing a file another handle has locked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

# how a process killed as by kill -9 ends: -SIGKILL on POSIX, TerminateProcess's code 15 on Windows
KILLED = -signal.SIGKILL if hasattr(signal, "SIGKILL") else signal.SIGTERM

from lora_cli.errors import LoraError
from lora_cli.files import atomic, ownership

TESTS = Path(__file__).resolve().parents[1]
HIDDEN = (".lora-staged-", ".lora-trash-", ".lora-aside-", ".lora-lock-")  # literal: a renamed prefix must fail here


def _hidden(folder: Path) -> list[str]:
    """lora's working names left in `folder` (staged, aside, trash copies and their locks)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(HIDDEN))


def _folder(path: Path, version: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights").write_text(version * 100)
    (path / "config").write_text(version)
    return path


def _version(path: Path) -> str:
    config = (path / "config").read_text()
    assert (path / "weights").read_text() == config * 100, "a folder mixing two writes"
    return config


# --------------------------------------------------------------------------- writing

def test_write_text_writes_and_replaces_a_file(file_rules, tmp_path):
    out = tmp_path / "deep" / "result.json"
    atomic.write_text(out, "old")
    atomic.write_text(out, "new")
    assert out.read_text() == "new" and _hidden(out.parent) == []


def test_staged_folder_writes_a_new_folder_and_replaces_one(file_rules, tmp_path):
    target = tmp_path / "merged"
    for version in ("old", "new"):
        with atomic.staged_folder(target, replace=True) as staging:
            _folder(staging, version)
        assert _version(target) == version and _hidden(tmp_path) == []


def test_staged_folder_removes_its_staging_on_error(file_rules, tmp_path):
    target = _folder(tmp_path / "merged", "old")
    with pytest.raises(RuntimeError):
        with atomic.staged_folder(target, replace=True) as staging:
            _folder(staging, "new")
            raise RuntimeError("the writer failed")
    assert _version(target) == "old" and _hidden(tmp_path) == []


def test_publish_folder_replaces_a_folder(file_rules, tmp_path):
    """As the data cache and checkpoints publish a folder they staged themselves."""
    target = _folder(tmp_path / "entry", "old")
    staged = _folder(atomic.sibling_name(target, atomic.STAGED_PREFIX), "new")
    atomic.publish_folder(staged, target, replace=True)
    assert _version(target) == "new" and _hidden(tmp_path) == []
    with pytest.raises(FileExistsError):
        atomic.publish_folder(_folder(atomic.sibling_name(target, atomic.STAGED_PREFIX), "x"), target)


def test_move_files_into_a_folder(file_rules, tmp_path):
    staged = _folder(tmp_path / ".lora-staged-x" / "tokenizer", "new")
    dest = _folder(tmp_path / "run", "old")
    assert atomic.move_files_into(staged, dest, last="config") == ["weights", "config"]
    assert _version(dest) == "new" and not staged.exists()


def test_writing_file_and_folder_through_the_output_check(file_rules, tmp_path):
    for version in ("old", "new"):
        out = ownership.check_output(tmp_path / "answers.jsonl", "generate", force=True, inputs=[])
        ownership.write_output_text(out, version, "generate")
        assert out.read_text() == version and ownership.file_written_by(out) == "generate"
        folder = ownership.check_output(tmp_path / "merged", "merge", force=True, inputs=[], folder=True)
        with ownership.writing_folder(folder, "merge", True) as staging:
            _folder(staging, version)
        assert _version(folder) == version and ownership.read_claim(folder)["command"] == "merge"
    assert _hidden(tmp_path) == []


# --------------------------------------------------------------------------- liveness

def test_a_live_writers_staging_survives_another_recover(file_rules, tmp_path):
    out = tmp_path / "model.gguf"
    with atomic.staged_file(out) as mine:
        Path(mine).write_bytes(b"half")
        atomic.recover(out)
        atomic.clear_leftovers(tmp_path)
        assert Path(mine).read_bytes() == b"half"
    with atomic.staged_folder(tmp_path / "merged") as staging:
        (staging / "weights").write_text("half")
        atomic.recover(tmp_path / "merged")
        atomic.clear_leftovers(tmp_path)
        assert (staging / "weights").read_text() == "half"
    assert out.read_bytes() == b"half" and (tmp_path / "merged" / "weights").is_file()
    assert _hidden(tmp_path) == []


def test_a_lock_file_whose_copy_is_gone_goes_unless_it_is_held(file_rules, tmp_path):
    """A writer killed after its rename (or whose removal of its lock failed on Windows) leaves
    a lock file alone; a writer between taking its lock and creating its copy holds one."""
    out = tmp_path / "answers.jsonl"
    dead = atomic.lock_path(atomic.sibling_name(out, atomic.STAGED_PREFIX))
    dead.write_text("")
    live = atomic.lock_path(atomic.sibling_name(out, atomic.STAGED_PREFIX))
    fd = os.open(live, os.O_RDWR | os.O_CREAT)
    try:
        assert atomic.try_lock(fd)
        atomic.recover(out)
        assert not dead.exists() and live.exists()
        dead.write_text("")
        atomic.clear_leftovers(tmp_path)
        assert not dead.exists() and live.exists()
        assert ownership.is_empty(tmp_path)  # lock files are lora's own, never a user's
    finally:
        os.close(fd)
    atomic.recover(out)
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(os.name == "nt", reason="Windows deletes no file its writer has open: the race cannot happen")
def test_a_writer_whose_lock_was_taken_for_a_dead_ones_takes_another_name(tmp_path, monkeypatch):
    """A recover may remove a new lock file in the instant between its creation and its lock:
    the writer notices (the name no longer names its file) and starts over under a new name.
    POSIX only: Windows deletes no file its writer has open, so there the race cannot happen."""
    wait_lock, removed = atomic.wait_lock, []

    def racing_recover(fd):
        if not removed:  # what a recover probing it this instant does (POSIX: removed while held)
            lock = next(tmp_path.glob(atomic.LOCK_PREFIX + "*"))
            lock.unlink()
            removed.append(lock.name)
        wait_lock(fd)

    monkeypatch.setattr(atomic, "wait_lock", racing_recover)
    with atomic.staged_file(tmp_path / "a.txt") as tmp:
        assert atomic.lock_path(tmp).name != removed[0] and atomic.lock_path(tmp).is_file()
        atomic.recover(tmp_path / "a.txt")
        Path(tmp).write_text("whole")
    assert (tmp_path / "a.txt").read_text() == "whole" and _hidden(tmp_path) == []


def test_older_leftover_names_are_still_recovered(file_rules, tmp_path):
    out = tmp_path / "merged"
    _folder(tmp_path / f"{atomic.STAGED_PREFIX}merged-123-456", "x")  # a PID-time name of older versions
    (tmp_path / f"{atomic.TRASH_PREFIX}merged-123-456").mkdir()
    atomic.recover(out)
    assert _hidden(tmp_path) == []


CHILD = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
from lora_cli.files import atomic, ownership

case, out, rules = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "windows-rules"
if rules:
    from windows_rules import WindowsRules
    WindowsRules().install()

def die():  # as kill -9: no clean-up runs (on Windows os.kill is TerminateProcess, exit code 15)
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))

if case == "file":
    with atomic.staged_file(out) as tmp:
        Path(tmp).write_text("ne")
        die()
elif case == "folder":
    with atomic.staged_folder(out, replace=True) as staging:
        (staging / "weights").write_text("new" * 100)
        die()
elif case == "between":  # killed between the two renames of a replacement
    rename = os.rename
    def killing(src, dst, *a, **k):
        done = rename(src, dst, *a, **k)
        if Path(dst).name.startswith(atomic.ASIDE_PREFIX):
            die()
        return done
    os.rename = killing
    with atomic.staged_folder(out, replace=True) as staging:
        (staging / "weights").write_text("new" * 100)
        (staging / "config").write_text("new")
elif case == "live":  # a writer that stays alive until killed from outside
    with atomic.staged_folder(out, replace=True) as staging:
        (staging / "weights").write_text("new" * 100)
        print("staged", flush=True)
        time.sleep(120)
"""


def _child(case: str, out: Path, rules, **popen) -> subprocess.Popen:
    mode = "windows-rules" if rules is not None else "posix"
    return subprocess.Popen([sys.executable, "-c", CHILD, case, str(out), mode, str(TESTS)],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, text=True, **popen)


@pytest.mark.parametrize("case", ["file", "folder", "between"])
def test_recover_after_a_kill_leaves_the_old_output_whole_and_nothing_else(case, file_rules, tmp_path):
    out = tmp_path / ("answers.txt" if case == "file" else "merged")
    if case == "file":
        out.write_text("old")
    else:
        _folder(out, "old")
    child = _child(case, out, file_rules, stderr=subprocess.PIPE)
    _, err = child.communicate(timeout=120)
    assert child.returncode == KILLED, err
    assert _hidden(tmp_path), "the kill left nothing to recover: the test proves nothing"
    if case == "between":
        assert not out.exists()
    atomic.recover(out)
    assert (out.read_text() if case == "file" else _version(out)) == "old"
    assert _hidden(tmp_path) == []


def test_clear_leftovers_after_a_kill(file_rules, tmp_path):
    """What a run does in its own output_dir: every leftover of a killed writer goes, an aside
    copy gets its name back."""
    _folder(tmp_path / "checkpoint-1", "old")
    for case, out in (("between", tmp_path / "checkpoint-1"), ("file", tmp_path / "metrics.jsonl")):
        child = _child(case, out, file_rules, stderr=subprocess.PIPE)
        _, err = child.communicate(timeout=120)
        assert child.returncode == KILLED, err
    atomic.clear_leftovers(tmp_path)
    assert _version(tmp_path / "checkpoint-1") == "old" and _hidden(tmp_path) == []


def test_a_live_writer_in_another_process_keeps_its_staging(file_rules, tmp_path):
    out = _folder(tmp_path / "merged", "old")
    child = _child("live", out, file_rules, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "staged"
        staged = _hidden(tmp_path)
        atomic.recover(out)
        atomic.clear_leftovers(tmp_path)
        assert _hidden(tmp_path) == staged and any((tmp_path / s / "weights").is_file() for s in staged)
    finally:
        child.kill()
        child.wait()
    atomic.recover(out)  # dead now: its staging goes
    assert _version(out) == "old" and _hidden(tmp_path) == []


# --------------------------------------------------------------------------- claims and the run lock

def test_the_owner_marker_claim_flow(file_rules, tmp_path):
    ownership.claim(tmp_path, "train", ["metrics.jsonl"])
    ownership.write_output_text(tmp_path / "a.jsonl", "x\n", "generate")
    ownership.claim(tmp_path, "train", ["checkpoint-1/weights"])
    ownership.forget(tmp_path, ["checkpoint-1"])
    assert ownership.read_claim(tmp_path)["files"] == ["metrics.jsonl"]
    assert ownership.file_written_by(tmp_path / "a.jsonl") == "generate"
    assert not (tmp_path / ownership.MARKER_LOCK).exists() and _hidden(tmp_path) == []


def test_a_stale_marker_lock_is_taken_over(file_rules, tmp_path):
    (tmp_path / ownership.MARKER_LOCK).write_text("")  # a writer killed while holding it
    assert ownership.is_empty(tmp_path)
    ownership.claim(tmp_path, "train", ["metrics.jsonl"])
    assert ownership.read_claim(tmp_path)["files"] == ["metrics.jsonl"]
    assert not (tmp_path / ownership.MARKER_LOCK).exists()


def _both_refuse_naming(folder: Path, pid: int) -> None:
    """A second run's lock and the up-front check both refuse the folder, naming the holder."""
    with pytest.raises(LoraError, match=f"PID {pid}"):
        ownership.FolderLock(folder).acquire()
    with pytest.raises(LoraError, match=f"PID {pid}"):
        ownership.check_unlocked(folder)


def test_the_run_lock_refuses_a_second_run_and_names_the_holder(file_rules, tmp_path):
    run = tmp_path / "run"
    lock = ownership.FolderLock(run).acquire()
    try:
        assert ownership.holder_pid(lock.path) == str(os.getpid())
        _both_refuse_naming(run, os.getpid())
    finally:
        lock.release()
    ownership.check_unlocked(run)
    again = ownership.FolderLock(run).acquire()  # free again: no stale lock
    again.release()
    assert all(ownership.is_leftover(p.name) for p in run.iterdir())


def test_the_run_lock_of_another_process(file_rules, tmp_path):
    code = ("import sys, time\nsys.path.insert(0, sys.argv[2])\nfrom lora_cli.files.ownership import FolderLock\n"
            "if sys.argv[3] == 'windows-rules':\n    from windows_rules import WindowsRules\n    WindowsRules().install()\n"
            "FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(TESTS),
                               "windows-rules" if file_rules is not None else "posix"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        _both_refuse_naming(tmp_path, holder.pid)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    ownership.check_unlocked(tmp_path)
    ownership.FolderLock(tmp_path).acquire().release()
