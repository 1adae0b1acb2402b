"""Prompt templates: the one place that turns a conversation into prompt text and ids.

A conversation (a list of {"role", "content"} messages; alpaca rows become one user turn
carrying an optional "input") is rendered as *segments*: pieces of text each tokenised on
its own, marked supervised or not, and closed by an EOS id where a turn ends. Training
(data.py) and inference (infer.py) both go through `conversation_segments` and
`encode_segments`, and the template's settings are saved with the adapter
(`TemplateSpec.from_data(recipe["data"])`), so the ids a model is asked with at inference are
the ids it was trained on: same text pieces, same token boundaries, BOS at most once.

Tokenising each piece on its own (as the source workflow tokenises prompt and answer apart)
matters: a byte-level BPE joins "Assistant: " with the answer's first word when they are
tokenised together, so a prompt encoded in one go would differ from the one trained on.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from lora_cli.errors import LoraError
from lora_cli.files.inputs import shorten
from lora_cli.data.token_budget import clip_for_tokens

IGNORE_INDEX = -100  # label value the loss skips

TEMPLATE_NAMES = ("human_assistant", "alpaca", "chat_template", "custom")  # the recipe's data.template choices
DEFAULT_SYSTEM_FORMAT = "System: {system}\n\n"  # no built-in template has a system slot of its own
PLACEHOLDERS = {"prompt_format": ({"instruction"}, {"instruction", "input"}),
                "system_format": ({"system"}, {"system"})}  # key -> (required, allowed)


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool = False
    eos: bool = False  # an EOS id follows this piece's tokens (the end of an assistant turn)


@dataclass(frozen=True)
class Template:
    """A text template: how a user turn (with an optional input) and a system turn read.
    Declarative on purpose: the same fields render prompts here and generate the Jinja and
    Ollama templates `lora export` embeds (export.py), so the two cannot drift."""
    name: str
    with_input: str     # uses {instruction} and {input}
    without_input: str  # uses {instruction}
    turn_separator: str = ""  # between a finished turn (ending in EOS) and the next prompt
    system_format: str = DEFAULT_SYSTEM_FORMAT
    trim: bool = False     # strip whitespace around the filled user text (before answer_cue)
    answer_cue: str = ""   # appended after the (trimmed) user text: what opens the answer

    def render(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            text = fill(self.with_input, instruction=instruction, input=input)
        else:
            text = fill(self.without_input, instruction=instruction)
        return (text.strip() if self.trim else text) + self.answer_cue

    def render_system(self, system: str) -> str:
        return fill(self.system_format, system=system)


_ALPACA_INTRO = ("Below is an instruction that describes a task{extra}. "
                 "Write a response that appropriately completes the request.\n\n")

TEMPLATES: dict[str, Template] = {
    # Exactly the source workflow's prompt:
    #   "\n".join(["Human: " + instruction, input]).strip() + "\n\nAssistant: "
    "human_assistant": Template("human_assistant", with_input="Human: {instruction}\n{input}",
                                without_input="Human: {instruction}", trim=True, answer_cue="\n\nAssistant: "),
    "alpaca": Template(
        "alpaca",
        with_input=_ALPACA_INTRO.replace("{extra}", ", paired with an input that provides further context")
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input=_ALPACA_INTRO.replace("{extra}", "") + "### Instruction:\n{instruction}\n\n### Response:\n",
        turn_separator="\n\n",
    ),
}


def fill(fmt: str, **values: str) -> str:
    """Put values into {name} placeholders. Not str.format: literal braces in a prompt (JSON
    examples) must survive."""
    # One pass, so an instruction that happens to contain "{input}" is not filled in turn.
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), fmt)


def placeholder_problems(key: str, fmt: str) -> list[str]:
    """What is wrong with a custom format string: a required placeholder missing, or an
    unknown one (usually a typo). Used by the recipe checks, before anything loads."""
    required, allowed = PLACEHOLDERS[key]
    found = set(re.findall(r"\{(\w+)\}", fmt))

    problems = [f"data.{key}: {shorten(fmt)} has no {{{name}}} placeholder; add it where the "
                f"{name} text goes" for name in sorted(required - found)]
    problems += [f"data.{key}: unknown placeholder {{{name}}} in {shorten(fmt)}; "
                 f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}" for name in sorted(found - allowed)]
    return problems


# --------------------------------------------------------------------------- which template

@dataclass(frozen=True)
class TemplateSpec:
    """Everything rendering needs, as the recipe's data section states it and the adapter saves it."""
    name: str = "human_assistant"
    prompt_format: str | None = None  # custom: a user turn, with {instruction} and optionally {input}
    system_format: str | None = None  # a system turn, with {system}; empty = "System: {system}\n\n"
    turn_separator: str | None = None  # after an assistant turn's EOS; empty = the template's own
    system_prompt: str | None = None  # system message used when a conversation has none

    @classmethod
    def from_data(cls, data) -> TemplateSpec:
        """From a DataConfig, or the `data` mapping of a saved lora_recipe.yaml (None = defaults)."""
        if data is None:
            return cls()
        get = data.get if isinstance(data, dict) else lambda k, d=None: getattr(data, k, d)
        return cls(name=get("template", "human_assistant") or "human_assistant",
                   prompt_format=get("prompt_format"), system_format=get("system_format"),
                   turn_separator=get("turn_separator"), system_prompt=get("system_prompt"))

    def as_dict(self) -> dict:
        return asdict(self)

    def text_template(self) -> Template:
        """The text template this spec renders with (not for chat_template)."""
        if self.name == "custom":
            if not self.prompt_format:
                raise LoraError("data.template: custom needs data.prompt_format",
                                "e.g. prompt_format: \"<|user|>\\n{instruction}\\n{input}\\n<|assistant|>\\n\"")
            fmt = self.prompt_format
            without = re.sub(r"\s*\{input\}", "", fmt) if "{input}" in fmt else fmt
            base = Template("custom", fmt if "{input}" in fmt else fmt.replace("{instruction}", "{instruction}\n{input}"),
                            without, turn_separator="")
        else:
            base = get_template(self.name)
        return replace(base,
                       turn_separator=self.turn_separator if self.turn_separator is not None else base.turn_separator,
                       system_format=self.system_format or base.system_format)


