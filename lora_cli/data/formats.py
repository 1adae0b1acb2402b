"""Checking rows: what each row shape (data.format: alpaca, chat, text) holds, detected from a
source's first rows when left out, parsed into checked conversations (alpaca / chat) or
documents (text). Every problem names the file and row (and turn), and how to fix it. Reading
the sources themselves is sources.py's.

A conversation is a list of messages {"role": system|user|assistant|tool, "content": str}, plus
optional "tool_calls" ([{"name", "arguments"}], assistant only), "train" (a per-message loss
flag that overrides data.train_on) and "input" (an alpaca row's input, on its user turn). A
conversation whose row declares tools is {"messages": [...], "tools": [...]} instead, the tools
in the OpenAI shape ({"type": "function", "function": {name, description, parameters}}).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from typing import Callable

from lora_cli.data.sources import Source
from lora_cli.errors import DataError

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
         "gpt": "assistant", "bot": "assistant", "model": "assistant",
         "tool": "tool", "function": "tool", "observation": "tool",  # OpenAI / ShareGPT tool results
         "function_call": "assistant"}  # ShareGPT: a turn whose value is the assistant's tool call
LOSS_FLAGS = ("weight", "loss_weight", "train")  # per-message "supervise this turn or not"
DETECT_ROWS = 20  # rows looked at to detect a file's format


# --------------------------------------------------------------------------- checking fields

def _field(row: dict, ours: str, columns: dict, where: str, fmt: str, *, required: bool):
    """The string in `row` that plays our field `ours` (renamed by data.columns), or None."""
    theirs = columns.get(ours, ours)
    value = row.get(theirs)
    if value is None:
        if required:
            mapped = f" (data.columns maps {ours!r} to {theirs!r})" if theirs != ours else ""
            raise DataError(f"{where}: missing field {theirs!r}{mapped}; row has: {', '.join(map(str, row)) or 'nothing'}",
                            f"{fmt} rows need {_needs(fmt)}; if your file names it differently, map it: "
                            f"data.columns: {{{ours}: your_name}}")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {theirs!r} must be a string, got {type(value).__name__} ({str(value)[:40]!r})",
                        "quote the value in the data file")
    return value


def _needs(fmt: str) -> str:
    return SHAPES[fmt].needs


def _check_object(row, where: str, fmt: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {_needs(fmt)}, got {type(row).__name__}",
                        "each row must be one JSON object, e.g. " + SHAPES[fmt].example)


# --------------------------------------------------------------------------- alpaca

def alpaca_conversation(row, where: str, columns: dict, answered: bool = True) -> list[dict]:
    """answered=False (`lora eval`'s questions): the output may be missing; it is then left out."""
    _check_object(row, where, "alpaca")
    instruction = _field(row, "instruction", columns, where, "alpaca", required=True)
    input = _field(row, "input", columns, where, "alpaca", required=False) or ""
    output = _field(row, "output", columns, where, "alpaca", required=answered)
    system = _field(row, "system", columns, where, "alpaca", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": instruction, "input": input}] + (
        [{"role": "assistant", "content": output}] if output is not None else [])


# --------------------------------------------------------------------------- chat (with tools)

def chat_conversation(row, where: str, columns: dict, answered: bool = True):
    """OpenAI `messages` (role/content, tool_calls, tool results) or ShareGPT `conversations`
    (from/value, function_call and observation turns), with an optional `tools` list.
    answered=False (`lora eval`'s questions): a conversation without an assistant turn is kept."""
    _check_object(row, where, "chat")
    name = next((columns.get(k, k) for k in ("messages", "conversations") if row.get(columns.get(k, k)) is not None), None)
    if name is None:
        raise DataError(f"{where}: missing field 'messages' (or 'conversations'); row has: {', '.join(map(str, row)) or 'nothing'}",
                        f"chat rows need {_needs('chat')}; map another name with data.columns: {{messages: your_name}}")
    turns = row[name]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of turns, got {type(turns).__name__}"
                        + (" (empty)" if isinstance(turns, list) else ""),
                        "give the turns in order, e.g. " + SHAPES["chat"].example)
    messages = []
    system = _field(row, "system", columns, where, "chat", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for j, turn in enumerate(turns, 1):
        message = chat_message(turn, f"{where}, turn {j}")
        if message["role"] == "system" and messages:
            raise DataError(f"{where}, turn {j}: a system turn must come first", "move it to the start of the conversation")
        messages.append(message)
    tools = parse_tools(row.get(columns.get("tools", "tools")), f"{where}, field 'tools'")
    if not answered and not any(m["role"] == "assistant" for m in messages):
        return {"messages": messages, "tools": tools}  # a question only: eval refuses it where it needs an answer
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn, so there is nothing to learn",
                        "add the assistant's answer (role 'assistant', or from 'gpt'), or remove the row")
    while messages[-1]["role"] != "assistant":  # trailing questions have no answer to learn
        messages.pop()
    return {"messages": messages, "tools": tools} if tools else messages


