"""Inference backends: the one seam between what asks for text (`lora generate`, `lora chat`,
`lora serve`) and the engine that produces it.

What goes in is already tokenised: prompt ids rendered by the training template
(template.prompt_ids, the one path training and inference share), the adapter to answer with
(None = the base with every adapter switched off) and the generation settings. What comes out
is the generated token ids and their text, streamed piece by piece to `on_text` while they are
produced when a caller asks for it. Setting a request's `cancel` event stops that request at
the next token; the others in its batch carry on.

A backend is registered in BACKENDS under the name `--engine` takes. The transformers + peft
path is the first; another in-process engine implements `generate` and registers itself here.
(vLLM is not in-process: `lora serve --engine vllm` hands the whole server to vLLM, serve.py.)"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from lora_cli.errors import LoraError
from lora_cli.infer.settings import GenerationSettings
from lora_cli.model.load import load_for_inference


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str | None = None                  # None: the base, adapters off
    stop: tuple[str, ...] = ()                  # the answer ends before the first of these
    on_text: Callable[[str], None] | None = None  # receives the answer's text as it grows
    cancel: threading.Event = field(default_factory=threading.Event)

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one generate call: the same variant and the same
        sampling. Lengths, stop strings and max_new_tokens may differ row by row."""
        s = self.settings
        return (self.adapter, s.temperature, s.top_p if s.temperature > 0 else None, s.repetition_penalty, s.seed)


@dataclass
class Completion:
    text: str              # the answer, special tokens dropped, cut before a stop string, stripped
    token_ids: list[int]   # every token generated, the closing EOS included
    prompt_tokens: int
    finish_reason: str     # "stop" (EOS or a stop string), "length" or "cancelled"


class TransformersBackend:
    """The transformers + peft engine: base and adapters loaded once (model.load_for_inference),
    the asked-for adapter switched in place, same-key requests left-padded into one generate call."""

    name = "transformers"
    doc = "this process"  # what --engine's help says of it

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, adapters: dict, *, base: str | None = None, device: str | None = None,
             trust_remote_code: bool = False):
        """(backend, adapter infos by name) for base + adapters, as `lora generate` loads them."""

        model, tokenizer, infos = load_for_inference(adapters, base=base, device=device,
                                                     trust_remote_code=trust_remote_code)
        return cls(model, tokenizer), infos

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + answer) one sequence may hold."""
        config = getattr(self.model, "config", None)
        return int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Every request answered, in order; same-key requests share a batch."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(i)
        results: list[Completion | None] = [None] * len(requests)
        for indices in groups.values():
            batch = [requests[i] for i in indices]
            with using_variant(self.model, batch[0].adapter):
                for i, completion in zip(indices, self.generate_batch(batch)):
                    results[i] = completion
        return results

    def generate_batch(self, requests: list[GenerationRequest]) -> list[Completion]:
        """One generate call with the variant already active. A decoder's prompts are left-padded,
        so every row's new tokens start at the same column and the attention mask hides the
        padding. An encoder-decoder (model.task seq2seq) reads the prompt in its encoder,
        right-padded as in training (BART's positions count from the left); its decoder starts
        fresh, so the watcher sees only new tokens either way."""
        import torch
        from transformers import StoppingCriteriaList

        settings = requests[0].settings
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        ids = [r.prompt_ids for r in requests]
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        if getattr(self.model.config, "is_encoder_decoder", False):
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
        else:
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        watcher = RowWatcher(self.tokenizer, requests)
        kwargs = settings.to_kwargs(self.tokenizer)
        kwargs["max_new_tokens"] = max(r.settings.max_new_tokens for r in requests)
        with torch.inference_mode():
            self.model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([watcher]), **kwargs)
        return watcher.completions()


class _Row:
    """One request's answer as it is generated: tokens, text, why it ended, what was streamed."""

    def __init__(self, request: GenerationRequest, eos_ids: set[int], decode):
        self.request = request
        self.eos_ids = eos_ids
        self.decode = decode
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.streamed = ""
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may be half-made

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if token in self.eos_ids:
            self.finish = "stop"
        elif self.request.stop and self._cut_at_stop():
            self.finish = "stop"
        elif len(self.tokens) >= self.request.settings.max_new_tokens:
            self.finish = "length"
        if self.request.cancel.is_set() and self.finish is None:
            self.finish = "cancelled"
        if self.request.on_text is not None:
            self._stream()

    def text(self) -> str:
        text = self.decode(self.tokens)
        cut = [text.find(s) for s in self.request.stop if s in text]
        return text[:min(cut)] if cut else text

    def _cut_at_stop(self) -> bool:
        text = self.decode(self.tokens)  # once per token, not once per stop string
        return any(s in text for s in self.request.stop)

    def _stream(self) -> None:
        """Send what is certain to be in the final answer: the final text is stripped, so
        leading and trailing whitespace waits; so does a half-decoded character and the tail
        that could still become a stop string."""
        text = self.text().lstrip()
        if self.finish is None:
            text = text.rstrip()
            if text.endswith("\ufffd"):
                text = text.rstrip("\ufffd")
            if self.hold:
                text = text[:max(0, len(text) - self.hold)]
        else:
            text = text.strip()
        if len(text) > len(self.streamed) and text.startswith(self.streamed):
            self.request.on_text(text[len(self.streamed):])
            self.streamed = text

    def completion(self) -> Completion:
        return Completion(self.text().strip(), self.tokens, len(self.request.prompt_ids), self.finish or "length")


class RowWatcher:
    """A stopping criterion (transformers calls it after every new token) that follows each row
    of a batch: streams its text, ends it at its own stop string, max_new_tokens or
    cancellation. Rows it ends are finished by generate (padding from then on); the call
    returns when all are."""

    def __init__(self, tokenizer, requests: list[GenerationRequest]):
        eos = tokenizer.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}

        def decode(tokens: list[int]) -> str:
            return tokenizer.decode(tokens, skip_special_tokens=True)

        self.rows = [_Row(r, eos_ids, decode) for r in requests]

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if row.finish is None:
                row.add(token)
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)

    def completions(self) -> list[Completion]:
        return [row.completion() for row in self.rows]


@contextmanager
def using_variant(model, adapter: str | None):
    """Run with one loaded adapter active, or with none (adapter=None: the base)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        if adapter is not None:
            raise LoraError(f"no adapter {adapter!r} is loaded", "pass it with --adapter NAME=DIR")
        yield
        return
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    if adapter not in model.peft_config:
        raise LoraError(f"no adapter {adapter!r} is loaded", f"loaded: {', '.join(model.peft_config)}")
    model.set_adapter(adapter)
    yield


def active_adapter(model) -> str | None:
    """The adapter a model answers with as it stands (None for a model without adapters)."""
    from peft import PeftModel

    return model.active_adapter if isinstance(model, PeftModel) else None


BACKENDS: dict[str, type] = {"transformers": TransformersBackend}
# what --engine takes, with its help: the in-process backends, and vLLM, which runs its own server (infer/vllm.py)
ENGINE_DOCS = {**{name: cls.doc for name, cls in BACKENDS.items()}, "vllm": "vLLM's own OpenAI server, GPU"}
ENGINES = tuple(ENGINE_DOCS)


def backend_class(engine: str) -> type:
    try:
        return BACKENDS[engine]
    except KeyError:
        raise LoraError(f"--engine {engine!r} is not an inference backend", f"use one of: {', '.join(BACKENDS)}") from None
