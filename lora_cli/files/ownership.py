"""Which folders and files lora may replace, the one output check, and one run per folder.

`check_output` is the check every command runs on the path it writes, before any work (inputs
apart, --force only over its own output, a writable folder, a killed writer's leftovers
recovered); `writing_file` / `writing_folder` write it whole, claim it, and turn a full,
read-only or forbidden disk into exit 2 naming the path. A single file is claimed in the
OWNER_FILE of the folder it sits in (`outputs`: command and identity).

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
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from lora_cli.files import atomic
from lora_cli.errors import LoraError

OWNER_FILE = ".lora-owner.json"
MARKER_LOCK = atomic.LOCK_PREFIX + OWNER_FILE  # held while OWNER_FILE is read and rewritten
LOCK_FILE = ".lora-train.lock"
PID_FILE = ".lora-train.pid"  # the PID of LOCK_FILE's holder: Windows lets no other handle read a locked file
RUN_LOCK_FILES = (LOCK_FILE, PID_FILE)  # what a run keeps in its folder while it clears it
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
    with _marker(folder) as marker:
        known = set(marker["files"]) if isinstance(marker.get("files"), list) and marker.get("command") == command else set()
        known.update(files)
        marker.update(command=command, files=sorted(known))


def forget(folder: Path, removed: list[str]) -> None:
    """Drop from the claim the files under folders the command deleted (rotated checkpoints),
    so a long run's marker does not grow without end."""
    if not read_claim(folder) or not removed:
        return
    prefixes = tuple(name.rstrip("/") + "/" for name in removed)
    with _marker(Path(folder)) as marker:
        marker["files"] = [f for f in marker["files"] if not f.startswith(prefixes)]


def claim_all(folder: Path, command: str) -> None:
    """Claim every file now in `folder` (a staged folder, just filled by `command`)."""
    claim(folder, command, [f for f in files_in(folder) if f != OWNER_FILE])


def is_leftover(relative: str) -> bool:
    """A path lora itself keeps while it works (a staged, aside or trash copy anywhere on the
    way, a lock file, the run's lock and its PID): what a killed command leaves, never a user's file."""
    parts = Path(relative).parts
    return relative in (LOCK_FILE, PID_FILE) or any(part.startswith(atomic.LEFTOVER_PREFIXES) for part in parts)


def foreign_files(folder: Path, claimed: dict | None) -> list[str]:
    """Files in `folder` that its claim does not list (all of them without a claim), lora's
    own leftovers aside."""
    mine = set(claimed["files"]) if claimed else set()
    return [f for f in files_in(folder) if f not in mine and f != OWNER_FILE and not is_leftover(f)]


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
    """Nothing in it but lora's own leftovers: a run's lock file, staged copies of a command
    killed before it claimed the folder."""
    return all(is_leftover(entry.name) for entry in Path(folder).iterdir())


def clear_claimed(folder: Path, command: str, keep: tuple[str, ...] = ()) -> None:
    """Empty a folder check_replaceable allowed, keeping `keep` (the lock a run holds in it)."""
    check_replaceable(folder, command, "replacing")  # again: the folder may have changed since
    # The claim goes last: killed half-way, the folder is still provably ours to clear again.
    entries = sorted(Path(folder).iterdir(), key=lambda e: e.name == OWNER_FILE)
    for entry in entries:
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            atomic.remove_tree(entry)
        else:
            entry.unlink()


def _top_level(folder: Path) -> list[str]:
    return sorted(e.name + ("/" if e.is_dir() else "") for e in Path(folder).iterdir() if not is_leftover(e.name))


def _listing(files: list[str]) -> str:
    shown = ", ".join(files[:_SHOWN])
    return shown + (f" and {len(files) - _SHOWN} more" if len(files) > _SHOWN else "")