def chat_message(turn, here: str) -> dict:
    """One checked message from an OpenAI or ShareGPT turn."""
    if not isinstance(turn, dict):
        raise DataError(f"{here}: expected an object with role/content (or from/value), got {type(turn).__name__}",
                        'write the turn as {"role": "user", "content": "..."} or {"from": "human", "value": "..."}')
    raw_role = turn.get("role", turn.get("from"))
    if not isinstance(raw_role, str) or raw_role not in ROLES:  # a list or an object is no role (and unhashable)
        raise DataError(f"{here}: unknown role {raw_role!r}", f"use one of: {', '.join(ROLES)}")
    role = ROLES[raw_role]
    raw = turn.get("content", turn.get("value"))
    if raw_role == "function_call":  # ShareGPT: the value is the call, as JSON
        message = {"role": "assistant", "content": "", "tool_calls": _sharegpt_calls(raw, here)}
    else:
        calls = _openai_calls(turn, here)
        if calls and role != "assistant":
            raise DataError(f"{here}: a {raw_role!r} turn carries tool calls", "only assistant turns call tools")
        content = content_text(raw, here, optional=bool(calls))
        message = {"role": role, "content": content, **({"tool_calls": calls} if calls else {})}
    flag = loss_flag(turn, here)
    if flag is not None:
        message["train"] = flag
    return message


def content_text(content, here: str, *, optional: bool = False) -> str:
    """A message's text: a string, or a list of text parts ([{"type": "text", "text": ...}])
    joined in order. Other parts (images, audio) are refused until they are supported."""
    if content is None and optional:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise DataError(f"{here}, content part {k}: type {kind!r} is not text; only text parts are read "
                                "(images and other media are not supported yet)",
                                "remove the non-text parts from this message, or remove the row")
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{here}: content must be a string or a list of text parts, got {type(content).__name__}",
                    'write "content": "..." or "content": [{"type": "text", "text": "..."}]')


def loss_flag(turn: dict, here: str) -> bool | None:
    """The turn's own "supervise me or not" (weight / loss_weight: 0 or 1; train: true or
    false); None when it has none. Two flags that disagree are refused."""
    found = {}
    for key in LOSS_FLAGS:
        value = turn.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
            found[key] = bool(value)
        else:
            raise DataError(f"{here}: {key} must be 0 or 1 (or true / false), got {value!r}",
                            "per-message loss is all or nothing: 1 supervises the turn, 0 masks it")
    if len(set(found.values())) > 1:
        raise DataError(f"{here}: loss flags disagree ({', '.join(f'{k}={v}' for k, v in found.items())})",
                        "keep one of weight / loss_weight / train per message")
    return next(iter(found.values()), None)


def _openai_calls(turn: dict, here: str) -> list[dict]:
    """OpenAI `tool_calls` ([{"type": "function", "function": {name, arguments}}]) or the older
    `function_call` ({name, arguments}) of a message, as [{"name", "arguments": dict}]."""
    calls = turn.get("tool_calls")
    if calls is None and isinstance(turn.get("function_call"), dict):
        calls = [turn["function_call"]]
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise DataError(f"{here}: tool_calls must be a list, got {type(calls).__name__}",
                        '"tool_calls": [{"type": "function", "function": {"name": ..., "arguments": ...}}]')
    return [tool_call(c.get("function", c) if isinstance(c, dict) else c, f"{here}, tool call {k}")
            for k, c in enumerate(calls, 1)]


def _sharegpt_calls(value, here: str) -> list[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{here}: function_call value is not valid JSON ({e.msg})",
                            'write the call as JSON: {"name": "get_weather", "arguments": {"city": "Paris"}}') from None
    calls = value if isinstance(value, list) else [value]
    return [tool_call(c, f"{here}, tool call {k}") for k, c in enumerate(calls, 1)]


def tool_call(call, here: str) -> dict:
    """{"name": str, "arguments": dict}; arguments given as a JSON string are decoded."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise DataError(f"{here}: a tool call needs a 'name' (got {str(call)[:60]!r})",
                        '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{here}: arguments of {call['name']!r} are not valid JSON ({e.msg})",
                            "arguments must be a JSON object (or a string holding one)") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{here}: arguments of {call['name']!r} must be a JSON object, got {type(arguments).__name__}",
                        'e.g. "arguments": {"city": "Paris"}')
    return {"name": call["name"], "arguments": arguments}


def parse_tools(value, where: str) -> list[dict]:
    """Tool schemas (a list, or a JSON string of one, as ShareGPT dumps keep them) in the
    OpenAI shape {"type": "function", "function": {...}}; [] when there are none."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})", "tools must be a JSON list of function schemas") from None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list):
        raise DataError(f"{where}: expected a list of function schemas, got {type(value).__name__}",
                        '[{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}]')
    tools = []
    for k, tool in enumerate(value, 1):
        schema = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise DataError(f"{where}, tool {k}: a function schema needs a 'name'",
                            '{"name": "get_weather", "description": "...", "parameters": {"type": "object", ...}}')
        tools.append({"type": "function", "function": schema})
    return tools


