"""The kernels a training run uses, chosen on the machine that runs it: the attention kernel,
Liger's fused kernels, and the token budget of one forward pass.

The choices are pure functions of `DeviceFacts` (what the machine has), so they are tested
on CPU with made-up facts; lora_cli.model.load.device_facts reads the real ones, and
lora_cli.train.estimate sizes the token budget (sized_tokens_per_batch) with choose_rows. Each choice is reported on
the `batches` line of `lora train`.

- attention (model.attn_implementation auto): on a CUDA GPU, flash_attention_2 where the
  flash-attn package is installed (half precision, a model that has it); else PyTorch's flex
  attention through transformers where the installed torch has it and the model supports it:
  flattened rows then get a block-sparse mask built from the restarting positions, never a
  dense (tokens x tokens) one; else transformers' default (sdpa).
- Liger (train.kernels auto): its fused RMSNorm, SwiGLU, RoPE and linear cross-entropy on a
  CUDA GPU where liger-kernel is installed (-10.8 GiB on an 8B model at 4096 tokens, measured).
- token budget (train.tokens_per_batch empty): on a CUDA GPU, the most rows per forward pass
  (a power of two, up to the rows of one optimizer step) whose estimated memory fits the card's
  free memory with 10% to spare, through the estimate's activation model; elsewhere 4096 tokens. Rows per
  optimizer step stay as the recipe says (lora_cli.data.batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

DEFAULT_TOKENS_PER_BATCH = 4096  # off a CUDA GPU, or when the free memory cannot be read
USABLE = 0.9                     # share of the free memory a forward pass may plan to use
PADDING_FREE = ("flash_attention_2", "flash_attention_3", "flex_attention")  # no dense mask for flattened rows


@dataclass(frozen=True)
class DeviceFacts:
    """What the choices depend on; device_facts() reads them, tests write them."""
    cuda: bool = False
    half: bool = False                 # the model computes in bf16 / fp16
    flash_attn: bool = False           # the flash-attn package is installed and usable
    flex_attention: bool = False       # this torch has torch.nn.attention.flex_attention
    model_flash: bool = False          # the model class supports flash attention
    model_flex: bool = False           # the model class supports flex attention
    liger: bool = False                # liger-kernel is installed
    free_bytes: int | None = None      # free memory on the card, after the model is loaded


def choose_attention(requested: str | None, facts: DeviceFacts) -> str | None:
    """The attn_implementation to ask transformers for; None lets it take its default (sdpa)."""
    if requested not in (None, "auto"):
        return requested
    if not facts.cuda:
        return None
    if facts.half and facts.flash_attn and facts.model_flash:
        return "flash_attention_2"
    if facts.flex_attention and facts.model_flex:
        return "flex_attention"
    return None


def choose_liger(requested: str, facts: DeviceFacts, causal_lm: bool = True) -> bool:
    """auto: on CUDA where liger-kernel is installed, for causal LMs (Liger patches decoder
    models; a classifier or seq2seq model would only get its warning)."""
    if requested == "auto":
        return facts.cuda and facts.liger and causal_lm
    return requested == "liger"


def choose_rows(step_rows: int, max_length: int, free_bytes: int | None,
                pass_bytes: Callable[[int], int], fixed_bytes: int = 0) -> int | None:
    """The most rows per forward pass (a power of two dividing step_rows) whose pass_bytes(rows)
    plus fixed_bytes (gradients, optimizer state: not yet allocated) fit USABLE of free_bytes;
    None when free_bytes is unknown. At least one row: a recipe whose single row does not fit
    is lint's and the estimate's to warn about, not a reason to refuse here."""
    if free_bytes is None:
        return None
    rows = 1
    while rows * 2 <= step_rows and step_rows % (rows * 2) == 0 \
            and fixed_bytes + pass_bytes(rows * 2) <= USABLE * free_bytes:
        rows *= 2
    return rows


def free_memory() -> int | None:
    """Free bytes on this process's CUDA device, None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)


@dataclass(frozen=True)
class RunKernels:
    """What a training run chose: Liger or not, and the token budget sized for the card."""
    liger: bool = False
    tokens_per_batch: int | None = None  # None: the recipe's train.tokens_per_batch, else batching's default
    free_bytes: int | None = None

    def describe(self) -> str:
        sized = ""
        if self.tokens_per_batch is not None:
            sized = f", token budget {self.tokens_per_batch} sized from {self.free_bytes / 1024 ** 3:.1f} GiB free"
        return f"kernels {'liger' if self.liger else 'none'}{sized}"
