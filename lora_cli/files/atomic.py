"""Files and folders that are either whole or absent: the one way this project writes them.

A file or folder is staged beside its target (same filesystem, so the final rename is atomic),
flushed to disk (the files, then the folders holding them), and only then renamed into place.
Any failure (full disk, kill, an exception half-way) removes the staged copy and leaves the
target as it was. Checkpoints, merged models, exported adapters, data caches, recipes,
metrics, plots and answer files all go through here, so they share one set of rules.

A kill -9 runs no clean-up, so a writer holds a lock while it works: not on what it stages
(Windows' locks are mandatory, so the writer could not write its own file through another
handle), but on a small lock file beside it, LOCK_PREFIX + the staged name, created and held
before the staged copy exists and removed after it was renamed away. `recover` tells a dead
writer's leftovers from a live one's by whether that lock is held, puts back an output killed
between the two renames of its replacement, and drops the rest, lock files included.

The rules this code keeps on every platform, so that the code the tests run on Linux is the code
Windows runs: nothing opens a folder with os.open (Windows refuses; fsync_dir gives up
quietly), every handle of a file or folder is closed before it is renamed or deleted (Windows
cannot rename or delete what a handle has open), no file is read or written through one handle
while another holds its lock, and a held lock file is deleted only where the OS allows it
(`let_go`). tests/windows_rules.py emulates those Windows rules on Linux for the tests."""

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
LOCK_PREFIX = ".lora-lock-"      # + the name of a staged or aside copy: held while its writer lives
ENTRY_PREFIXES = (STAGED_PREFIX, TRASH_PREFIX, ASIDE_PREFIX)
LEFTOVER_PREFIXES = (*ENTRY_PREFIXES, LOCK_PREFIX)


def sibling_name(target: Path, prefix: str) -> Path:
    """A name beside `target` that no other writer shares, not even another thread of this
    process: prefix + target's name + PID + random token, ending in target's suffix (writers
    such as matplotlib pick the format from it)."""
    return target.with_name(f"{prefix}{target.name}.{os.getpid()}-{secrets.token_hex(6)}{target.suffix}")


def lock_path(entry: Path) -> Path:
    """The lock file of a staged or aside copy: held by its writer for as long as it lives."""
    return entry.with_name(LOCK_PREFIX + entry.name)


def _siblings_of(target: Path, prefix: str) -> list[Path]:
    """The `prefix` siblings of `target` (this scheme's names, and the PID-time names older
    versions used); with LOCK_PREFIX before `prefix`, their lock files."""
    pattern = re.compile(re.escape(prefix + target.name) + r"(\.\d+-[0-9a-f]{12}" + re.escape(target.suffix)
                         + r"|-\d+-\d+(" + re.escape(target.suffix) + r")?)")
    try:
        return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))
    except OSError:
        return []


# --------------------------------------------------------------------------- who is still writing

def _reserve(target: Path, prefix: str) -> tuple[Path, int]:
    """A fresh `prefix` name beside `target` (nothing there yet) and the descriptor holding its
    lock file, for as long as this process works under that name: the kernel drops the lock
    when the process dies, however it dies, so a later run tells a dead writer's leftovers from
    a live writer's work (`abandoned`). The lock is held before the copy exists, so no moment
    shows a copy without its living holder."""
    while True:
        entry = sibling_name(target, prefix)
        lock = lock_path(entry)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            wait_lock(fd)  # a recover may be probing it this instant
            if same_file(lock, fd):
                return entry, fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # a recover took it for a dead writer's and removed it: take another name


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