def split_conversation(item) -> tuple[list[dict], list[dict]]:
    """(messages, tools) of a parsed conversation (a list, or {"messages", "tools"})."""
    if isinstance(item, dict):
        return item["messages"], item.get("tools") or []
    return item, []


# --------------------------------------------------------------------------- text

def text_document(row, where: str, columns: dict) -> str:
    _check_object(row, where, "text")
    return _field(row, "text", columns, where, "text", required=True)


# --------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    """A row shape: how it is parsed, whether it is a conversation or a document, and the
    fields that identify it when data.format is left out (any one group present)."""
    name: str
    parse: Callable
    kind: str  # "conversation" | "document"
    signatures: tuple[tuple[str, ...], ...]
    needs: str
    example: str  # one row, for hints
    fields: tuple = ()  # the field names data.columns may map onto this shape
    doc: str = ""  # what its rows hold, for data.format's doc (the README reference and `lora schema`)

    def matches(self, row: dict, columns: dict) -> bool:
        return any(all(row.get(columns.get(f, f)) is not None for f in group) for group in self.signatures)


SHAPES: dict[str, Shape] = {s.name: s for s in (
    Shape("alpaca", alpaca_conversation, "conversation", (("instruction", "output"),),
          "'instruction' and 'output' ('input' and 'system' optional)",
          '{"instruction": "...", "input": "", "output": "..."}', ("instruction", "input", "output", "system"),
          doc="instruction/input/output"),
    Shape("chat", chat_conversation, "conversation", (("messages",), ("conversations",)),
          "'messages' (role/content) or 'conversations' (from/value)",
          '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
          ("messages", "conversations", "system", "tools"),
          doc="messages (role/content, tool_calls, tools) or ShareGPT conversations (from/value, function_call, observation)"),
    Shape("text", text_document, "document", (("text",),), "'text'", '{"text": "..."}', ("text",),
          doc="raw documents, chunked to max_length"),
)}
PARSERS = {name: shape.parse for name, shape in SHAPES.items()}
FORMATS = ("auto", *SHAPES)  # the recipe's data.format choices: a shape, or detected


def detect_format(source: Source, columns: dict, shapes: dict[str, Shape] | None = None) -> str:
    """The shape of a source's first rows when data.format is left out. A row that fits two
    shapes, fits none, or differs from the rows before it is refused, naming the row.
    `shapes`: another family of shapes (preference rows, lora_cli.train.preference); default SHAPES."""
    if source.shape and shapes is None:
        return source.shape
    family = shapes or SHAPES
    found: str | None = None
    first_where = None
    for where, row in islice(source.stream(), DETECT_ROWS):
        fits = [s.name for s in family.values() if isinstance(row, dict) and s.matches(row, columns)]
        if len(fits) > 1:
            raise DataError(f"{where}: the format is ambiguous, the row fits {' and '.join(fits)} "
                            f"(fields: {', '.join(map(str, row))})",
                            f"set data.format to one of {', '.join(fits)}, or remove the extra fields")
        if not fits and found is not None:
            continue  # shape already known: parsing names the missing field of this row
        if not fits:
            have = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: cannot tell the format; the row has: {have or 'nothing'}",
                            "rows need " + "; or ".join(f"{s.needs} ({s.name})" for s in family.values())
                            + "; map your names with data.columns" + (", or set data.format" if shapes is None else ""))
        if found is None:
            found, first_where = fits[0], where
        elif fits[0] != found:
            raise DataError(f"{where}: this row is {fits[0]} but {first_where} is {found}; one file holds one format",
                            "split the file by format (data.path takes a list), or set data.format and fix the odd rows")
    return found


def parse_stream(source: Source, fmt: str, columns: dict):
    """Every row of `source` as a conversation (alpaca, chat) or a document (text), streamed."""
    parse = SHAPES[fmt].parse
    columns = {} if source.shape else columns  # documents from .txt / .md have no columns to map
    for where, row in source.stream():
        yield parse(row, where, columns)


def parse_rows(source: Source, fmt: str, columns: dict) -> list:
    return list(parse_stream(source, fmt, columns))