def resolve_template(template) -> TemplateSpec:
    """A TemplateSpec from a spec, a template name, or a saved recipe's data mapping."""
    if isinstance(template, TemplateSpec):
        return template
    if isinstance(template, str):
        if template not in TEMPLATE_NAMES:
            raise LoraError(f"unknown template {template!r}", f"use one of: {', '.join(TEMPLATE_NAMES)}")
        return TemplateSpec(name=template)
    return TemplateSpec.from_data(template)


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise LoraError(f"unknown template {name!r}", f"use one of: {', '.join(TEMPLATES)}") from None


# --------------------------------------------------------------------------- conversations -> segments

def user_content(message: dict) -> str:
    """A user turn's text for templates without an input slot: instruction, then input."""
    extra = message.get("input") or ""
    return message["content"] + ("\n" + extra if extra.strip() else "")


def with_system(spec: TemplateSpec, messages: list[dict]) -> list[dict]:
    if spec.system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": spec.system_prompt}] + list(messages)
    return list(messages)


TOOLS_HEADER = "Tools (to call one, answer with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>):\n"


def tools_text(tools: list[dict]) -> str:
    """Plain rendering of tool schemas for the built-in templates: one JSON schema a line after
    a header, masked like a system turn."""
    return TOOLS_HEADER + "".join(json.dumps(t["function"], ensure_ascii=False) + "\n" for t in tools) + "\n"


def tool_calls_text(calls: list[dict]) -> str:
    """Plain rendering of an assistant's tool calls (supervised): one <tool_call> block each."""
    return "\n".join("<tool_call>" + json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)
                     + "</tool_call>" for c in calls)


def tool_results_text(results: list[str]) -> str:
    """Plain rendering of tool results (context, masked): read as a user turn holding one
    <tool_response> block per result, so the template's next prompt asks for the answer."""
    return "\n".join(f"<tool_response>{r}</tool_response>" for r in results)


