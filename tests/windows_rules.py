"""An EMULATION on Linux of the documented Windows file rules that lora's writers must live
with. It is not Windows and proves nothing about Windows itself: it only makes the rules below
fire in this process, so a writer that breaks one of them fails here too. Real Windows stays
unverified (docs/reliability.md, "Windows: what is verified, and how far").

While active (`WindowsRules().install()`, or the `windows_rules` fixture in conftest.py):

1. `os.open` on a folder raises PermissionError (the C runtime's open refuses directories).
2. A file or folder cannot be renamed, replaced or deleted while any handle is open on it, or,
   for a folder, on anything under it: os.rename, os.replace, os.unlink, os.remove, os.rmdir and
   shutil.rmtree raise PermissionError, as a sharing violation does (Python opens files without
   FILE_SHARE_DELETE). shutil.rmtree(ignore_errors=True) deletes what it can and leaves the
   open files and the folders holding them, as on Windows.
3. `os.rename` onto a name that exists raises FileExistsError (Windows' rename never replaces;
   os.replace does, unless the target is open or a folder).
4. A lock taken through `filelock.lock_descriptor` is mandatory and per handle (LockFileEx):
   while one descriptor holds it, a file object opened on that file (builtins.open, io.open,
   Path.open/read_text/write_bytes, ...) fails when it is opened, and os.read, os.write and
   os.ftruncate through any other descriptor fail. This is STRICTER than Windows, which fails
   only at the first read or write that touches the locked byte (filelock locks byte 0) and
   lets a file object be opened. A plain `os.open` of a locked file succeeds, as on Windows, so
   a probe can try the lock and be refused (flock already refuses a second descriptor, even in
   one process). Locks held by other processes count too (read from /proc/locks), whether or
   not those processes run under the rules.
5. `os.fsync` through a descriptor opened read-only raises PermissionError: Windows'
   FlushFileBuffers needs a handle with write access (seen under Windows CPython on Wine too,
   where lora's writers failed on it: `make test-windows`).

Handles tracked: in this process, descriptors from os.open until os.close (or until they no
longer name the file), and file objects from builtins.open / io.open / Path.open until closed or
collected; in other processes, whatever they have open, read from /proc/<pid>/fd (so a lock file
another process holds open cannot be deleted here, as on Windows). A rule's check and the call
it guards, and every open, run as one step for all threads and processes under the rules (a
lock on a file in the temporary folder), as Windows checks and acts in one kernel call.

Not emulated: handles C or Rust code opens in this process (torch, safetensors, tokenizers),
file objects over a descriptor (os.fdopen) reading a locked file, directory enumeration
handles, the programs Windows runs that open files behind lora's back (antivirus, indexers,
Explorer), path length and reserved names, case insensitivity, st_ino on NTFS, and everything
else Windows does differently."""

from __future__ import annotations

import builtins
import errno
import fcntl
import io
import os
import shutil
import stat
import tempfile
import threading
import weakref
from contextlib import contextmanager

import filelock


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


_THREADS = threading.RLock()
GUARD = os.path.join(tempfile.gettempdir(), "lora-windows-rules.guard")


