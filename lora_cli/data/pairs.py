"""Preference rows: the shapes of `train.objective: dpo | orpo | simpo | kto` data, parsed and checked
(the TRL trainers that train on them: train/preference.py).

Rows come in the shapes people have, detected from each file's first rows like the SFT shapes
(data/formats.detect_format reads PAIR_SHAPES / UNPAIRED_SHAPES here):

- pairs:          {"prompt": "...", "chosen": "...", "rejected": "..."} (prompt may be a message list)
- alpaca_pairs:   {"instruction": "...", "input": "", "chosen": "...", "rejected": "..."}
- chat_pairs:     {"messages": [history ending in a user turn], "chosen": ..., "rejected": ...}
- sharegpt_pairs: LLaMA-Factory's {"conversations": [{"from": "human", ...}], "chosen": {"from": "gpt", ...}, "rejected": {...}}
- implicit_pairs: {"chosen": [whole conversation], "rejected": [whole conversation]}: the shared history is the prompt
- unpaired (kto): {"prompt": "...", "completion": "...", "label": true | false}

A chosen / rejected side is a string, an assistant message ({"role", "content"} or {"from", "value"})
or a list of messages ending in the answer. Every row becomes (prompt messages, answer[s]) and is
rendered through template.py (conversation_segments + encode_segments: the path SFT and inference
take), so the adapter's saved template is the one the pairs were trained with. The ids go to
TRL already tokenised; the prompt is masked (TRL's completion mask covers the answer and its EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.data.formats import Shape, chat_message, detect_format
from lora_cli.data.sources import read_source
from lora_cli.errors import DataError
from lora_cli.train.objectives import PAIRS, UNPAIRED


# --------------------------------------------------------------------------- rows

@dataclass
class Pair:
    messages: list[dict]  # the prompt: history ending in a user turn
    chosen: str
    rejected: str
    where: str


@dataclass
class Labelled:
    messages: list[dict]
    completion: str
    label: bool
    where: str


def _name(columns: dict, ours: str) -> str:
    return columns.get(ours, ours)


def _text(row: dict, ours: str, columns: dict, where: str, *, required: bool = True) -> str | None:
    name = _name(columns, ours)
    value = row.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__ if value is not None else 'nothing'}",
                        f"give {name!r} as a string (or map your field with data.columns: {{{ours}: yours}})")
    return value


def _messages(turns, where: str, name: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages",
                        'e.g. [{"role": "user", "content": "..."}]')
    return [{k: v for k, v in chat_message(t, f"{where}, field {name!r}, turn {j}").items() if k != "train"}
            for j, t in enumerate(turns, 1)]


def _answer(value, where: str, name: str) -> tuple[list[dict], str]:
    """(messages before the answer, answer text) of one side: a string, an assistant message,
    or a list of messages ending in the answer."""
    if isinstance(value, str):
        return [], value
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be the answer (text, an assistant message, or a message list), "
                        f"got {type(value).__name__}", '"chosen": "..." or "chosen": {"role": "assistant", "content": "..."}')
    messages = _messages(value, where, name)
    last = messages[-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        raise DataError(f"{where}: field {name!r} must end in an assistant answer (text), not a {last['role']} turn",
                        "end each side with the assistant's answer")
    return messages[:-1], last["content"]


def _check_sides(where: str, columns: dict, chosen: str, rejected: str) -> None:
    for ours, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: field {_name(columns, ours)!r} is empty; a preference needs both answers",
                            "fill in the answer, or remove the row")
    if chosen == rejected:
        raise DataError(f"{where}: fields {_name(columns, 'chosen')!r} and {_name(columns, 'rejected')!r} are identical, "
                        "so there is no preference to learn", "fix the rejected answer, or remove the row")


def _prompt_messages(row: dict, where: str, columns: dict) -> list[dict]:
    """The prompt side of a row: instruction/input, prompt (text or messages), or messages / conversations."""
    system = _text(row, "system", columns, where, required=False)
    head = [{"role": "system", "content": system}] if system else []
    if row.get(_name(columns, "instruction")) is not None:
        instruction = _text(row, "instruction", columns, where)
        extra = _text(row, "input", columns, where, required=False) or ""
        return head + [{"role": "user", "content": instruction, "input": extra}]
    prompt = row.get(_name(columns, "prompt"))
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {_name(columns, 'prompt')!r} is empty", "give the question the answers reply to")
        return head + [{"role": "user", "content": prompt}]
    if prompt is not None:
        return head + _messages(prompt, where, _name(columns, "prompt"))
    for ours in ("messages", "conversations"):
        if row.get(_name(columns, ours)) is not None:
            return head + _messages(row[_name(columns, ours)], where, _name(columns, ours))
    return head


def _check_prompt(messages: list[dict], where: str) -> list[dict]:
    if not messages or messages[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end in a user turn (got "
                        f"{messages[-1]['role'] if messages else 'no prompt'})",
                        "give the question in prompt / instruction / messages, or as the shared start of chosen and rejected")
    return messages


def parse_pair(row, where: str, columns: dict) -> Pair:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with chosen and rejected, got {type(row).__name__}",
                        '{"prompt": "...", "chosen": "...", "rejected": "..."}')
    prompt = _prompt_messages(row, where, columns)
    sides = []
    for ours in ("chosen", "rejected"):
        if row.get(_name(columns, ours)) is None:
            raise DataError(f"{where}: missing field {_name(columns, ours)!r}; row has: {', '.join(map(str, row))}",
                            "pairs need chosen and rejected (map your names with data.columns: {chosen: yours})")
        sides.append(_answer(row[_name(columns, ours)], where, _name(columns, ours)))
    (chosen_head, chosen), (rejected_head, rejected) = sides
    if chosen_head or rejected_head:  # whole conversations: the shared history is (the rest of) the prompt
        if chosen_head != rejected_head:
            raise DataError(f"{where}: chosen and rejected hold different histories before their answers",
                            "both sides must share every turn before the final answer")
        prompt = prompt + chosen_head
    _check_sides(where, columns, chosen, rejected)
    return Pair(_check_prompt(prompt, where), chosen, rejected, where)


def parse_labelled(row, where: str, columns: dict) -> Labelled:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt, completion and label, got {type(row).__name__}",
                        '{"prompt": "...", "completion": "...", "label": true}')
    label = row.get(_name(columns, "label"))
    if label is None:
        raise DataError(f"{where}: missing field {_name(columns, 'label')!r}; kto needs every answer marked good or bad",
                        'add "label": true (a good answer) or false (a bad one)')
    if not isinstance(label, bool):
        raise DataError(f"{where}: field {_name(columns, 'label')!r} must be true or false, got {label!r}",
                        'write "label": true or "label": false')
    head, completion = _answer(row.get(_name(columns, "completion")), where, _name(columns, "completion"))
    if not completion.strip():
        raise DataError(f"{where}: field {_name(columns, 'completion')!r} is empty", "fill in the answer, or remove the row")
    prompt = _prompt_messages(row, where, columns) + head
    return Labelled(_check_prompt(prompt, where), completion, label, where)


class PreferenceShape(Shape):
    """A row shape that also must lack some fields (implicit pairs are whatever has no prompt side)."""

    def __init__(self, *args, without: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "without", without)

    def matches(self, row: dict, columns: dict) -> bool:
        return super().matches(row, columns) and not any(row.get(columns.get(f, f)) is not None for f in self.without)


_PROMPT_SIDES = ("prompt", "instruction", "messages", "conversations")
PAIR_SHAPES: dict[str, Shape] = {s.name: s for s in (
    PreferenceShape("pairs", parse_pair, "pairs", (("prompt", "chosen", "rejected"),), "'prompt', 'chosen', 'rejected'",
                    '{"prompt": "...", "chosen": "...", "rejected": "..."}', without=("instruction", "messages", "conversations")),
    PreferenceShape("alpaca_pairs", parse_pair, "pairs", (("instruction", "chosen", "rejected"),),
                    "'instruction' ('input' optional), 'chosen', 'rejected'",
                    '{"instruction": "...", "input": "", "chosen": "...", "rejected": "..."}', without=("prompt",)),
    PreferenceShape("chat_pairs", parse_pair, "pairs", (("messages", "chosen", "rejected"),),
                    "'messages' (the history), 'chosen', 'rejected'",
                    '{"messages": [{"role": "user", "content": "..."}], "chosen": "...", "rejected": "..."}',
                    without=("prompt", "instruction")),
    PreferenceShape("sharegpt_pairs", parse_pair, "pairs", (("conversations", "chosen", "rejected"),),
                    "'conversations' (from/value), 'chosen', 'rejected' (LLaMA-Factory)",
                    '{"conversations": [{"from": "human", "value": "..."}], "chosen": {"from": "gpt", "value": "..."}, '
                    '"rejected": {"from": "gpt", "value": "..."}}', without=("prompt", "instruction")),
    PreferenceShape("implicit_pairs", parse_pair, "pairs", (("chosen", "rejected"),),
                    "'chosen' and 'rejected' as whole conversations sharing their history",
                    '{"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}',
                    without=_PROMPT_SIDES),
)}
UNPAIRED_SHAPES: dict[str, Shape] = {s.name: s for s in (
    PreferenceShape("unpaired", parse_labelled, "unpaired", (("completion", "label"),),
                    "'prompt' (or instruction / messages), 'completion', 'label' (true / false)",
                    '{"prompt": "...", "completion": "...", "label": true}'),
)}
SHAPES_FOR = {PAIRS: PAIR_SHAPES, UNPAIRED: UNPAIRED_SHAPES}


def read_preference_rows(path: str, split: str, columns: dict, rows_kind: str) -> tuple[list, str]:
    """(parsed rows, the shape detected) of one source."""
    source = read_source(path, split)
    shapes = SHAPES_FOR[rows_kind]
    shape = detect_format(source, columns, shapes)
    return [shapes[shape].parse(row, where, columns) for where, row in source.stream()], shape
