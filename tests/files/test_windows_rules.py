"""The Windows-rules emulator (tests/windows_rules.py) itself: each rule refuses under it and
the same call works without it, so a writer test run under it cannot pass by checking nothing.
An emulation of documented rules, not Windows."""

from __future__ import annotations

import builtins
import io
import os
import shutil
import sys
from pathlib import Path

import filelock
import pytest

if not sys.platform.startswith("linux"):  # the emulation reads /proc and locks with fcntl
    pytest.skip("the Windows-rules emulation runs on Linux only", allow_module_level=True)
from windows_rules import WindowsRules  # noqa: E402


def _file(path: Path, text: str = "x") -> Path:
    path.write_text(text)
    return path


def test_os_open_of_a_folder_is_refused_only_under_the_rules(tmp_path):
    os.close(os.open(tmp_path, os.O_RDONLY))
    with WindowsRules() as rules:
        with pytest.raises(PermissionError, match="folder-open"):
            os.open(tmp_path, os.O_RDONLY)
        os.close(os.open(_file(tmp_path / "a"), os.O_RDONLY))  # a file still opens
    assert rules.fired == ["folder-open"]


@pytest.mark.parametrize("how", ["descriptor", "file object", "Path.open", "text wrapper"])
def test_a_file_open_by_any_handle_cannot_be_renamed_replaced_or_deleted(tmp_path, how):
    a = _file(tmp_path / "a")
    with WindowsRules() as rules:
        if how == "descriptor":
            fd = os.open(a, os.O_RDONLY)
            close = lambda: os.close(fd)  # noqa: E731
        else:
            f = {"file object": lambda: builtins.open(a, "rb"), "Path.open": lambda: a.open("rb"),
                 "text wrapper": lambda: io.open(a, "r", encoding="utf-8")}[how]()
            close = f.close
        for call in (lambda: os.rename(a, tmp_path / "b"), lambda: os.replace(a, tmp_path / "b"),
                     lambda: os.replace(_file(tmp_path / "c"), a), lambda: os.unlink(a), lambda: os.remove(a),
                     lambda: a.unlink(), lambda: a.rename(tmp_path / "b")):
            with pytest.raises(PermissionError, match="open-handle"):
                call()
        close()
        os.rename(a, tmp_path / "b")  # closed: free to move
        os.unlink(tmp_path / "b")
    assert rules.fired.count("open-handle") == 7


def test_the_same_calls_work_without_the_rules(tmp_path):
    a = _file(tmp_path / "a")
    with open(a, "rb"):
        os.rename(a, tmp_path / "b")
        os.replace(_file(tmp_path / "c"), tmp_path / "b")
        os.unlink(tmp_path / "b")
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(_file(folder / "inner"), "rb"):
        os.rename(folder, tmp_path / "moved")
        shutil.rmtree(tmp_path / "moved")


def test_a_file_object_left_unclosed_still_counts_until_collected(tmp_path):
    a = _file(tmp_path / "a")
    with WindowsRules():
        f = open(a, "rb")
        with pytest.raises(PermissionError):
            os.unlink(a)
        del f  # CPython closes a collected file object
        os.unlink(a)


def test_a_folder_with_an_open_file_anywhere_under_it_cannot_be_moved_or_deleted(tmp_path):
    folder = tmp_path / "folder"
    (folder / "deep").mkdir(parents=True)
    inner = _file(folder / "deep" / "inner")
    _file(folder / "other")
    with WindowsRules() as rules:
        f = open(inner, "rb")
        with pytest.raises(PermissionError, match="open-handle"):
            os.rename(folder, tmp_path / "moved")
        with pytest.raises(PermissionError, match="open-handle"):
            shutil.rmtree(folder)
        shutil.rmtree(folder, ignore_errors=True)  # what it can: the open file and its folders stay
        assert inner.exists() and not (folder / "other").exists()
        f.close()
        shutil.rmtree(folder)
        assert not folder.exists()
    assert "open-handle" in rules.fired


def test_rename_never_replaces_an_existing_name(tmp_path):
    a, b = _file(tmp_path / "a", "a"), _file(tmp_path / "b", "b")
    with WindowsRules():
        with pytest.raises(FileExistsError, match="rename-exists"):
            os.rename(a, b)
        os.replace(a, b)  # replace does, when nothing holds either
    assert b.read_text() == "a"
    c = _file(tmp_path / "c", "c")
    os.rename(c, b)  # POSIX rename replaces
    assert b.read_text() == "c"


