"""Which folders lora may replace, and one run per folder.

Every folder a command writes (a training run, a merged model, an exported adapter, a tiny
base) carries OWNER_FILE: the command that wrote it and every file it wrote. `--overwrite` and
`--force` replace a folder only when that marker says the same command kind wrote it and the
folder holds nothing else; a folder without the marker, or with one file more, is the user's.
No command writes into or deletes its own inputs. `lora train` holds an exclusive lock on its
output_dir while it runs; the kernel drops it when the process ends, however it ends."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from lora_cli import atomic
from lora_cli.errors import LoraError

OWNER_FILE = ".lora-owner.json"
LOCK_FILE = ".lora-train.lock"
_SHOWN = 10  # foreign files listed by name; the rest are counted


# --------------------------------------------------------------------------- claims

def read_claim(folder: Path) -> dict | None:
    """{'command': ..., 'files': [...]} of a folder lora wrote, or None."""
    try:
        claim = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(claim, dict) or not isinstance(claim.get("files"), list):
        return None
    return claim


def files_in(folder: Path) -> list[str]:
    """Every file under `folder`, as posix paths relative to it."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def claim(folder: Path, command: str, files=()) -> None:
    """Mark `folder` as written by `command`, adding `files` (relative paths) to what it wrote.
    Call it before writing them, so a crash leaves a folder that is still provably ours."""
    folder = Path(folder)
    old = read_claim(folder)
    known = set(old["files"]) if old and old.get("command") == command else set()
    known.update(files)
    atomic.write_text(folder / OWNER_FILE, json.dumps({"command": command, "files": sorted(known)}, indent=1))


def forget(folder: Path, removed: list[str]) -> None:
    """Drop from the claim the files under folders the command deleted (rotated checkpoints),
    so a long run's marker does not grow without end."""
    old = read_claim(folder)
    if not old or not removed:
        return
    prefixes = tuple(name.rstrip("/") + "/" for name in removed)
    kept = [f for f in old["files"] if not f.startswith(prefixes)]
    atomic.write_text(Path(folder) / OWNER_FILE, json.dumps({**old, "files": kept}, indent=1))


def claim_all(folder: Path, command: str) -> None:
    """Claim every file now in `folder` (a staged folder, just filled by `command`)."""
    claim(folder, command, [f for f in files_in(folder) if f != OWNER_FILE])


def foreign_files(folder: Path, claimed: dict | None) -> list[str]:
    """Files in `folder` that its claim does not list (all of them without a claim)."""
    mine = set(claimed["files"]) if claimed else set()
    internal = {OWNER_FILE, LOCK_FILE} if claimed else set()
    return [f for f in files_in(folder) if f not in mine and f not in internal
            and not Path(f).name.startswith((atomic.STAGED_PREFIX, atomic.TRASH_PREFIX))]


def check_replaceable(folder: Path, command: str, flag: str) -> None:
    """Refuse unless `folder` is absent, empty, or wholly written by `command` (so `flag` may
    replace it)."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise LoraError(f"{folder} exists and is a file, not a folder lora wrote", "choose another path")
    if is_empty(folder):
        return
    claimed = read_claim(folder)
    if claimed is None:
        raise LoraError(f"{flag} refused: {folder} was not written by `lora {command}` (no {OWNER_FILE}), "
                        f"so it may hold your own files: {_listing(_top_level(folder))}",
                        "choose a new folder, or move those files away yourself")
    foreign = foreign_files(folder, claimed)
    extra = f"; it also holds files lora did not write: {_listing(foreign)}" if foreign else ""
    if claimed.get("command") != command:
        raise LoraError(f"{flag} refused: {folder} was written by `lora {claimed.get('command')}`, "
                        f"not `lora {command}`{extra}",
                        "choose a new folder, or delete it yourself if it is no longer needed")
    if foreign:
        raise LoraError(f"{flag} refused: {folder} holds files `lora {command}` did not write: {_listing(foreign)}",
                        "move those files out of the folder (or choose a new one), then run the command again")


def is_empty(folder: Path) -> bool:
    """Nothing in it but, at most, a run's lock file (left by a run that stopped before writing)."""
    return all(entry.name == LOCK_FILE for entry in Path(folder).iterdir())


def clear_claimed(folder: Path, command: str, keep: tuple[str, ...] = ()) -> None:
    """Empty a folder check_replaceable allowed, keeping `keep` (the lock a run holds in it)."""
    check_replaceable(folder, command, "replacing")  # again: the folder may have changed since
    for entry in Path(folder).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            atomic.remove_tree(entry)
        else:
            entry.unlink()


def _top_level(folder: Path) -> list[str]:
    return sorted(e.name + ("/" if e.is_dir() else "") for e in Path(folder).iterdir())


def _listing(files: list[str]) -> str:
    shown = ", ".join(files[:_SHOWN])
    return shown + (f" and {len(files) - _SHOWN} more" if len(files) > _SHOWN else "")


# --------------------------------------------------------------------------- inputs

def check_not_inputs(out: Path, inputs: list[tuple[str, str | Path | None]], flag: str) -> None:
    """Refuse an output folder that is, is inside, or contains one of the command's inputs
    (label, path); inputs that are not local paths (hub ids) are skipped."""
    target = Path(out).expanduser().resolve()
    for label, value in inputs:
        if not value or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        if target == source:
            relation = "is"
        elif target.is_relative_to(source):
            relation = "is inside"
        elif source.is_relative_to(target):
            relation = "contains"
        else:
            continue
        raise LoraError(f"{flag} {out} {relation} the {label} ({value}); a command never writes into or "
                        "replaces its own inputs", f"choose a {flag} outside {source}"
                        + (" and away from its inputs" if relation == "contains" else ""))


# --------------------------------------------------------------------------- one run per folder

class FolderLock:
    """An exclusive lock on output_dir/LOCK_FILE, held for the life of the process (or until
    release). The file keeps the holder's PID so a refused run can name it. The lock itself is
    filelock's (flock on POSIX, LockFileEx on Windows), so the CLI starts on every platform."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the user's umask decides
        try:
            locked = _try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise _busy(self.path.parent, holder_pid(self.path))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def check_unlocked(folder: Path) -> None:
    """Refuse at once when another process holds the folder's lock (without taking it)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)  # Windows' LockFileEx needs a handle that may write
    try:
        free = _try_lock(fd)
    finally:
        os.close(fd)  # closing drops the lock this probe may have taken
    if not free:
        raise _busy(Path(folder), holder_pid(path))


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on an open descriptor without waiting; False when another
    process holds it."""
    from filelock import lock_descriptor

    try:
        return lock_descriptor(fd, blocking=False)
    except OSError as e:  # some filesystems report contention as an error
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        raise


def holder_pid(path: Path) -> str:
    try:
        return Path(path).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _busy(folder: Path, pid: str) -> LoraError:
    return LoraError(f"{folder} is in use by another `lora train` (PID {pid}); two runs in one folder would "
                     "interleave their metrics and checkpoints",
                     "wait for that run to end (or stop it), or train into another output_dir")
