"""Files and folders that are either whole or absent: the one way this project writes them.

A file or folder is staged beside its target (same filesystem, so the final rename is atomic),
flushed to disk (the files, then the folders holding them), and only then renamed into place.
Any failure (full disk, kill, an exception half-way) removes the staged copy and leaves the
target as it was. Checkpoints, merged models, exported adapters, data caches, recipes,
metrics, plots and answer files all go through here, so they share one set of rules.

A kill -9 runs no clean-up, so a writer holds an flock on what it stages (and on an output it
is replacing) while it works: `recover` tells a dead writer's leftovers from a live one's, puts
back an output killed between the two renames of its replacement, and drops the rest."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

STAGED_PREFIX = ".lora-staged-"  # sibling names a crash may leave behind; never a user's file
TRASH_PREFIX = ".lora-trash-"
ASIDE_PREFIX = ".lora-aside-"    # a replaced folder, moved aside until its successor took its name
LEFTOVER_PREFIXES = (STAGED_PREFIX, TRASH_PREFIX, ASIDE_PREFIX)


def sibling_name(target: Path, prefix: str) -> Path:
    """A name beside `target` that no other writer shares, not even another thread of this
    process: prefix + target's name + PID + random token, ending in target's suffix (writers
    such as matplotlib pick the format from it)."""
    return target.with_name(f"{prefix}{target.name}.{os.getpid()}-{secrets.token_hex(6)}{target.suffix}")


def _siblings_of(target: Path, prefix: str) -> list[Path]:
    """The `prefix` siblings of `target` (this scheme's names, and the PID-time names older
    versions used)."""
    pattern = re.compile(re.escape(prefix + target.name) + r"(\.\d+-[0-9a-f]{12}" + re.escape(target.suffix)
                         + r"|-\d+-\d+(" + re.escape(target.suffix) + r")?)")
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


# --------------------------------------------------------------------------- who is still writing

def _hold(path: Path) -> int:
    """An exclusive flock on `path` (a staged file or folder) for as long as this process
    writes it: the kernel drops it when the process dies, however it dies, so a later run
    tells a dead writer's leftovers from a live writer's work (`is_abandoned`)."""
    fd = os.open(path, os.O_RDONLY)
    if not try_lock(fd):
        os.close(fd)
        raise OSError(errno.EWOULDBLOCK, f"{path} is held by another process")
    return fd


def try_lock(fd: int) -> bool:
    """An exclusive lock on an open descriptor without waiting, through filelock (flock on
    POSIX, LockFileEx on Windows, so nothing here needs fcntl); False when another process holds it."""
    from filelock import lock_descriptor

    try:
        return lock_descriptor(fd, blocking=False)
    except OSError as e:  # some filesystems report contention as an error
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        raise


def wait_lock(fd: int) -> None:
    """An exclusive lock on an open descriptor, waiting for whoever holds it (filelock, as try_lock)."""
    from filelock import lock_descriptor

    lock_descriptor(fd, blocking=True, poll_interval=0.005)


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def is_abandoned(path: Path) -> bool:
    """Whether no living process holds `path` (a staged, aside or trash entry)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already, or not ours to open
    try:
        return try_lock(fd)
    finally:
        os.close(fd)


def _make_parents(path: Path) -> list[Path]:
    """Create the missing folders on the way to `path`; return them, deepest first, so a
    failed write can remove what it created and leave nothing behind."""
    missing = []
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (someone else wrote there meanwhile) or gone: leave it


def current_umask() -> int:
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return umask


def file_mode() -> int:
    """The mode a plain `open(..., "w")` gives a new file under the user's umask. Libraries that
    write through a private temporary file (safetensors: 0600) are brought back to it, so a
    group-shared model folder stays readable by the group."""
    return 0o666 & ~current_umask()


