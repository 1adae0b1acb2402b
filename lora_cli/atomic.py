"""Files and folders that are either whole or absent: the one way this project writes them.

A file or folder is staged beside its target (same filesystem, so the final rename is atomic),
flushed to disk (the files, then the folders holding them), and only then renamed into place.
Any failure (full disk, kill, an exception half-way) removes the staged copy and leaves the
target as it was. Checkpoints, merged models, exported adapters, data caches, recipes,
metrics, plots and answer files all go through here, so they share one set of rules."""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

STAGED_PREFIX = ".lora-staged-"  # sibling names a crash may leave behind; never a user's file
TRASH_PREFIX = ".lora-trash-"


def _sibling(target: Path, prefix: str) -> Path:
    return target.with_name(f"{prefix}{target.name}-{os.getpid()}-{time.time_ns()}")


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


def remove_tree(path: Path) -> None:
    """Delete a folder so that an interruption cannot leave a half-deleted one under its name
    (which could still look complete): rename it aside first, then delete."""
    path = Path(path)
    trash = _sibling(path, TRASH_PREFIX)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clear_leftovers(folder: Path) -> None:
    """Staged and trash siblings a killed process left in `folder`: never whole, safe to drop."""
    for path in Path(folder).glob(".lora-*"):
        if path.name.startswith((STAGED_PREFIX, TRASH_PREFIX)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- files

@contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path`; when the block ends without error the file there
    is flushed and renamed onto `path`, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, STAGED_PREFIX).with_suffix(path.suffix)  # keeps .png etc. for writers that look
    try:
        yield tmp
        with_user_mode(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
    aside first and deleted only after the new folder took its name."""
    staged, target = Path(staged), Path(target)
    with_user_mode(staged)
    fsync_tree(staged)
    old = None
    if target.exists():
        if not replace:
            raise FileExistsError(17, "already exists", str(target))
        old = _sibling(target, TRASH_PREFIX)
        os.rename(target, old)
    os.rename(staged, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def staged_folder(target: Path, *, replace: bool = False):
    """Yield an empty folder beside `target`; fill it, and when the block ends without error it
    becomes `target` (replacing an existing one only with `replace`). On error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(target, STAGED_PREFIX)
    staging.mkdir()
    try:
        yield staging
        publish_folder(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
