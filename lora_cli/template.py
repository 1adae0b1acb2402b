"""Prompt templates: the one place that turns a request into prompt text and ids.

Training (data.py) and inference (infer.py) both call `render_prompt` and
`encode_prompt`, and the template's name is saved with the adapter, so the ids a
model is asked with at inference are the ids it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_cli.errors import LoraError


@dataclass(frozen=True)
class Template:
    name: str
    with_input: str     # uses {instruction} and {input}
    without_input: str  # uses {instruction}
    turn_separator: str = ""  # between a finished turn (ending in EOS) and the next prompt
    # No template here has a system slot, so a system prompt goes once in front of the conversation.
    system_format: str = "System: {system}\n\n"

    def render(self, instruction: str, input: str = "") -> str:
        if input and input.strip():
            return self.with_input.format(instruction=instruction, input=input)
        return self.without_input.format(instruction=instruction)


def _human_assistant() -> Template:
    # Exactly the source workflow's prompt:
    #   "\n".join(["Human: " + instruction, input]).strip() + "\n\nAssistant: "
    class HumanAssistant(Template):
        def render(self, instruction: str, input: str = "") -> str:
            return "\n".join(["Human: " + instruction, input or ""]).strip() + "\n\nAssistant: "

    return HumanAssistant("human_assistant", "", "")


_ALPACA_INTRO = ("Below is an instruction that describes a task{extra}. "
                 "Write a response that appropriately completes the request.\n\n")

TEMPLATES: dict[str, Template] = {
    "human_assistant": _human_assistant(),
    "alpaca": Template(
        "alpaca",
        with_input=_ALPACA_INTRO.format(extra=", paired with an input that provides further context")
        + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        without_input=_ALPACA_INTRO.format(extra="") + "### Instruction:\n{instruction}\n\n### Response:\n",
        turn_separator="\n\n",
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise LoraError(f"unknown template {name!r}", f"use one of: {', '.join(TEMPLATES)}") from None


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    return get_template(template).render(instruction, input)


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


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids exactly as training builds them: the text's tokens, BOS at most once."""
    return with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def render_conversation(template: str, turns: list[tuple[str, str]], eos_token: str, instruction: str,
                        input: str = "", system: str = "") -> str:
    """An optional system prompt, earlier (question, answer) turns each closed by EOS as in
    training, then the new prompt."""
    tpl = get_template(template)
    head = tpl.system_format.format(system=system) if system else ""
    parts = [tpl.render(q) + a + eos_token + tpl.turn_separator for q, a in turns]
    return head + "".join(parts) + tpl.render(instruction, input)
