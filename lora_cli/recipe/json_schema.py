"""The recipe's JSON Schema, generated from the one schema in recipe.py (`lora schema`).

Editors with a YAML language server read it through the `# yaml-language-server: $schema=...`
line at the top of each bundled recipe, so they complete keys and flag wrong ones as you type.
Nothing here is declared twice: keys, types, defaults, bounds and docs all come from recipe.py."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union
from lora_cli.recipe.schema import Recipe, REQUIRED

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "recipe.schema.json"  # what the recipes point at
SCHEMA_LINE = "# yaml-language-server: $schema="


def json_type(tp) -> dict[str, Any]:
    """A Python annotation of the recipe schema as a JSON Schema fragment."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin in (Union, types.UnionType):
        options = [json_type(a) for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp):
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is list:
        return {"type": "array", "items": json_type(typing.get_args(tp)[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": json_type(typing.get_args(tp)[1])}
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[tp]}


def _key_schema(tp, f: dataclasses.Field, default) -> dict[str, Any]:
    out = {"description": f.metadata["doc"], **json_type(tp)}
    if default is not REQUIRED:
        out["default"] = default
    for meta, word in (("min", "minimum"), ("max", "maximum"), ("below", "exclusiveMaximum")):
        if f.metadata.get(meta) is not None:
            out[word] = f.metadata[meta]
    return out


def _section_schema(cls, defaults: dict) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            properties[f.name] = {"description": f.metadata["doc"], **_section_schema(tp, defaults[f.name])}
        else:
            properties[f.name] = _key_schema(tp, f, defaults[f.name])
        if defaults[f.name] is REQUIRED or properties[f.name].get("required"):  # a section holding a required key
            required.append(f.name)
    out = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def recipe_json_schema() -> dict[str, Any]:
    """The whole recipe as a JSON Schema (draft 2020-12)."""

    schema = _section_schema(Recipe, Recipe().to_dict())
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "lora recipe",
            "description": "A lora recipe: model, lora, data, train and output_dir (see `lora recipe-keys`).", **schema}


def schema_text() -> str:
    return json.dumps(recipe_json_schema(), indent=2, ensure_ascii=False) + "\n"