@contextmanager
def _marker_lock(folder: Path):
    """Hold MARKER_LOCK in `folder` (waiting for another process holding it). The file is
    removed on release (atomic.let_go), so a folder keeps no lock file; a waiter that wakes on
    a removed file (its path gone or another inode now) opens the new one and waits again."""
    path = Path(folder) / MARKER_LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            atomic.wait_lock(fd)
            if atomic.same_file(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        atomic.let_go(fd, path)


@contextmanager
def _marker(folder: Path):
    """Read, change and atomically rewrite a folder's OWNER_FILE (its folder claim, `command`
    and `files`, and its file claims, `outputs`), under MARKER_LOCK: two commands writing into
    one folder at once each keep the other's entries."""
    with _marker_lock(folder):
        try:
            marker = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = {}
        marker = marker if isinstance(marker, dict) else {}
        yield marker
        atomic.write_text(Path(folder) / OWNER_FILE, json.dumps(marker, indent=1))


# --------------------------------------------------------------------------- file claims

def _identity(path: Path) -> dict:
    """What says a file is still the one lora wrote: a rename keeps inode, size and mtime; an
    edit, a copy or a replacement by anyone else changes at least one."""
    st = os.stat(path)
    return {"inode": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def claim_file(staged: Path, out: Path, command: str) -> None:
    """Record in out's folder that `command` wrote the file now staged for `out` (call it
    before the rename: a rename keeps the identity). The earlier identity is kept until
    `settle_file`, so a kill between the two leaves either file provably ours."""
    out = Path(out)
    with _marker(out.parent) as marker:
        outputs = marker.setdefault("outputs", {})
        old = outputs.get(out.name) if isinstance(outputs.get(out.name), dict) else {}
        kept = [i for i in old.get("identities", []) if old.get("command") == command]
        outputs[out.name] = {"command": command, "identities": [_identity(staged), *kept][:2]}


def settle_file(out: Path) -> None:
    """After the rename: only the identity of the file now at `out` stays claimed."""
    out = Path(out)
    with _marker(out.parent) as marker:
        entry = marker.get("outputs", {}).get(out.name)
        if isinstance(entry, dict):
            entry["identities"] = [_identity(out)]


def file_written_by(path: Path) -> str | None:
    """The command that wrote the file at `path`, if lora wrote it and nobody changed it since."""
    path = Path(path)
    entry = (read_marker(path.parent).get("outputs") or {}).get(path.name)
    if not isinstance(entry, dict) or not path.is_file() or path.is_symlink():
        return None
    return entry.get("command") if _identity(path) in entry.get("identities", []) else None


def read_marker(folder: Path) -> dict:
    try:
        marker = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


# --------------------------------------------------------------------------- the one output check

def check_output(out: Path, command: str, *, force: bool, inputs: list, flag: str = "--out",
                 folder: bool = False) -> Path:
    """The check every command that writes runs on its output path, before any work:
    - what a killed earlier writer of `out` left beside it is recovered or dropped;
    - `out` may not be, hold or sit inside one of the command's `inputs` ((label, path) pairs);
    - an existing `out` is replaced only with --force, and only when `lora <command>` wrote it
      (a folder by its claim, a file by its file claim) and nothing else was added since;
    - the folder it goes into must be writable (a read-only disk is named now, not mid-write)."""
    out = Path(out)
    atomic.recover(out)
    atomic.recover(out.parent / OWNER_FILE)  # a claim being rewritten when a writer was killed
    check_not_inputs(out, inputs, flag)
    if folder and out.is_dir() and not out.is_symlink() and is_empty(out):
        pass  # nothing in it to lose
    elif out.exists() or out.is_symlink():
        if not force:
            raise LoraError(f"{flag} {out} already exists", f"choose another {flag}, or pass --force to replace it")
        if folder:
            check_replaceable(out, command, "--force")
        else:
            _check_file_replaceable(out, command, flag)
    check_writable(out, flag)
    return out


def _check_file_replaceable(out: Path, command: str, flag: str) -> None:
    if out.is_dir() and not out.is_symlink():
        raise LoraError(f"{flag} {out} is a folder", f"give a file name, e.g. {flag} {out / ('result' + (out.suffix or '.out'))}")
    writer = file_written_by(out)
    if writer != command:
        why = (f"was written by `lora {writer}`, not `lora {command}`" if writer else
               f"was not written by `lora {command}` (or was changed since), so it may be your own file")
        raise LoraError(f"--force refused: {out} {why}", f"choose another {flag}, or move that file away yourself")


_PROBE = "probe"  # staged as .lora-staged-probe.PID-TOKEN: a leftover of it is lora's own


def check_writable(out: Path, flag: str = "--out") -> None:
    """The nearest existing folder on the way to `out` accepts a new entry (where `out`, or
    its staged copy, will be created)."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise LoraError(f"{flag} {out}: {parent} is not a folder", f"choose another {flag}")
    atomic.recover(parent / _PROBE)  # a probe of a command killed while it probed
    try:
        probe = atomic.sibling_name(parent / _PROBE, atomic.STAGED_PREFIX)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise write_error(out, e, flag) from None


# --------------------------------------------------------------------------- writing

def fault_text(error: OSError, out: Path | None = None) -> str:
    """'No space left on device (the file)': the reason, as the OS says it, and the file."""
    where = f" ({error.filename})" if getattr(error, "filename", None) and str(error.filename) != str(out) else ""
    return f"{error.strerror or (os.strerror(error.errno) if error.errno else error)}{where}"


def write_error(out: Path, error: OSError, flag: str = "--out") -> LoraError:
    """A refusal naming the path and the reason, for an OSError met while writing `out`."""
    return LoraError(f"writing {out} failed: {fault_text(error, out)}; nothing was written",
                     f"free space or fix the permissions (or choose another {flag}), then run the command again")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust's std::io::Error prints an OS error
_PROBE_BYTES = 1 << 20
_NEARLY_FULL = 16 << 20


def disk_fault(out: Path, error: BaseException) -> OSError | None:
    """The OSError behind `error` raised while writing `out`, whatever library raised it:
    the error itself or one it was raised from; the OS error a Rust library (safetensors,
    tokenizers) reports in its own error type, in the form Rust's io::Error prints; else what
    the disk says now: a probe written beside `out` fails as the library's write did (a full,
    read-only or forbidden folder), or the disk has next to no space left. None: not a disk
    fault. Call it before the partial output is removed, so a full disk is still full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    if not isinstance(error, Exception):
        return None  # Ctrl-C, SystemExit: not a write failure
    found = _RUST_OS_ERROR.search(str(error))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), str(out))
    return _probe(Path(out))


