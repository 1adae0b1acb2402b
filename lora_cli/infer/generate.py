"""`lora generate` and `lora chat`: prompts rendered by the training template (template.py),
base + adapters loaded once by model.load_for_inference, adapters switched in place.

A "variant" is what answers: an adapter by name, or None for the base with every adapter
switched off (peft's disable_adapter), so before/after comparisons use the very same weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lora_cli.files import ownership
from lora_cli.errors import DataError, LoraError
from lora_cli.files.inputs import read_text, refuse_lone_surrogates
from lora_cli.data.formats import parse_tools
from lora_cli.data.template import history_messages, prompt_ids, resolve_template
from lora_cli.data.token_budget import chars_for
from lora_cli.infer.engines import GenerationRequest, TransformersBackend
from lora_cli.infer.settings import GenerationSettings
from lora_cli.ui import progress

BASE = "base"  # the label rows and transcripts give the base with adapters switched off
MAX_PROMPT_FILE_BYTES = 256 << 20  # --file: also what is read of a pipe before it is refused


# --------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    instruction: str
    input: str = ""
    where: str = "the prompt"  # what a refusal calls it: "--file prompts.txt, line 7"


def build_prompt_ids(tokenizer, template, instruction: str, history=(), input: str = "",
                     system: str = "", tools: list[dict] | None = None) -> list[int]:
    """Ids of the prompt for `instruction` after earlier (question, answer) turns, built by the
    same template code and BOS rule as training (tool schemas rendered as training rendered
    them). `template`: a name or a TemplateSpec."""
    return prompt_ids(tokenizer, template, history_messages(history, instruction, input, system), tools)


def read_tools(path: str | Path) -> list[dict]:
    """--tools FILE: a JSON list of function schemas (OpenAI or bare), checked like a data
    row's `tools` field."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise DataError(f"--tools {path}: no such file", "give a .json file holding a list of function schemas")
    text = read_text(path, "--tools", max_bytes=MAX_PROMPT_FILE_BYTES)  # a folder, FIFO or device named as such
    if "\\u" in text:
        try:
            refuse_lone_surrogates(json.loads(text), f"--tools {path}")
        except json.JSONDecodeError:
            pass  # parse_tools names the JSON error
    return parse_tools(text, f"--tools {path}")


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file (rows with
    'instruction' and optional 'input')."""
    path = Path(path)
    # missing, a folder, a device, unreadable, too large, not UTF-8: named; a pipe is read (bounded)
    lines = read_text(path, "--file", max_bytes=MAX_PROMPT_FILE_BYTES, pipes=True).splitlines()
    if path.suffix == ".txt":
        prompts = [Prompt(line.strip(), where=f"--file {path}, line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = [_prompt_from_row(line, path, n) for n, line in enumerate(lines, 1) if line.strip()]
    else:
        raise DataError(f"--file {path}: unsupported file type {path.suffix!r}",
                        "use .jsonl (rows with instruction / input) or .txt (one prompt per line)")
    if not prompts:
        raise DataError(f"--file {path}: no prompts", "the file is empty")
    return prompts


def _prompt_from_row(line: str, path: Path, lineno: int) -> Prompt:
    where = f"{path}, line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})", "each line must be one JSON object") from None
    if "\\u" in line:  # a lone surrogate can only come from an escape
        refuse_lone_surrogates(row, where)
    if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
        raise DataError(f"{where}: expected an object with a string 'instruction'",
                        'e.g. {"instruction": "...", "input": "..."}')
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
    return Prompt(row["instruction"], extra, f"--file {where}")


# --------------------------------------------------------------------------- generation

def generate_batch(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings) -> list[str]:
    """Answers for several prompts in one left-padded generate call, by the model as it stands
    (its active adapter, or the plain model)."""
    requests = [GenerationRequest(ids, settings) for ids in prompt_ids]
    return [c.text for c in TransformersBackend(model, tokenizer).generate_batch(requests)]


def generate_response(model, tokenizer, template, instruction: str, *, input: str = "",
                      history=(), system: str = "", settings: GenerationSettings | None = None,
                      tools: list[dict] | None = None) -> str:
    """The answer of the model as it stands (prompt and special tokens stripped)."""
    ids = build_prompt_ids(tokenizer, template, instruction, history, input, system, tools)
    return generate_batch(model, tokenizer, [ids], settings or GenerationSettings())[0]


def refuse_overlong_text(backend, chars: int, where: str) -> None:
    """A prompt whose characters alone hold more tokens than the model's context (token_budget):
    refused before it is tokenised, as `lora serve` refuses it."""
    limit = backend.context_length
    if chars > chars_for(backend.tokenizer, limit):
        raise LoraError(f"{where}: {chars:,} characters, more than this model's context of {limit:,} tokens can hold",
                        "shorten the prompt")


def tools_chars(tools: list[dict] | None) -> int:
    """Characters the tool schemas add to every prompt (counted as `lora serve` counts them)."""
    return len(json.dumps(tools, ensure_ascii=False)) if tools else 0


def refuse_over_context(backend, prompt_tokens: int, new_tokens: int, where: str) -> None:
    """Prompt + answer must fit the model's context (as `lora serve` requires)."""
    limit = backend.context_length
    if prompt_tokens + new_tokens > limit:
        raise LoraError(f"{where}: {prompt_tokens:,} tokens + {new_tokens:,} to generate (--max-new-tokens) is more "
                        f"than this model's context of {limit:,} tokens",
                        "shorten the prompt" + (" or lower --max-new-tokens" if prompt_tokens < limit else ""))