def conversation_segments(template, messages, tokenizer=None, *, tools=None,
                          add_generation_prompt: bool = False, train_on: str = "assistant") -> list[Segment]:
    """The pieces of a conversation (a list of messages, or {"messages", "tools"}). train_on:
    "assistant" supervises every assistant turn, "last" only the final one, "all" every piece;
    a message's own "train" flag overrides it. Tool results are context (masked).
    add_generation_prompt ends with the prompt for the next assistant turn (inference)."""
    if isinstance(messages, dict):
        messages, tools = messages["messages"], tools or messages.get("tools")
    spec = resolve_template(template)
    messages = with_system(spec, messages)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)

    def supervised(i: int, role: str) -> bool:
        if 0 <= i < len(messages) and role != "separator" and messages[i].get("train") is not None:
            return messages[i]["train"]
        if train_on == "all":
            return True
        return role == "assistant" and (train_on == "assistant" or i == last)

    if spec.name == "chat_template":
        return _jinja_segments(tokenizer, messages, tools or [], add_generation_prompt, supervised)
    return _text_segments(_text_template(spec), messages, tools or [], add_generation_prompt, supervised)


def _text_segments(tpl: Template, messages, tools, add_generation_prompt, supervised) -> list[Segment]:
    segments = []
    if tools and not (messages and messages[0]["role"] == "system"):
        segments.append(Segment(tools_text(tools), supervised(-1, "system")))
    i = 0
    while i < len(messages):
        m = messages[i]
        if m["role"] == "system":
            segments.append(Segment(tpl.render_system(m["content"]) + (tools_text(tools) if tools else ""),
                                    supervised(i, "system")))
        elif m["role"] == "user":
            segments.append(Segment(tpl.render(m["content"], m.get("input") or ""), supervised(i, "user")))
        elif m["role"] == "tool":  # consecutive results (parallel calls) share one turn
            j = i
            while j + 1 < len(messages) and messages[j + 1]["role"] == "tool":
                j += 1
            results = [messages[k]["content"] for k in range(i, j + 1)]
            segments.append(Segment(tpl.render(tool_results_text(results)), supervised(i, "tool")))
            i = j
        else:
            text = m["content"]
            if m.get("tool_calls"):
                text += ("\n" if text else "") + tool_calls_text(m["tool_calls"])
            segments.append(Segment(text, supervised(i, "assistant"), eos=True))
            if tpl.turn_separator and (i < len(messages) - 1 or add_generation_prompt):
                segments.append(Segment(tpl.turn_separator, supervised(i, "separator")))
        i += 1
    return segments


@lru_cache(maxsize=32)
def _text_template(spec: TemplateSpec) -> Template:
    return spec.text_template()  # once per spec, not once per row


def _jinja_message(m: dict) -> dict:
    """A message as Hugging Face chat templates take it (tool calls in the OpenAI shape)."""
    out = {"role": m["role"], "content": user_content(m) if m["role"] == "user" else m["content"]}
    if m.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                             for c in m["tool_calls"]]
    return out


def check_tools_support(tokenizer, messages: list[dict], tools: list[dict]) -> None:
    """A chat template that never mentions tools would drop them silently: refuse instead."""
    source = tokenizer.chat_template
    needs = {"tools": bool(tools), "tool_calls": any(m.get("tool_calls") for m in messages),
             "tool": any(m["role"] == "tool" for m in messages)}
    missing = [what for what, used in needs.items() if used and what not in source]
    if missing:
        raise LoraError(f"data.template: chat_template, but the tokenizer's chat template has no support for "
                        f"{', '.join(missing)} (it never mentions them), so tool use would be dropped",
                        "use template: human_assistant, alpaca or custom (tools rendered as plain text, see README), "
                        "or a model whose chat template supports tools")