def same_file(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (whoever removes a lock file may do
    so while another process waits on it, and a new one may take the name)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def let_go(fd: int, lock: Path) -> None:
    """Release the lock held through `fd` and remove its file. Where the OS allows it (POSIX)
    the file goes while still held, so whoever waits on it wakes on a removed file and starts
    over (`same_file`). Windows refuses to delete a file any handle has open: there it goes
    right after the close, or, when another process has it open by then (a waiter, which then
    holds it; a recover's probe), it stays for that process or a later recover to remove."""
    try:
        os.unlink(lock)
    except FileNotFoundError:
        pass
    except OSError:
        os.close(fd)
        try:
            os.unlink(lock)
        except OSError:
            pass
        return
    os.close(fd)


@contextmanager
def abandoned(entry: Path):
    """Yield whether no living process holds `entry` (a staged, aside or trash copy). While a
    true answer's block runs, this process holds the entry's lock, so the writer it belonged to
    cannot be mid-way taking it (see `_reserve`); the lock file goes afterwards. A copy without
    a lock file is abandoned: a writer holds its lock before the copy exists and removes it
    only after the copy is gone (trash never has one). A lock file this process cannot open is
    taken as held."""
    lock = lock_path(Path(entry))
    try:
        fd = _take_if_free(lock)
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        let_go(fd, lock)


def _take_if_free(lock: Path) -> int | None:
    """The descriptor now holding `lock`, or None when a living process holds it. Raises the
    OSError of opening it (FileNotFoundError: there is no lock file)."""
    fd = os.open(lock, os.O_RDONLY)  # enough to lock (flock; LockFileEx takes read access), even another user's file
    try:
        free = try_lock(fd)
    except BaseException:
        os.close(fd)
        raise
    if free:
        return fd
    os.close(fd)
    return None


def _drop_lock(lock: Path) -> None:
    """Remove a lock file whose copy is gone (its writer finished but could not remove it, or
    was killed between the two), unless a living writer holds it."""
    try:
        fd = _take_if_free(lock)
    except OSError:
        return
    if fd is not None:
        let_go(fd, lock)


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
    """Make a rename or a new entry in `path` durable, where a folder can be opened and synced
    (Windows opens no folder with os.open; there the file system's own journal is all)."""
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


def fsync_file(path: Path | str) -> None:
    """Flush one file's data to disk. Through a handle that may write: Windows' FlushFileBuffers
    refuses a read-only handle (Access denied), where POSIX syncs through any. A file the umask
    left read-only to its owner is synced through a read handle, which POSIX accepts; Windows
    then keeps it unflushed rather than failing the write (its rename is still atomic)."""
    try:
        f = open(path, "r+b")
    except PermissionError:
        f = open(path, "rb")
        writable = False
    else:
        writable = True
    with f:
        try:
            os.fsync(f.fileno())
        except PermissionError:
            if writable:
                raise


def fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then each folder, so a power cut after the rename that
    publishes it cannot leave a named but empty file."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(folder, name))
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
    deleted, and lock files nobody holds whose copy is gone; a living writer's are left alone."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        for aside in reversed(_siblings_of(target, ASIDE_PREFIX)):
            with abandoned(aside) as dead:
                if dead:
                    os.rename(aside, target)
                    fsync_dir(target.parent)
            if dead:
                break
    for prefix in ENTRY_PREFIXES:
        for path in _siblings_of(target, prefix):
            with abandoned(path) as dead:
                if dead:
                    _delete(path)
        for lock in _siblings_of(target, LOCK_PREFIX + prefix):
            if not os.path.lexists(_locked_entry(lock)):
                _drop_lock(lock)


def _locked_entry(lock: Path) -> Path:
    return lock.with_name(lock.name[len(LOCK_PREFIX):])


def clear_leftovers(folder: Path) -> None:
    """Everything killed writers left in `folder` (the caller holds the folder, as a run holds
    its output_dir under its lock): asides get their names back, the rest is never whole and
    is dropped, and so are lock files nobody holds whose copy is gone."""
    folder = Path(folder)
    for path in sorted(folder.glob(ASIDE_PREFIX + "*")):
        match = re.fullmatch(re.escape(ASIDE_PREFIX) + r"(.+?)(\.\d+-[0-9a-f]{12}.*|-\d+-\d+)", path.name)
        if match and not (folder / match.group(1)).exists():
            with abandoned(path) as dead:
                if dead:
                    os.rename(path, folder / match.group(1))
    for path in sorted(folder.glob(".lora-*")):
        if path.name.startswith(ENTRY_PREFIXES):
            with abandoned(path) as dead:
                if dead:
                    _delete(path)
    for lock in sorted(folder.glob(LOCK_PREFIX + "*")):
        if not os.path.lexists(_locked_entry(lock)):
            _drop_lock(lock)


# --------------------------------------------------------------------------- files

@contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path`; when the block ends without error the file there
    is flushed and renamed onto `path`, otherwise it is removed. The staged file exists (empty)
    when the block starts, and its lock file is held by this process (`abandoned`); the caller
    closes what it opened on the file before the block ends (it is renamed then)."""
    path = Path(path)
    created = _make_parents(path)
    tmp, fd, done = None, None, False
    try:
        tmp, fd = _reserve(path, STAGED_PREFIX)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        with_user_mode(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        done = True
    finally:
        if not done and tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # still open somewhere (Windows): without its lock it is recover's to drop
        if fd is not None:
            let_go(fd, lock_path(tmp))
        if not done:
            _remove_empty(created)
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
    aside first and deleted only after the new folder took its name; the aside copy's lock file
    is held meanwhile, so a kill between the two renames leaves an abandoned aside copy that
    `recover` puts back. Nothing under `staged` or `target` may be open (Windows renames no
    folder holding an open file)."""
    staged, target = Path(staged), Path(target)
    with_user_mode(staged)
    fsync_tree(staged)
    old, held = None, None
    if target.exists():
        if not replace:
            raise FileExistsError(17, "already exists", str(target))
        old, held = _reserve(target, ASIDE_PREFIX)
    try:
        try:
            if old is not None:
                os.rename(target, old)
            os.rename(staged, target)
            fsync_dir(target.parent)
        except BaseException:
            if old is not None and not target.exists() and old.exists():
                os.rename(old, target)  # the new copy could not take the name: the old one keeps it
            raise
        if old is not None:  # as trash of the target's name, so its recover finds a half-deleted one
            trash = sibling_name(target, TRASH_PREFIX)
            os.rename(old, trash)
    finally:
        if held is not None:
            let_go(held, lock_path(old))
    if old is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return target


@contextmanager
def staged_folder(target: Path, *, replace: bool = False):
    """Yield an empty folder beside `target`; fill it, and when the block ends without error it
    becomes `target` (replacing an existing one only with `replace`). On error it is removed.
    Its lock file is held by this process while it is filled (`abandoned`); the caller closes
    what it opened in it before the block ends."""
    target = Path(target)
    created = _make_parents(target)
    staging, fd, done = None, None, False
    try:
        staging, fd = _reserve(target, STAGED_PREFIX)
        staging.mkdir()
        yield staging
        publish_folder(staging, target, replace=replace)
        done = True
    finally:
        if not done and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if fd is not None:
            let_go(fd, lock_path(staging))
        if not done:
            _remove_empty(created)


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