def test_a_lock_is_mandatory_for_every_other_handle(tmp_path):
    a = _file(tmp_path / "a", "data")
    with WindowsRules() as rules:
        holder = os.open(a, os.O_RDWR)
        assert filelock.lock_descriptor(holder, blocking=False)
        os.write(holder, b"D")  # the holding handle itself may write
        with pytest.raises(PermissionError, match="mandatory-lock"):
            a.read_text()
        with pytest.raises(PermissionError, match="mandatory-lock"):
            open(a, "wb")
        other = os.open(a, os.O_RDWR)  # opening a descriptor works, as on Windows ...
        assert not filelock.lock_descriptor(other, blocking=False)  # ... the lock is refused ...
        with pytest.raises(PermissionError, match="mandatory-lock"):
            os.read(other, 1)  # ... and so is every read or write through it
        with pytest.raises(PermissionError, match="mandatory-lock"):
            os.write(other, b"x")
        os.close(other)
        os.close(holder)  # closing drops the lock
        assert a.read_text() == "Data"
    assert rules.fired.count("mandatory-lock") == 4


def test_a_lock_is_advisory_without_the_rules(tmp_path):
    a = _file(tmp_path / "a", "data")
    holder = os.open(a, os.O_RDWR)
    try:
        assert filelock.lock_descriptor(holder, blocking=False)
        assert a.read_text() == "data"
        other = os.open(a, os.O_RDWR)
        assert not filelock.lock_descriptor(other, blocking=False)  # flock: per descriptor here too
        assert os.read(other, 4) == b"data"
        os.close(other)
    finally:
        os.close(holder)


def test_uninstall_puts_everything_back(tmp_path):
    before = (os.open, os.rename, os.replace, os.unlink, os.remove, os.rmdir, os.close, os.read, os.write,
              io.open, builtins.open, shutil.rmtree, filelock.lock_descriptor, filelock.unlock_descriptor)
    with WindowsRules():
        assert os.open is not before[0] and shutil.rmtree is not before[11]
    after = (os.open, os.rename, os.replace, os.unlink, os.remove, os.rmdir, os.close, os.read, os.write,
             io.open, builtins.open, shutil.rmtree, filelock.lock_descriptor, filelock.unlock_descriptor)
    assert after == before


def test_the_fixture_runs_a_test_under_the_rules(windows_rules, tmp_path):
    with pytest.raises(PermissionError):
        os.open(tmp_path, os.O_RDONLY)
    assert windows_rules.fired == ["folder-open"]


def test_a_lock_another_process_holds_is_mandatory_too(tmp_path):
    import subprocess
    import sys

    a = _file(tmp_path / "a", "data")
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time, filelock\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR)\nassert filelock.lock_descriptor(fd, blocking=False)\n"
                               "print('held', flush=True)\ntime.sleep(60)", str(a)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert a.read_text() == "data"  # advisory here
        with WindowsRules() as rules:
            with pytest.raises(PermissionError, match="mandatory-lock"):
                a.read_text()
            fd = os.open(a, os.O_RDONLY)
            with pytest.raises(PermissionError, match="mandatory-lock"):
                os.read(fd, 1)
            os.close(fd)
        assert rules.fired == ["mandatory-lock", "mandatory-lock"]
    finally:
        holder.kill()
        holder.wait()
    with WindowsRules():
        assert a.read_text() == "data"  # the holder is gone


def test_a_file_another_process_has_open_cannot_be_deleted(tmp_path):
    import subprocess
    import sys

    a = _file(tmp_path / "a")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nf = open(sys.argv[1])\n"
                               "print('open', flush=True)\ntime.sleep(60)", str(a)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with WindowsRules() as rules:
            with pytest.raises(PermissionError, match="open-handle"):
                os.unlink(a)
            with pytest.raises(PermissionError, match="open-handle"):
                os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
        assert rules.fired == ["open-handle", "open-handle"]
    finally:
        holder.kill()
        holder.wait()
    with WindowsRules():
        os.unlink(a)  # the holder is gone


def test_fsync_through_a_read_only_handle_is_refused_only_under_the_rules(tmp_path):
    path = _file(tmp_path / "a")
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    with WindowsRules() as rules:
        with open(path, "rb") as f, pytest.raises(PermissionError, match="fsync-read-only"):
            os.fsync(f.fileno())
        with open(path, "r+b") as f:
            os.fsync(f.fileno())  # a handle that may write flushes
    assert rules.fired == ["fsync-read-only"]
