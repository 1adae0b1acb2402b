"""Generation settings: what every engine takes besides the prompt ids and the adapter
(`lora generate` / `lora chat` flags, chat's /params, a served request's fields), checked once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from lora_cli.errors import LoraError
from lora_cli.recipe.schema import SEED_MAX


SAMPLING_EPS = 1e-5  # a temperature below this decodes greedily (vLLM's rule): logits / 1e-45 overflow to inf
# The repetition penalty divides a seen token's positive logit (multiplies a negative one) before
# the temperature divides them all, in float32: 1e-30 or a subnormal made logits inf and sampling
# fail, 1e39 is inf itself. Within these bounds a logit grows at most 100 / SAMPLING_EPS = 1e7
# times; real use is 0.8-1.5.
REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0
# 1e39 is inf in float32: a logit masked to -inf (EOS under a base's min_new_tokens) became
# -inf / inf = NaN. At 100 a model's logits, tens apart, differ by well under one: sampling is
# all but uniform already. (The server keeps OpenAI's 2.)
TEMPERATURE_MAX = 100.0


def repetition_penalty_problem(value: float) -> str | None:
    """Why `value` cannot be a repetition penalty (outside its bounds), or None."""
    if REPETITION_PENALTY_MIN <= value <= REPETITION_PENALTY_MAX:
        return None
    return f"must be between {REPETITION_PENALTY_MIN:g} and {REPETITION_PENALTY_MAX:g}, got {value}"


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise LoraError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise LoraError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise LoraError(f"temperature must be between 0 and {TEMPERATURE_MAX:g}, got {self.temperature}",
                            "0 is greedy decoding")
        if not 0 < self.top_p <= 1:
            raise LoraError(f"top_p must be in (0, 1], got {self.top_p}")
        if problem := repetition_penalty_problem(self.repetition_penalty):
            raise LoraError(f"repetition_penalty {problem}", "1 leaves logits alone; above 1 discourages repeats")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise LoraError(f"seed must be between 0 and {SEED_MAX}, got {self.seed}")

    def updated(self, assignments: list[str]) -> "GenerationSettings":
        """A copy with 'key=value' assignments applied (chat's /params), checked as a whole."""
        types = {f.name: f.type for f in fields(self)}
        values = asdict(self)
        for text in assignments:
            name, sep, raw = text.partition("=")
            if not sep or name not in types:
                raise LoraError(f"/params: {text!r} is not KEY=VALUE with a known key",
                                f"keys: {', '.join(types)}; e.g. /params temperature=0.7 max_new_tokens=64")
            values[name] = _parse_setting(name, raw, types[name])
        try:
            return GenerationSettings(**values)
        except LoraError as e:
            raise LoraError(f"/params: {e.message}", e.hint) from None

    def to_kwargs(self, tokenizer) -> dict:
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.temperature >= SAMPLING_EPS:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())


def _parse_setting(name: str, raw: str, type_name: str):
    if name == "seed" and raw.lower() in ("none", ""):
        return None
    want = int if type_name.startswith("int") else float
    try:
        return want(raw)
    except ValueError:
        raise LoraError(f"/params: {name}={raw!r} is not a{'n integer' if want is int else ' number'}") from None