def _probe(out: Path) -> OSError | None:
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = atomic.sibling_name(folder / out.name, atomic.STAGED_PREFIX)
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * _PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
        if shutil.disk_usage(folder).free < _NEARLY_FULL:  # statvfs's f_bavail * f_frsize; Windows has no statvfs
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
    except OSError as e:
        return OSError(e.errno, e.strerror, str(out))
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


@contextmanager
def turning_disk_errors(out: Path, flag: str = "--out"):
    """A full disk, a read-only file system or a denied permission while writing `out`
    becomes exit 2 naming the path (staged copies are removed by the atomic helpers)."""
    try:
        yield
    except LoraError:
        raise
    except BaseException as e:
        fault = disk_fault(out, e)
        if fault is None:
            raise
        raise write_error(out, fault, flag) from None


@contextmanager
def writing_file(out: Path, command: str, flag: str = "--out"):
    """Yield a staged path for `out` (atomic.staged_file); on success the file is claimed for
    `command` and renamed onto `out`. Call check_output first."""
    out = Path(out)
    with turning_disk_errors(out, flag):  # the staging itself: its fsync, rename, the claim
        with atomic.staged_file(out) as tmp:
            with turning_disk_errors(out, flag):  # the writer, judged while its partial file is there
                yield tmp
            claim_file(tmp, out, command)
        settle_file(out)


def write_output_text(out: Path, text: str, command: str, flag: str = "--out") -> Path:
    with writing_file(out, command, flag) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return Path(out)


@contextmanager
def writing_folder(out: Path, command: str, force: bool, flag: str = "--out"):
    """Yield a staging folder; on success it is claimed for `command` and replaces `out`.
    On error `out` is untouched and the staging folder is gone; a full disk, a quota, a
    read-only file system or a folder that went away while writing is exit 2, not a crash.
    Call check_output(..., folder=True) first."""
    out = Path(out)
    with turning_disk_errors(out, flag):  # the staging itself: its fsync, renames, the claim
        with atomic.staged_folder(out, replace=True) as staging:
            with turning_disk_errors(out, flag):  # the writers, judged while their partial files are there
                yield staging
            claim_all(staging, command)
            # again: the folder may have appeared or changed meanwhile
            if out.exists() and not force and not (out.is_dir() and is_empty(out)):
                raise LoraError(f"{flag} {out} appeared while lora {command} was writing", f"choose another {flag}")
            check_replaceable(out, command, "--force")


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
    release). The holder's PID goes in PID_FILE beside it, so a refused run can name it (not in
    the lock file: on Windows no other handle may read a file while its lock is held). The lock
    itself is filelock's (flock on POSIX, LockFileEx on Windows), so the CLI starts on every platform."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the user's umask decides
        try:
            locked = atomic.try_lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            raise _busy(self.path.parent, holder_pid(self.path))
        self.fd = fd
        try:
            atomic.write_text(self.path.with_name(PID_FILE), f"{os.getpid()}\n")
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.with_name(PID_FILE).unlink()  # while still held: no newer holder wrote it
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


def check_unlocked(folder: Path) -> None:
    """Refuse at once when another process holds the folder's lock (without taking it)."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDWR)  # Windows' LockFileEx needs a handle that may write
    try:
        free = atomic.try_lock(fd)
    finally:
        os.close(fd)  # closing drops the lock this probe may have taken
    if not free:
        raise _busy(Path(folder), holder_pid(path))


def holder_pid(path: Path) -> str:
    """The PID the holder of the lock file `path` wrote beside it (PID_FILE)."""
    try:
        return Path(path).with_name(PID_FILE).read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _busy(folder: Path, pid: str) -> LoraError:
    return LoraError(f"{folder} is in use by another `lora train` (PID {pid}); two runs in one folder would "
                     "interleave their metrics and checkpoints",
                     "wait for that run to end (or stop it), or train into another output_dir")
