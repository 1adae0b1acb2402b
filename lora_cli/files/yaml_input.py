"""YAML a user hands in (recipes, saved recipes), read with bounds: size, nesting and alias
expansion capped before anything is built, a key written twice and a lone UTF-16 surrogate
refused naming the key and its lines. Every check raises a `lora_cli.errors` exception."""

from __future__ import annotations

import yaml

from lora_cli.errors import LoraError
from lora_cli.files.inputs import lone_surrogate_at, printable

MAX_YAML_BYTES = 1 << 20        # a recipe is a few KB; 1 MiB leaves room for long templates
MAX_YAML_NODES = 100_000        # scalars + collections once aliases are expanded (billion laughs)


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
        if lone_surrogate_at(node.value) is not None:
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
