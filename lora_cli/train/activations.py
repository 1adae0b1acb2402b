"""What one training forward pass keeps for backward, in bytes: the activation model of
`lora estimate` and of the token budget per forward pass (lora_cli.model.kernels).

Counted op by op in a Llama-style decoder layer, and checked against the bytes
torch.autograd.graph.saved_tensors_hooks sees on CPU (tests/train/test_estimate.py) and against
the peaks measured on an H200 (issue 23). Per token and layer, with c the compute dtype's
bytes (2 under bf16/fp16 autocast), s the residual stream's, p the projections' outputs':

- each RMSNorm: its input upcast to fp32 (4h, kept by pow) and the fp32 rsqrt (4);
  Liger's fused RMSNorm keeps its input (s h) and rstd (4) instead
- attention (SDPA / flash): rotated q and k, v, the output, the fp32 logsumexp per head:
  c (2q + 2kv) + 4 heads; eager attention adds its probabilities, c heads T
- a gated MLP: gate, up and silu(gate) outputs, 3 i p (Liger's SwiGLU: gate and up, 2 i p);
  a plain MLP: its activation's input, i p
- the adapted layers' inputs, kept by lora_A. Layers sharing one input (q, k, v; gate, up)
  share one saved tensor, and o_proj's input is the attention output already kept; but when
  the input is cast on its way in (peft's cast to fp32 adapters, autocast's cast of an fp32
  input), each adapted layer keeps its own copy, c x in_features. Dropout > 0: each keeps
  its dropout output and its mask (1 byte on CUDA, c on CPU).
- lora_A's output, c r per adapted layer
- a dense mask (flattened or packed rows, or padded rows side by side, under sdpa): SDPA's
  memory-efficient kernel converts it to an additive bias of c bytes per (query, key) pair,
  kept per layer
- once per token: the loss (the final norm's fp32 input is balanced by the first layer's input
  norm, which keeps nothing: its input does not require grad yet): cross-entropy keeps the fp32
  log-probabilities (4 V) and backward adds their fp32 gradient and its cast to the logits'
  dtype, so the loss peaks at (8 + c) V; Liger's fused linear cross-entropy never makes
  logits (it keeps the hidden states' gradient, c h)
- a frozen fp32 lm_head under autocast is cast to c bytes on every forward pass and the copy
  is kept for the input gradient (V h c, once); fp32 adapters' weights are cast once per step
  by autocast, and the copies kept (c per trainable weight)

With gradient checkpointing each layer keeps only its input (s h), and one layer at a time is
recomputed. No torch import: pure arithmetic over shapes and the facts of `Saving`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Roles of an adapted layer by what its input is (the short module names of common models).
ATTN_OUT = {"o_proj", "out_proj", "dense", "wo_attn"}
MLP_OUT = {"down_proj", "fc2", "w2", "dense_4h_to_h", "wo"}
MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h", "wi", "wi_0", "wi_1"}


@dataclass(frozen=True)
class Shapes:
    """A decoder's sizes, under transformers' standard names."""
    h: int
    q: int
    kv: int
    inter: int
    heads: int
    layers: int
    vocab: int
    gated: bool = True


@dataclass(frozen=True)
class Adapted:
    """One adapted layer: its role (what its input is), which input it shares, its sizes."""
    role: str          # "attn_in", "attn_out", "mlp_in", "mlp_out"
    shared_key: tuple  # layers with the same key read the same input tensor
    in_features: int
    rank: int


@dataclass(frozen=True)
class Saving:
    """What the code that runs keeps, in the few facts that change the count."""
    compute: int = 2            # bytes of autocast's dtype (or of the weights without autocast)
    stream: int = 2             # bytes of the residual stream and the norms' outputs
    projection: int = 2         # bytes of the projections' outputs (gate, up, q, k, v)
    input_copies: str = ""      # "all": every adapted layer keeps its own cast copy of its input (peft's cast
                                # to fp32 adapters under autocast); "stream": only those reading an input
                                # in another dtype than the compute one (autocast's cast of an fp32 stream)
    dropout: bool = False       # LoRA dropout > 0
    dropout_mask: int = 1       # bytes per element of dropout's mask (bool on CUDA; the input's dtype on CPU)
    liger: bool = False         # Liger's RMSNorm, SwiGLU and fused linear cross-entropy
    dense_mask: str = ""        # a dense (query, key) mask reaches attention: "flattened" (one row of
                                # every token) or "rows" (one per row: packed, or padded rows)
    eager: bool = False         # eager attention: probabilities kept per layer
    lm_head_copy: bool = False  # a frozen fp32 lm_head cast to the compute dtype under autocast
    weight_copies: int = 0      # bytes of autocast's cached casts of the trainable weights (fp32 adapters)
    classification: int = 0     # > 0: a sequence classifier with this many labels (no vocab logits)


def role_of(name: str) -> str:
    """'model.layers.0.self_attn.o_proj' -> 'attn_out'; GPT-2's c_proj is told apart by its parent."""
    parent, _, short = name.rpartition(".")
    if short == "c_proj":
        return "mlp_out" if parent.endswith("mlp") else "attn_out"
    if short in ATTN_OUT or (short == "wo" and "attention" in parent.lower()):
        return "attn_out"
    if short in MLP_OUT:
        return "mlp_out"
    return "mlp_in" if short in MLP_IN else "attn_in"


