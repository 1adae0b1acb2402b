"""Reading what a user hands in, defensively: values quoted short in errors, lone UTF-16
surrogates refused, text that must be UTF-8 (and no FIFO or device where a file belongs), adapter
names peft can take, JSON files. YAML is yaml_input.py's; model folders and weight files are
model_files.py's (the adapter folder's own checks: model/adapter_folder.py).

Every check raises a `lora_cli.errors` exception naming the culprit (file, line, key, tensor),
so the CLI exits 2 with a message instead of a traceback. Nothing here imports torch."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from lora_cli.errors import DataError, LoraError

MAX_QUOTED_CHARS = 120          # longest value an error message quotes whole


# --------------------------------------------------------------------------- quoting values

def shorten(value, limit: int = MAX_QUOTED_CHARS) -> str:
    """repr(value) for an error message, cut to `limit` characters with the full length said,
    so a 50 MB value is never echoed whole."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"a {type(value).__name__} of {len(value):,} items"
    return clip(repr(value), limit, len(value) if isinstance(value, str) else None)


def clip(text: str, limit: int = 2 * MAX_QUOTED_CHARS, length: int | None = None) -> str:
    """text cut to about `limit` characters, saying how long it was (paths, quoted values)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 20]}... ({length or len(text):,} characters)"


def clip_lines(message: str, limit: int = 2000) -> str:
    """Every line of an error message cut to `limit`: the last guard against echoing a huge
    value some message quoted whole."""
    return "\n".join(clip(line, limit) for line in message.splitlines())


# --------------------------------------------------------------------------- lone surrogates

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_at(value, where: str = "") -> str | None:
    """Where in a parsed JSON / YAML value (dotted: messages.0.content) a string holds a lone
    UTF-16 surrogate, or None. Such a string comes from an escape like "\\ud800" (UTF-8 bytes
    cannot encode one); it is not text, and tokenizers and UTF-8 writers fail on it."""
    if isinstance(value, str):
        return (where or "value") if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = printable(key) if isinstance(key, str) else str(key)
        here = f"{where}.{name}" if where else name
        if isinstance(key, str) and _SURROGATE.search(key):
            return here
        found = lone_surrogate_at(item, here)
        if found is not None:
            return found
    return None


def printable(text: str) -> str:
    """`text` with any lone surrogate written as its escape (\\ud800), so it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def refuse_lone_surrogates(value, where: str, label: str = "") -> None:
    """A DataError naming `where` (file and row) and the field, when `value` holds a lone surrogate."""
    field = lone_surrogate_at(value, label)
    if field is not None:
        inside = f" (in {field})" if field != "value" and field else ""
        raise DataError(f"{where}: holds a lone UTF-16 surrogate{inside}, an unpaired \\ud800-\\udfff escape that is not text",
                        "fix or drop the escape (a character outside the BMP is written as a pair, e.g. \\ud83d\\ude00)")


# --------------------------------------------------------------------------- text files

UTF8_HINT = "save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8 in > out, or 'Save as UTF-8' in your editor)"


def decode_utf8(data: bytes, path: str | Path, what: str = "") -> str:
    """`data` (the bytes of `path`) as text, or a DataError naming the file, line and byte
    offset of the first byte that is not UTF-8. A leading byte-order mark is dropped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        label = f"{what} {path}" if what else str(path)
        raise DataError(f"{label}, line {line} (byte {e.start}): not UTF-8 text (byte {data[e.start]:#04x})",
                        UTF8_HINT) from None


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_kind(path: str | Path) -> str | None:
    """What an existing path that is neither a file nor a folder is ("a FIFO (named pipe)",
    "a character device", ...), or None. Never opens it: opening a FIFO waits for a writer."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), None)


def refuse_special(path: str | Path, label: str, hint: str = "give the path of a regular file") -> None:
    kind = special_kind(path)
    if kind is not None:
        raise DataError(f"{label}: is {kind}, not a file", hint)


def read_text(path: str | Path, what: str = "", max_bytes: int | None = None, pipes: bool = False) -> str:
    """A text file a user handed in, decoded as UTF-8, with every failure a DataError:
    missing, a folder, a device or FIFO, unreadable, larger than max_bytes, or not UTF-8 (naming
    line and byte). With `pipes`, a FIFO (`--file <(cmd)`) is read, at most max_bytes of it; one
    no process writes to reads as empty at once instead of waiting."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        is_pipe = stat.S_ISFIFO(path.stat().st_mode)
        if not (pipes and is_pipe) and not path.is_dir():
            refuse_special(path, label)
        if is_pipe and pipes:
            data = _read_pipe(path, label, max_bytes)
        else:
            if max_bytes is not None and path.stat().st_size > max_bytes:
                raise DataError(f"{label}: {path.stat().st_size:,} bytes, over the {max_bytes:,} this file may have",
                                "is this the right file? a recipe names data files, it does not hold data")
            data = path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"{label}: is a folder, not a file", "give the path of a file") from None
    except FileNotFoundError:
        raise DataError(f"{label}: no such file", "check the path") from None
    except OSError as e:
        raise DataError(f"{label}: cannot be read ({e.strerror or e})", "check the path and its permissions") from None
    return decode_utf8(data, path, what)


def _read_pipe(path: Path, label: str, max_bytes: int | None) -> bytes:
    """A FIFO's bytes up to max_bytes. Opened without waiting for a writer; reading then blocks
    only while a writer holds it open, and ends at once when there is none."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise DataError(f"{label}: more than the {max_bytes:,} bytes this file may have", "is this the right file?")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def utf8_lines(path: str | Path, what: str = ""):
    """Yield (line number, line) of a text file read as a stream, line endings kept; a line that
    is not UTF-8 raises a DataError naming the file, the line and the byte offset in the file."""
    path = Path(path)
    offset = 0
    try:
        f = path.open("rb")
    except OSError as e:
        label = f"{what} {path}" if what else str(path)
        raise DataError(f"{label}: cannot be read ({e.strerror or e})", "check the path and its permissions") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                label = f"{what} {path}" if what else str(path)
                raise DataError(f"{label}, line {lineno} (byte {offset + e.start}): not UTF-8 text (byte {raw[e.start]:#04x})",
                                UTF8_HINT) from None
            yield lineno, text
            offset += len(raw)


# --------------------------------------------------------------------------- adapter names

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: str, where: str = "--adapter") -> str:
    """Names peft can use as a module key: letters, digits, _ and -. peft stores adapters in
    torch ModuleDicts, whose keys may not contain a dot."""
    if not ADAPTER_NAME.fullmatch(name or ""):
        raise LoraError(f"{where}: adapter name {shorten(name)} may use only letters, digits, _ and -",
                        "name it explicitly: --adapter NAME=DIR, e.g. --adapter v1_2=runs/v1.2")
    return name


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: Path, what: str):
    """A JSON file a user handed in, or a LoraError naming it (not UTF-8, not JSON)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraError(f"{what} {path}: not valid JSON ({e.msg}, line {e.lineno})", "fix or replace the file") from None
