"""`lora generate` and `lora chat`: prompts rendered by the training template, base + adapter
loaded by model.load_for_inference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from lora_cli.template import encode_prompt, render_conversation


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def to_kwargs(self, tokenizer) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)


def build_prompt_ids(tokenizer, template: str, instruction: str, history=(), input: str = "") -> list[int]:
    """Ids of the prompt for `instruction` after earlier (question, answer) turns, built by the
    same template and BOS rule as training."""
    if history:
        text = render_conversation(template, list(history), tokenizer.eos_token, instruction)
    else:
        from lora_cli.template import render_prompt

        text = render_prompt(template, instruction, input)
    return encode_prompt(tokenizer, text)


def generate_response(model, tokenizer, template: str, instruction: str, *, input: str = "",
                      history=(), settings: GenerationSettings | None = None, streamer=None) -> str:
    """The model's answer only (prompt and special tokens stripped)."""
    import torch

    settings = settings or GenerationSettings()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    ids = build_prompt_ids(tokenizer, template, instruction, history, input)
    input_ids = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=streamer, **settings.to_kwargs(tokenizer))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


CHAT_HELP = "commands: /reset clears the history, /exit leaves (Ctrl-D too)"


def chat_loop(model, tokenizer, template: str, settings: GenerationSettings,
              read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> list[tuple[str, str]]:
    """Read a line, stream the answer, keep the history; returns the transcript."""
    from transformers import TextStreamer

    history: list[tuple[str, str]] = []
    write(CHAT_HELP)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            write("(history cleared)")
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {CHAT_HELP}")
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            answer = generate_response(model, tokenizer, template, line, history=history,
                                       settings=settings, streamer=streamer)
        except KeyboardInterrupt:
            write("\n(stopped)")
            continue
        history.append((line, answer))
    return history