class WindowsRules:
    """The rules above, installed into this process's os, io, builtins, shutil and filelock."""

    def __init__(self):
        self.fds: dict[int, tuple[int, int]] = {}         # descriptor -> the file it was opened on
        self.files: list[tuple[weakref.ref, tuple[int, int]]] = []  # file objects, the same
        self.locks: dict[int, tuple[int, int]] = {}       # descriptor holding a lock -> its file
        self.fired: list[str] = []                        # which rule refused what, for the tests
        self._saved: list[tuple[object, str, object]] = []
        self._depth = 0

    # ------------------------------------------------------------------ installing

    def install(self) -> "WindowsRules":
        self._orig = {name: getattr(os, name) for name in
                      ("open", "close", "read", "write", "ftruncate", "fsync", "rename", "replace", "unlink", "remove",
                       "rmdir")}
        self._orig_io_open = io.open
        self._orig_lock, self._orig_unlock = filelock.lock_descriptor, filelock.unlock_descriptor
        self._guard = os.open(GUARD, os.O_RDWR | os.O_CREAT, 0o666)
        for name in self._orig:
            self._patch(os, name, getattr(self, "_" + name))
        self._patch(io, "open", self._io_open)
        self._patch(builtins, "open", self._io_open)
        self._patch(shutil, "rmtree", self._rmtree)
        self._patch(filelock, "lock_descriptor", self._lock_descriptor)
        self._patch(filelock, "unlock_descriptor", self._unlock_descriptor)
        return self

    def uninstall(self) -> None:
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()
        os.close(self._guard)

    def __enter__(self) -> "WindowsRules":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _patch(self, owner, name, value) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    @contextmanager
    def _step(self):
        """A check and the call it guards as one step (see the module's docstring)."""
        with _THREADS:
            self._depth += 1
            if self._depth == 1:
                fcntl.flock(self._guard, fcntl.LOCK_EX)
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fcntl.flock(self._guard, fcntl.LOCK_UN)

    def _refuse(self, rule: str, message: str, path, kind=PermissionError):
        self.fired.append(rule)
        return kind(errno.EEXIST if kind is FileExistsError else errno.EACCES,
                    f"emulated Windows rule ({rule}): {message}", str(path))

    # ------------------------------------------------------------------ what is open

    def _live(self, table: dict[int, tuple[int, int]]):
        for fd, ident in list(table.items()):
            try:
                still = _identity(os.fstat(fd)) == ident
            except OSError:
                still = False
            if still:
                yield fd, ident
            else:
                table.pop(fd, None)

    def open_identities(self) -> set[tuple[int, int]]:
        """Every file some tracked handle has open now."""
        idents = {ident for _, ident in self._live(self.fds)}
        alive = []
        for ref, ident in self.files:
            f = ref()
            if f is not None and not f.closed:
                alive.append((ref, ident))
                idents.add(ident)
        self.files[:] = alive
        return idents | self._open_elsewhere()

    def _open_elsewhere(self) -> set[tuple[int, int]]:
        """The files other processes have open, as /proc lists their descriptors."""
        found = set()
        me = str(os.getpid())
        try:
            pids = [p for p in os.listdir("/proc") if p.isdigit() and p != me]
        except OSError:
            return found
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue  # gone, or not ours to read
            for fd in fds:
                try:
                    found.add(_identity(os.stat(f"/proc/{pid}/fd/{fd}")))
                except OSError:
                    continue
        return found

    def _locked_by(self, ident: tuple[int, int]) -> int | None:
        """The descriptor of this process that holds a lock on the file, -1 for another
        process, None when nobody does."""
        for fd, held in self._live(self.locks):
            if held == ident:
                return fd
        return -1 if ident in self._locked_elsewhere() else None

    def _locked_elsewhere(self) -> set[tuple[int, int]]:
        """Files other processes hold flocks on, as the kernel lists them
        ("1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF")."""
        try:
            with self._orig_io_open("/proc/locks", encoding="ascii") as f:
                lines = f.read().splitlines()
        except OSError:
            return set()
        found = set()
        for line in lines:
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4] != str(os.getpid()):
                major, minor, inode = fields[5].split(":")
                found.add((os.makedev(int(major, 16), int(minor, 16)), int(inode)))
        return found

    def _open_under(self, path) -> str | None:
        """`path` itself, or (a folder) anything under it, that a handle has open."""
        idents = self.open_identities()
        if not idents:
            return None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if _identity(st) in idents:
            return str(path)
        if stat.S_ISDIR(st.st_mode):
            for root, dirs, files in os.walk(path):
                for name in dirs + files:
                    inner = os.path.join(root, name)
                    try:
                        if _identity(os.lstat(inner)) in idents:
                            return inner
                    except OSError:
                        continue
        return None

    # ------------------------------------------------------------------ rule 1, and the tracking

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is None and os.path.isdir(path):
            raise self._refuse("folder-open", "os.open cannot open a folder", path)
        with self._step():
            fd = self._orig["open"](path, flags, mode, dir_fd=dir_fd)
        self.locks.pop(fd, None)  # a reused number: the old descriptor's lock went with it
        self.fds[fd] = _identity(os.fstat(fd))
        return fd

    def _close(self, fd):
        self.fds.pop(fd, None)
        self.locks.pop(fd, None)
        return self._orig["close"](fd)

    def _io_open(self, file, *args, **kwargs):
        if not isinstance(file, int):
            try:
                ident = _identity(os.stat(file))
            except OSError:
                ident = None
            if ident is not None and self._locked_by(ident) is not None:
                raise self._refuse("mandatory-lock", "a file object opened on a file another handle has locked", file)
        with self._step():
            f = self._orig_io_open(file, *args, **kwargs)
        try:
            self.files.append((weakref.ref(f), _identity(os.fstat(f.fileno()))))
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        return f

    # ------------------------------------------------------------------ rule 4: mandatory locks

    def _lock_descriptor(self, fd, *args, **kwargs):
        got = self._orig_lock(fd, *args, **kwargs)
        if got:
            self.locks[fd] = _identity(os.fstat(fd))
        return got

    def _unlock_descriptor(self, fd):
        self.locks.pop(fd, None)
        return self._orig_unlock(fd)

    def _check_access(self, fd: int) -> None:
        try:
            ident = _identity(os.fstat(fd))
        except OSError:
            return
        holder = self._locked_by(ident)
        if holder is not None and holder != fd:
            raise self._refuse("mandatory-lock", f"descriptor {fd} reads or writes a file another handle has locked",
                               f"<fd {fd}>")

    def _read(self, fd, n):
        self._check_access(fd)
        return self._orig["read"](fd, n)

    def _write(self, fd, data):
        self._check_access(fd)
        return self._orig["write"](fd, data)

    def _ftruncate(self, fd, length):
        self._check_access(fd)
        return self._orig["ftruncate"](fd, length)

    def _fsync(self, fd):
        fd = fd if isinstance(fd, int) else fd.fileno()
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:  # rule 5
            raise self._refuse("fsync-read-only", "FlushFileBuffers needs a handle opened for writing", fd)
        return self._orig["fsync"](fd)

    # ------------------------------------------------------------------ rules 2 and 3

    def _check_moveable(self, *paths) -> None:
        for path in paths:
            held = self._open_under(path)
            if held is not None:
                raise self._refuse("open-handle", f"{held} is open, so {path} cannot be renamed or deleted", path)

    def _rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        with self._step():
            if src_dir_fd is None and dst_dir_fd is None:
                self._check_moveable(src, dst)
                if os.path.lexists(dst):
                    raise self._refuse("rename-exists", "os.rename never replaces an existing name", dst, FileExistsError)
            return self._orig["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def _replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        with self._step():
            if src_dir_fd is None and dst_dir_fd is None:
                self._check_moveable(src, dst)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    raise self._refuse("replace-folder", "os.replace cannot replace a folder", dst)
            return self._orig["replace"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def _unlink(self, path, *, dir_fd=None):
        with self._step():
            if dir_fd is None:
                self._check_moveable(path)
            return self._orig["unlink"](path, dir_fd=dir_fd)

    _remove = _unlink

    def _rmdir(self, path, *, dir_fd=None):
        with self._step():
            if dir_fd is None:
                self._check_moveable(path)
            return self._orig["rmdir"](path, dir_fd=dir_fd)

    def _rmtree(self, path, ignore_errors=False, onerror=None, **kwargs):
        """Delete bottom-up through the rules above: an open file stays, and so do the folders
        holding it; the first refusal is raised unless ignore_errors (as Windows' rmtree does)."""
        if os.path.islink(path):
            raise OSError("Cannot call rmtree on a symbolic link")

        def attempt(fn, target):
            try:
                fn(target)
            except OSError:
                if not ignore_errors:
                    raise

        for root, dirs, files in os.walk(path, topdown=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                attempt(os.unlink, os.path.join(root, name))
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    attempt(os.rmdir, os.path.join(root, name))
        attempt(os.rmdir, path)