def generate_rows(backend, prompts: list[Prompt], variants: dict[str, tuple],
                  settings: GenerationSettings, batch_size: int = 8, tools: list[dict] | None = None) -> list[dict]:
    """Every prompt answered by every variant (label -> (adapter name or None, template name or spec)).
    Rows come out prompt by prompt, variants side by side in the order given; each keeps the
    exact prompt text the model saw, special tokens included."""

    tokenizer = backend.tokenizer
    refuse_overlong_text(backend, tools_chars(tools), "--tools")  # rendered into every prompt
    for p in prompts:
        refuse_overlong_text(backend, len(p.instruction) + len(p.input) + tools_chars(tools), p.where)
    ids_of = {}  # every prompt of every variant is checked before anything is generated
    for label, (adapter, template) in variants.items():
        ids_of[label] = [build_prompt_ids(tokenizer, template, p.instruction, input=p.input, tools=tools) for p in prompts]
        for p, ids in zip(prompts, ids_of[label]):
            refuse_over_context(backend, len(ids), settings.max_new_tokens, p.where)
    progress.set_total(len(prompts) * len(variants))
    answers: dict[str, list[str]] = {}
    seen: dict[str, list[str]] = {}
    for label, (adapter, template) in variants.items():
        ids = ids_of[label]
        seen[label] = tokenizer.batch_decode(ids)
        answers[label] = []
        for start in range(0, len(ids), batch_size):
            requests = [GenerationRequest(x, settings, adapter) for x in ids[start:start + batch_size]]
            answers[label] += [c.text for c in backend.generate(requests)]
            progress.advance(len(requests))
    return [{"id": i, "instruction": p.instruction, "input": p.input, "adapter": label,
             "template": resolve_template(variants[label][1]).name, "prompt": seen[label][i],
             "response": answers[label][i], "settings": {**settings.as_dict(), "batch_size": batch_size}}
            for i, p in enumerate(prompts) for label in variants]


# --------------------------------------------------------------------------- chat

CHAT_HELP = """commands:
  /adapter [NAME|off]   list adapters, switch to NAME, or talk to the base (off)
  /system [TEXT|clear]  show, set or clear the system prompt
  /params [KEY=VALUE..] show or set generation settings, e.g. /params temperature=0.7 max_new_tokens=64
  /reset                clear the conversation history
  /save [--force] PATH  write the transcript as JSON (--force replaces a transcript chat wrote)
  /help                 this list
  /exit                 leave (Ctrl-D too); Ctrl-C stops an answer being generated"""