def adapted_layer(name: str, in_features: int, rank: int) -> Adapted:
    parent = name.rpartition(".")[0]
    role = role_of(name)
    return Adapted(role, (parent, role), in_features, rank)


@dataclass(frozen=True)
class PassBytes:
    """Bytes kept for backward by one forward pass of `tokens` tokens in `rows` rows."""
    layer: int        # one decoder layer, all of its tokens (the part a checkpointed layer recomputes)
    adapters: int     # every adapted layer of the model together
    once: int         # the loss at its peak
    fixed: int        # independent of the tokens (the lm_head copy)
    checkpoint: int   # each layer's input, all layers (what gradient checkpointing keeps)
    layers: int = field(default=1)

    @property
    def full(self) -> int:
        return self.layers * self.layer + self.adapters + self.once + self.fixed

    @property
    def checkpointed(self) -> int:
        return self.checkpoint + self.layer + self.adapters // max(1, self.layers) + self.once + self.fixed


def layer_bytes_per_token(shapes: Shapes, saving: Saving) -> int:
    """Bytes one decoder layer keeps per token, adapters apart."""
    c, s, p = saving.compute, saving.stream, saving.projection
    norms = 2 * ((s * shapes.h if saving.liger else 4 * shapes.h) + 4)
    attention = c * (2 * shapes.q + 2 * shapes.kv) + 4 * shapes.heads
    if saving.liger:
        mlp = 2 * shapes.inter * p
    else:
        mlp = (3 if shapes.gated else 1) * shapes.inter * p
    return norms + attention + mlp


def adapter_bytes_per_token(adapted: list[Adapted], shapes: Shapes, saving: Saving) -> int:
    """Bytes the adapted layers keep per token: their inputs (shared or copied) and A's output."""
    c = saving.compute
    total = sum(c * a.rank for a in adapted)
    if saving.dropout:  # each layer's own dropout output and its mask
        return total + sum((c + saving.dropout_mask) * a.in_features for a in adapted)
    dtype = {"attn_in": saving.stream, "mlp_in": saving.stream, "mlp_out": saving.projection, "attn_out": c}
    shared = {}
    for a in adapted:
        if saving.input_copies == "all" or (saving.input_copies == "stream" and dtype[a.role] != c):
            total += c * a.in_features
        elif a.role != "attn_out":  # the attention's output is kept by attention already
            shared[a.shared_key] = dtype[a.role] * a.in_features
    return total + sum(shared.values())


def pass_bytes(shapes: Shapes, adapted: list[Adapted], saving: Saving, rows: int, row_tokens: int) -> PassBytes:
    """What one forward pass of `rows` rows of `row_tokens` tokens keeps (dense mask: one per row)."""
    tokens = rows * row_tokens
    c = saving.compute
    layer = tokens * layer_bytes_per_token(shapes, saving)
    if saving.eager:
        layer += rows * shapes.heads * row_tokens ** 2 * c
    if saving.dense_mask == "flattened":
        layer += tokens ** 2 * c
    elif saving.dense_mask == "rows":
        layer += rows * row_tokens ** 2 * c
    if saving.classification:
        once = rows * saving.classification * (8 + c)
    elif saving.liger:
        once = tokens * c * shapes.h
    else:
        once = tokens * (8 + c) * shapes.vocab
    fixed = saving.weight_copies + (shapes.vocab * shapes.h * c if saving.lm_head_copy else 0)
    return PassBytes(layer=layer, adapters=tokens * adapter_bytes_per_token(adapted, shapes, saving), once=once,
                     fixed=fixed, checkpoint=shapes.layers * tokens * saving.stream * shapes.h, layers=shapes.layers)


def forward_saved_bytes(shapes: Shapes, adapted: list[Adapted], saving: Saving, tokens: int) -> int:
    """What is kept at the end of the forward pass (the loss's backward transients apart): the
    figure saved_tensors_hooks counts, which the tests compare with."""
    b = pass_bytes(shapes, adapted, saving, 1, tokens)
    loss_peak = 0 if (saving.liger or saving.classification) else tokens * (4 + saving.compute) * shapes.vocab
    return b.full - loss_peak
