"""Reading what a user hands in, defensively: YAML with bounded size and aliases, text that must
be UTF-8, adapter names peft can take, and adapter folders checked before anything loads them.

Every check raises a `lora_cli.errors` exception naming the culprit (file, line, key, tensor),
so the CLI exits 2 with a message instead of a traceback. Nothing here imports torch."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import yaml

from lora_cli.errors import DataError, LoraError

MAX_YAML_BYTES = 1 << 20        # a recipe is a few KB; 1 MiB leaves room for long templates
MAX_YAML_NODES = 100_000        # scalars + collections once aliases are expanded (billion laughs)
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


# --------------------------------------------------------------------------- YAML

def _expanded_size(node, sizes: dict) -> int:
    """Nodes in `node` with every alias expanded, memoised per node (so computing it is linear
    in the document, not in its expansion)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a node reached again while being sized: a recursive alias
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        total = 1
    sizes[id(node)] = min(total, MAX_YAML_NODES + 1)
    return sizes[id(node)]


_MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *base` may repeat keys: that is what merging means


def _refuse_duplicates_and_surrogates(node, where: str, source: str, seen: set) -> None:
    """A key written twice in one mapping (YAML keeps the last one silently: a recipe that says
    `train:` twice loses the first section), and a scalar holding a lone UTF-16 surrogate
    (a "\\ud800" escape), refused naming the key and both lines. Each node is walked once, so
    aliases cost nothing more."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        if _SURROGATE.search(node.value):
            raise LoraError(f"{source}: {where or 'a value'} (line {node.start_mark.line + 1}): holds a lone UTF-16 "
                            "surrogate (a \\ud800-\\udfff escape), which is not text",
                            "write the character itself, or in YAML as one escape: \\U0001F600, not the pair \\ud83d\\ude00")
        return
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _refuse_duplicates_and_surrogates(child, f"{where}.{i}" if where else str(i), source, seen)
        return
    first: dict[tuple, object] = {}
    for key, value in node.value:
        name = printable(str(key.value)) if isinstance(key, yaml.ScalarNode) else "a key"
        here = f"{where}.{name}" if where else name
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
            earlier = first.setdefault((key.tag, key.value), key)
            if earlier is not key:
                raise LoraError(f"{source}: {here} is written twice ({_lines(earlier, key)}); YAML would keep only the last",
                                "keep one of them (merge the two into one)")
        _refuse_duplicates_and_surrogates(key, here, source, seen)
        _refuse_duplicates_and_surrogates(value, here, source, seen)


def _lines(a, b) -> str:
    la, lb = a.start_mark.line + 1, b.start_mark.line + 1
    return f"line {la} and line {lb}" if la != lb else f"line {la}, columns {a.start_mark.column + 1} and {b.start_mark.column + 1}"


def safe_yaml(text: str, source: str):
    """yaml.safe_load with bounds: refuses a text over MAX_YAML_BYTES, nesting deeper than
    Python can follow, and documents whose aliases expand past MAX_YAML_NODES. The document is
    composed into nodes first (aliases stay shared references, so this is cheap) and sized
    before anything expands it into Python objects: an alias bomb is refused in milliseconds."""
    if len(text) > MAX_YAML_BYTES:
        raise LoraError(f"{source}: {len(text):,} characters, over the {MAX_YAML_BYTES:,} YAML may have here",
                        "a recipe names files; put data in a data file, not in the YAML")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise LoraError(f"{source}: its aliases (*name) expand to over {MAX_YAML_NODES:,} values",
                            "write the values out, or use fewer nested aliases")
        _refuse_duplicates_and_surrogates(node, "", source, set())
        return loader.construct_document(node)
    except RecursionError:
        raise LoraError(f"{source}: nested too deeply to read", "flatten the YAML structure") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- adapter names

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def check_adapter_name(name: str, where: str = "--adapter") -> str:
    """Names peft can use as a module key: letters, digits, _ and -. peft stores adapters in
    torch ModuleDicts, whose keys may not contain a dot."""
    if not ADAPTER_NAME.fullmatch(name or ""):
        raise LoraError(f"{where}: adapter name {shorten(name)} may use only letters, digits, _ and -",
                        "name it explicitly: --adapter NAME=DIR, e.g. --adapter v1_2=runs/v1.2")
    return name


# --------------------------------------------------------------------------- weight files

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickle_weights(folder: str | Path, what: str) -> None:
    """An adapter folder whose weights are only pickles: refused, because loading a pickle can
    run whatever code it holds, and its shapes cannot be checked without loading it."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise LoraError(f"{what} {folder}: weights only as pickle files ({', '.join(pickles[:3])}), "
                        "which can run arbitrary code when loaded; lora reads safetensors only",
                        "convert them once, in an environment you trust: load with transformers/peft and "
                        "save_pretrained(..., safe_serialization=True)")


def verify_model_folder(path: str, what: str = "model.name_or_path") -> None:
    """A local base model folder, before transformers loads it: it has a config.json, and each
    safetensors file's header is whole (a truncated shard is named instead of failing deep
    inside). Pickle-only (*.bin) bases are left to transformers' torch.load(weights_only=True),
    which loads plain tensors and refuses anything else (load_base_model turns that into exit 2)."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id, or a path transformers reports itself
    if not (folder / "config.json").is_file():
        raise LoraError(f"{what} {folder}: no config.json, so this is not a model folder",
                        "point it at the folder save_pretrained wrote (config.json, *.safetensors, tokenizer)")
    for file in sorted(folder.glob("*.safetensors")):
        safetensors_shapes(file)


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def verify_tokenizer_folder(path: str) -> None:
    """A local folder given as a tokenizer holds a vocabulary file (else transformers fails
    with a message that does not say what is missing)."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise LoraError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)})",
                        "copy the tokenizer next to the model (tokenizer.save_pretrained(folder))")


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, after checking that the header
    parses and the data it describes is all there (a truncated copy fails here)."""
    from safetensors import safe_open

    try:
        size = file.stat().st_size
        with safe_open(str(file), framework="numpy") as f:
            return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    except OSError as e:
        raise LoraError(f"{file}: cannot be read ({e.strerror or e})", "check the file and its permissions") from None
    except Exception as e:  # safetensors raises its own SafetensorError for every damaged header
        raise LoraError(f"{file}: not a complete safetensors file ({size:,} bytes; {_first_line(e)})",
                        "the file is damaged or was cut off while copying; copy or export it again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# --------------------------------------------------------------------------- adapter folders

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_(?:embedding_)?([AB])(?:\.weight)?")  # as peft saves them


def verify_adapter(path: str | Path):
    """The one check every command runs before it reads an adapter folder: its config parses
    (read_adapter), its weights are safetensors (never a pickle), the file is whole, and for
    LoRA-family adapters every A/B pair has the shapes the config's r says, on a module its
    target_modules names. Returns the AdapterInfo."""
    from lora_cli.model import read_adapter

    info = read_adapter(path)
    problems = adapter_config_problems(info.config)
    if problems:
        raise LoraError(f"{info.path / 'adapter_config.json'}: {'; '.join(problems)}",
                        "the file was edited or damaged; export the adapter again with `lora save`")
    refuse_pickle_weights(info.path, "adapter")
    weights = info.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoraError(f"{info.path}: no {ADAPTER_WEIGHTS}",
                        "pass a folder written by `lora train` or `lora save` (safetensors weights)")
    shapes = safetensors_shapes(weights)
    if not shapes:
        raise LoraError(f"{weights}: holds no tensors", "the adapter is empty; export it again")
    if info.peft_type == "LORA":
        problems = lora_shape_problems(info.config, shapes)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LoraError(f"{weights} does not match {info.path / 'adapter_config.json'}: {problems[0]}{more}",
                            "the two files come from different adapters or were edited; export the adapter again")
    return info


LORA_KINDS = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING")  # what `lora train` writes


def _known_peft_type(kind: str) -> bool:
    if kind in LORA_KINDS:
        return True
    from peft import PeftType  # only for adapters another tool wrote: peft imports torch

    return kind in PeftType.__members__


def adapter_config_problems(config: dict) -> list[str]:
    """Values in adapter_config.json that peft would trip over with a traceback."""
    kind = config.get("peft_type", "LORA")
    if not isinstance(kind, str) or not _known_peft_type(kind.upper()):
        return [f"peft_type {shorten(kind)} is not a peft adapter kind"]
    if kind.upper() != "LORA":
        return []
    problems = []
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"r {shorten(r)} is not a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        problems.append(f"lora_alpha {shorten(alpha)} is not a number")
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str)
            or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules {shorten(targets)} is not a module name, a list of them or a regex")
    elif isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(f"target_modules {shorten(targets)} is not a valid regex ({e})")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            problems.append(f"{name} {shorten(config.get(name))} is not a mapping")
    if config.get("megatron_config"):  # peft would import the module megatron_core names: a folder never picks code
        problems.append(f"megatron_config is set (megatron_core {shorten(config.get('megatron_core'))}: a module peft "
                        "would import); lora loads no Megatron adapters")
    return problems


def _rank_of(config: dict, module: str) -> int | None:
    """peft's rank for a module: a rank_pattern key matching the module's name, else r."""
    for pattern, rank in (config.get("rank_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?{pattern}$", module):
                return rank if isinstance(rank, int) and not isinstance(rank, bool) else None
        except re.error:
            return None  # a pattern peft cannot use either; the shapes are not checked against it
    r = config.get("r")
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _targets(config: dict, module: str) -> bool:
    """Whether target_modules names the module (peft's rule: a list matches the name or its
    last dotted parts, a string is a regex over the full name)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def lora_shape_problems(config: dict, shapes: dict[str, list[int]]) -> list[str]:
    """What in a LoRA weights file disagrees with its adapter_config.json."""
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        m = _LORA_KEY.fullmatch(name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = shape
    if not pairs:
        return ["no lora_A / lora_B tensors"]
    problems = []
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            problems.append(f"{module} has lora_{next(iter(sides))} but not its pair")
            continue
        if not _targets(config, module):
            problems.append(f"{module} is not among target_modules {config.get('target_modules')}")
        rank = _rank_of(config, module)
        # A is (r, in) and B (out, r); embeddings and convolutions keep r at the same places
        if rank is not None and (sides["A"][:1] != [rank] or sides["B"][1:2] != [rank]):
            problems.append(f"{module}: lora_A {sides['A']} / lora_B {sides['B']} do not have rank r={rank}")
    return problems


def read_json(path: Path, what: str):
    """A JSON file a user handed in, or a LoraError naming it (not UTF-8, not JSON)."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoraError(f"{what} {path}: not valid JSON ({e.msg}, line {e.lineno})", "fix or replace the file") from None