@dataclass
class ChatSession:
    """One conversation with base + adapters; commands change it, questions extend it."""
    backend: object                    # an inference backend (backends.py)
    templates: dict[str, object]       # adapter name -> the template (name or TemplateSpec) it was trained with
    settings: GenerationSettings
    adapter: str | None = None         # active adapter; None = base
    base_template: object = "human_assistant"
    system: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)
    conversation: int = 1              # counts /reset, so the transcript shows where each began
    tools: list[dict] = field(default_factory=list)  # function schemas offered in every prompt (--tools)
    inputs: list = field(default_factory=list)  # (label, path) of what it read: /save never writes over them

    def __post_init__(self):
        refuse_overlong_text(self.backend, tools_chars(self.tools), "--tools")  # rendered into every prompt
        if self.system:
            self.transcript.append({"conversation": self.conversation, "role": "system", "content": self.system})

    @property
    def template(self):
        return self.templates[self.adapter] if self.adapter else self.base_template

    @property
    def template_name(self) -> str:
        return resolve_template(self.template).name

    @property
    def label(self) -> str:
        return self.adapter or BASE

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """The active variant's answer, streamed to `on_text` as it is generated."""
        refuse_overlong_text(self.backend, len(question) + tools_chars(self.tools), "that message")
        ids = build_prompt_ids(self.backend.tokenizer, self.template, question, self.history, system=self.system,
                               tools=self.tools)
        refuse_over_context(self.backend, len(ids), self.settings.max_new_tokens, "the conversation")
        answer = self.backend.generate([GenerationRequest(ids, self.settings, self.adapter, on_text=on_text)])[0].text
        self.history.append((question, answer))
        for role, text in (("user", question), ("assistant", answer)):
            self.transcript.append({"conversation": self.conversation, "role": role, "content": text,
                                    "adapter": self.label, "template": self.template_name})
        return answer

    def command(self, line: str) -> str:
        """Apply one /command; returns what to show the user."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        handlers = {"/adapter": self._adapter, "/system": self._system, "/params": self._params,
                    "/reset": self._reset, "/save": self._save, "/help": lambda _: CHAT_HELP}
        if name not in handlers:
            return f"unknown command {name}; /help lists them"
        try:
            return handlers[name](arg)
        except LoraError as e:
            return f"error: {e}"
        except OSError as e:  # /save into a folder that cannot be written: say so, keep chatting
            return f"error: {e}"

    def _adapter(self, arg: str) -> str:
        if not arg:
            names = ", ".join(f"{n}{' (active)' if n == self.adapter else ''}" for n in self.templates)
            return f"adapters: {names or 'none'}; base{' (active)' if self.adapter is None else ''}"
        if arg in ("off", BASE) and arg not in self.templates:
            self.adapter = None
            return "talking to the base model (adapters off)"
        if arg not in self.templates:
            raise LoraError(f"no adapter {arg!r}", f"loaded: {', '.join(self.templates) or 'none'}; /adapter off for the base")
        self.adapter = arg
        return f"adapter {arg} (template {self.template_name})"

    def _system(self, arg: str) -> str:
        if not arg:
            return f"system prompt: {self.system!r}" if self.system else "no system prompt (/system TEXT sets one)"
        self.system = "" if arg == "clear" else arg
        self.transcript.append({"conversation": self.conversation, "role": "system", "content": self.system})
        return f"system prompt set: {self.system!r}" if self.system else "system prompt cleared"

    def _params(self, arg: str) -> str:
        if arg:
            self.settings = self.settings.updated(arg.split())
        return self.settings.describe()

    def _reset(self, _: str) -> str:
        self.history.clear()
        self.conversation += 1
        return "(history cleared)"

    def _save(self, arg: str) -> str:
        force, name = (True, arg[len("--force"):].strip()) if arg.split(" ")[0] == "--force" else (False, arg)
        if not name:
            raise LoraError("/save needs a file name", "e.g. /save chat.json")
        path = Path(name).expanduser()
        # the one output check every writer runs: never over an input, --force only over chat's own file
        ownership.check_output(path, "chat", force=force, inputs=self.inputs, flag="/save")
        record = {"adapters": {n: resolve_template(t).as_dict() for n, t in self.templates.items()},
                  "system": self.system, "settings": self.settings.as_dict(), "messages": self.transcript}
        ownership.write_output_text(path, json.dumps(record, ensure_ascii=False, indent=2), "chat", flag="/save")
        return f"transcript written to {path}"


def chat_loop(session: ChatSession, read: Callable[[str], str] = input,
              write: Callable[[str], None] = print, emit: Callable[[str], None] | None = None) -> ChatSession:
    """Read a line, run a command or stream the answer; until /exit or end of input.
    `emit` receives the streamed answer text (default: stdout, flushed)."""
    emit = emit or _stdout_emit
    write(f"chatting with {session.label}; /help lists commands")
    while True:
        try:
            line = read(f"[{session.label}] you> ").strip()
        except EOFError:
            write("")
            break
        except KeyboardInterrupt:
            write("\n(Ctrl-C: /exit or Ctrl-D leaves)")
            continue
        except UnicodeDecodeError as e:  # a terminal or pipe in another encoding: say so, keep chatting
            write(f"error: that line is not UTF-8 text (byte {e.object[e.start]:#04x}); "
                  "set your terminal to UTF-8, or pipe UTF-8 text in")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line.startswith("/"):
            write(session.command(line))
            continue
        try:
            session.ask(line, on_text=emit)
            emit("\n")
        except LoraError as e:  # a message too long for the context: say so, keep chatting
            write(f"error: {e}" + ("" if not session.history else " (/reset clears the history)"))
        except KeyboardInterrupt:
            # The half answer is dropped: the next turn is rendered as if it had not been asked.
            write("\n(stopped)")
    return session


def _stdout_emit(text: str) -> None:
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()