def _jinja_segments(tokenizer, messages, tools, add_generation_prompt, supervised) -> list[Segment]:
    """Segments from the tokenizer's own chat template, found by rendering growing prefixes:
    the text a prefix adds with the generation prompt is prompt, the rest of the next assistant
    turn (including its end-of-turn marker) is answer."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LoraError("data.template: chat_template, but the tokenizer has no chat template",
                        "use template: human_assistant, alpaca or custom, or a model whose tokenizer has one")
    check_tools_support(tokenizer, messages, tools)
    msgs = [_jinja_message(m) for m in messages]
    extra = {"tools": tools} if tools else {}

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs[:upto], tokenize=False, add_generation_prompt=gen, **extra)

    segments, done = [], ""
    ends = [i for i, m in enumerate(msgs) if m["role"] == "assistant"] + ([len(msgs)] if add_generation_prompt else [])
    for i in ends:
        prompt = render(i, True)
        if not prompt.startswith(done):
            raise _unstable_template()
        role_before = msgs[i - 1]["role"] if i else "system"
        segments.append(Segment(prompt[len(done):], supervised(i - 1, role_before)))
        if i == len(msgs):
            break
        full = render(i + 1, False)
        if not full.startswith(prompt):
            raise _unstable_template()
        answer = full[len(prompt):]
        segments.append(Segment(answer, supervised(i, "assistant"), eos=not _ends_turn(tokenizer, answer)))
        done = full
    return segments


def _ends_turn(tokenizer, text: str) -> bool:
    """Whether the template already closes the turn with a special token (EOS, <|im_end|>, ...)."""
    markers = {t for t in tokenizer.all_special_tokens if t not in (tokenizer.bos_token, tokenizer.pad_token)}
    markers.add(tokenizer.eos_token)
    return any(m and m in text for m in markers)


def _unstable_template() -> LoraError:
    return LoraError("the tokenizer's chat template renders a conversation differently from its own prefix "
                     "(it rewrites earlier turns), so prompt and answer cannot be told apart",
                     "use template: custom with prompt_format matching the model's format")


# --------------------------------------------------------------------------- segments -> ids

def adds_bos(tokenizer) -> bool:
    """Whether this tokenizer puts BOS in front of text by default (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def with_bos(tokenizer, ids: list[int], bos: bool | None = None) -> list[int]:
    """Prefix BOS once, when the tokenizer would; never twice."""
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and (not ids or ids[0] != tokenizer.bos_token_id):
        return [tokenizer.bos_token_id] + ids
    return ids


def tokenize_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens added: one batched call. A fast tokenizer's Rust
    backend is called directly (ids only, in parallel), which is several times quicker than
    the Python wrapper; the first texts are checked against the wrapper, and any difference
    (a tokenizer that rewrites text in Python) falls back to it."""
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))  # system prompts and separators repeat in every row
    ids = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        ids = [e.ids for e in backend.encode_batch_fast(unique, add_special_tokens=False)]
        probe = unique[:4]
        if tokenizer(probe, add_special_tokens=False)["input_ids"] != ids[:len(probe)]:
            ids = None
    if ids is None:
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    if len(unique) == len(texts):
        return ids
    by_text = dict(zip(unique, ids))
    return [by_text[t] for t in texts]


@dataclass(frozen=True)
class SpecialIds:
    """The ids encoding needs, looked up once: a tokenizer's bos_token_id / eos_token_id are
    computed on every access (tens of microseconds each), which per row adds up."""
    bos: int | None  # prefixed to every sequence; None when the tokenizer adds no BOS
    eos: int

    @classmethod
    def of(cls, tokenizer, bos: bool | None = None) -> SpecialIds:
        if bos is None:
            bos = adds_bos(tokenizer)
        return cls(tokenizer.bos_token_id if bos else None, tokenizer.eos_token_id)


def encode_segments(tokenizer, segments: list[Segment], token_lists=None, bos: bool | None = None,
                    special: SpecialIds | None = None):
    """(input_ids, labels) of segments: labels copy the ids of supervised pieces and are
    IGNORE_INDEX elsewhere (not shifted: the model shifts). token_lists are the pieces' ids
    when the caller tokenised many conversations in one batched call."""
    if token_lists is None:
        token_lists = tokenize_texts(tokenizer, [s.text for s in segments])
    special = special or SpecialIds.of(tokenizer, bos)
    ids: list[int] = []
    labels: list[int] = []
    for seg, toks in zip(segments, token_lists):
        toks = [*toks, special.eos] if seg.eos else toks
        ids += toks
        labels += toks if seg.supervised else [IGNORE_INDEX] * len(toks)
    if special.bos is not None and (not ids or ids[0] != special.bos):  # BOS once, never twice
        return [special.bos] + ids, [IGNORE_INDEX] + labels
    return ids, labels


def segment_token_lists(tokenizer, segments: list[Segment], max_tokens: int | None = None) -> list[list[int]]:
    """Ids of each segment's text. With max_tokens (what the ids are cut to afterwards), a text
    too long to matter whole (a 10 MB field) is first cut to the ends that cut can keep
    (token_budget), so it is never tokenised whole."""
    texts = [s.text for s in segments]
    if max_tokens is not None:
        texts = [clip_for_tokens(t, tokenizer, max_tokens) for t in texts]
    return tokenize_texts(tokenizer, texts)


def prompt_ids(tokenizer, template, messages: list[dict], tools: list[dict] | None = None,
               max_tokens: int | None = None) -> list[int]:
    """Ids of a conversation (ending in a user turn) plus the prompt for the next answer:
    exactly the ids training built in front of that answer, tool schemas included.
    max_tokens: the caller keeps at most that many of them (segment_token_lists)."""
    segments = conversation_segments(template, messages, tokenizer, tools=tools, add_generation_prompt=True)
    ids, _ = encode_segments(tokenizer, segments, segment_token_lists(tokenizer, segments, max_tokens))
    return ids


def history_messages(history, instruction: str, input: str = "", system: str = "") -> list[dict]:
    """Messages for earlier (question, answer) turns and a new instruction (chat / generate)."""
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": instruction, "input": input})
    return messages


# --------------------------------------------------------------------------- as a Jinja chat template

def _jinja_str(text: str) -> str:
    """A Jinja string literal. Newlines stay literal inside the quotes (every Jinja engine reads
    them), so only the backslash and the quote need escaping; and text inside an expression is
    safe from trim_blocks/lstrip_blocks, which HF, llama.cpp and llama-cpp-python all turn on."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _jinja_format(fmt: str, values: dict[str, str]) -> str:
    """A template format string ("Human: {instruction}") as a Jinja expression."""
    parts = []
    for piece in re.split(r"(\{\w+\})", fmt):
        name = piece[1:-1] if re.fullmatch(r"\{\w+\}", piece) else None
        if name in values:
            parts.append(values[name])
        elif piece:
            parts.append(_jinja_str(piece))
    return " ~ ".join(parts) or "''"


def jinja_chat_template(spec, tokenizer=None, *, bos: bool = False) -> str:
    """The training template as a Jinja chat template, generated from the Template's fields:
    rendering `messages` (roles system, user, assistant; a user message may carry an alpaca
    `input`) with add_generation_prompt gives the text of the segments training built, with
    eos_token where training put the EOS id. bos=True starts with bos_token when the tokenizer
    adds BOS (for engines that tokenise the rendered text without special tokens, like vLLM);
    llama.cpp adds BOS itself (the GGUF's add_bos_token). Used by `lora export` and serve_vllm."""
    spec = resolve_template(spec)
    if spec.name == "chat_template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise LoraError("the adapter was trained with template: chat_template, but its tokenizer has none")
        return tokenizer.chat_template
    tpl = spec.text_template()
    content, extra = "message['content']", "message['input']"

    def user_turn(fmt: str) -> str:
        text = _jinja_format(fmt, {"instruction": content, "input": extra})
        text = f"({text}) | trim" if tpl.trim else text
        return "{{ " + text + (" ~ " + _jinja_str(tpl.answer_cue) if tpl.answer_cue else "") + " }}"

    out = ["{{ bos_token }}"] if bos and tokenizer is not None and adds_bos(tokenizer) else []
    if spec.system_prompt:
        out.append("{% if not (messages and messages[0]['role'] == 'system') %}{{ "
                   + _jinja_str(tpl.render_system(spec.system_prompt)) + " }}{% endif %}")
    out.append("{% for message in messages %}")
    out.append("{% if message['role'] == 'system' %}{{ " + _jinja_format(tpl.system_format, {"system": content}) + " }}")
    out.append("{% elif message['role'] == 'user' %}")
    out.append("{% if message['input'] is defined and message['input'] and message['input'] | trim %}"
               + user_turn(tpl.with_input) + "{% else %}" + user_turn(tpl.without_input) + "{% endif %}")
    out.append("{% elif message['role'] == 'assistant' %}{{ message['content'] ~ eos_token }}")
    if tpl.turn_separator:
        out.append("{% if not loop.last or add_generation_prompt %}{{ " + _jinja_str(tpl.turn_separator) + " }}{% endif %}")
    out.append("{% endif %}{% endfor %}")
    return "".join(out)