def with_user_mode(root: Path) -> None:
    """Give every file under `root` (or `root` itself, a file) the umask's mode, and every
    folder the umask's folder mode (mkdtemp makes them 0700)."""
    root = Path(root)
    if root.is_file():
        os.chmod(root, file_mode())
        return
    umask = current_umask()
    for folder, _, names in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then each folder, so a power cut after the rename that
    publishes it cannot leave a named but empty file."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(folder))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_tree(path: Path) -> None:
    """Delete a folder so that an interruption cannot leave a half-deleted one under its name
    (which could still look complete): rename it aside first, then delete."""
    path = Path(path)
    trash = sibling_name(path, TRASH_PREFIX)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover(target: Path) -> None:
    """Undo what a killed writer of `target` left beside it. A kill between the two renames of
    a replacement (`publish_folder`) leaves `target` missing and the old copy aside: it gets
    its name back. Staged copies and trash of dead writers (possibly many gigabytes) are
    deleted; a living writer's are left alone."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        for aside in reversed(_siblings_of(target, ASIDE_PREFIX)):
            if is_abandoned(aside):
                os.rename(aside, target)
                fsync_dir(target.parent)
                break
    for prefix in LEFTOVER_PREFIXES:
        for path in _siblings_of(target, prefix):
            if is_abandoned(path):
                _delete(path)


def clear_leftovers(folder: Path) -> None:
    """Everything killed writers left in `folder` (the caller holds the folder, as a run holds
    its output_dir under its lock): asides get their names back, the rest is never whole and
    is dropped."""
    folder = Path(folder)
    for path in sorted(folder.glob(ASIDE_PREFIX + "*")):
        match = re.fullmatch(re.escape(ASIDE_PREFIX) + r"(.+?)(\.\d+-[0-9a-f]{12}.*|-\d+-\d+)", path.name)
        if match and not (folder / match.group(1)).exists() and is_abandoned(path):
            os.rename(path, folder / match.group(1))
    for path in folder.glob(".lora-*"):
        if path.name.startswith(LEFTOVER_PREFIXES) and is_abandoned(path):
            _delete(path)


# --------------------------------------------------------------------------- files

@contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path`; when the block ends without error the file there
    is flushed and renamed onto `path`, otherwise it is removed. The staged file exists (empty)
    when the block starts, held by this process (`is_abandoned`)."""
    path = Path(path)
    created = _make_parents(path)
    tmp = sibling_name(path, STAGED_PREFIX)
    fd = None
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fd = _hold(tmp)
        yield tmp
        with_user_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    finally:
        _release(fd)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> Path:
    with staged_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- folders

def publish_folder(staged: Path, target: Path, *, replace: bool = False) -> Path:
    """Flush `staged` and rename it to `target`. With `replace`, an existing target is moved
    aside first and deleted only after the new folder took its name; it is held meanwhile, so
    a kill between the two renames leaves an abandoned aside copy that `recover` puts back."""
    staged, target = Path(staged), Path(target)
    with_user_mode(staged)
    fsync_tree(staged)
    old, held = None, None
    if target.exists():
        if not replace:
            raise FileExistsError(17, "already exists", str(target))
        held = _hold(target)
        old = sibling_name(target, ASIDE_PREFIX)
    try:
        if old is not None:
            os.rename(target, old)
        os.rename(staged, target)
        fsync_dir(target.parent)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # the new copy could not take the name: the old one keeps it
        raise
    finally:
        _release(held)
    if old is not None:  # as trash of the target's name, so its recover finds a half-deleted one
        trash = sibling_name(target, TRASH_PREFIX)
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return target


@contextmanager
def staged_folder(target: Path, *, replace: bool = False):
    """Yield an empty folder beside `target`; fill it, and when the block ends without error it
    becomes `target` (replacing an existing one only with `replace`). On error it is removed.
    The staged folder is held by this process while it is filled (`is_abandoned`)."""
    target = Path(target)
    created = _make_parents(target)
    staging = sibling_name(target, STAGED_PREFIX)
    staging.mkdir()
    fd = _hold(staging)
    try:
        yield staging
        publish_folder(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        _release(fd)


def move_files_into(staged: Path, dest: Path, *, last: str | None = None) -> list[str]:
    """Move every file of `staged` into the existing folder `dest`, each by an atomic rename,
    `last` at the end (a file whose presence says the others are there); then drop `staged`.
    Returns the names moved."""
    staged, dest = Path(staged), Path(dest)
    with_user_mode(staged)
    fsync_tree(staged)
    files = sorted((f for f in staged.iterdir() if f.is_file()), key=lambda f: f.name == last)
    for f in files:
        os.replace(f, dest / f.name)
    fsync_dir(dest)
    shutil.rmtree(staged, ignore_errors=True)
    return [f.name for f in files]
