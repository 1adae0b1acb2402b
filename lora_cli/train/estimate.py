"""`lora estimate`: parameters, adapter size and training memory from the model's config alone.

The base is built on the meta device (shapes and dtypes, no storage), then wrapped by the
same `add_adapter` training uses, so presets, regexes and modules_to_save are matched by peft
itself and the counts equal what `lora train` prints. Memory is arithmetic over that model:

- base weights at their storage precision; 4-bit is NF4 with double quantization as in the
  QLoRA paper: 4 bits per weight, one 8-bit absmax per 64-weight block, one fp32 absmax per
  256 blocks (4.127 bits per weight). Layers bitsandbytes leaves alone (lm_head, tied
  weights) and everything that is not a linear layer stay in the model's dtype (lora does not
  upcast them: see adapters.add_adapter).
- LoRA weights (fp32: peft upcasts adapters of 16-bit bases; or lora.adapter_dtype), their
  gradients in the same dtype, and the state train.optimizer keeps for them, counted tensor by
  tensor as each optimizer allocates it (see optimizer_state_bytes).
- activations of one forward pass of batch_size x data.max_length tokens (the batch shape of
  lora_cli.data.batching): what autograd keeps for backward, op by op, as lora_cli.train.activations
  counts it for the code that runs (dtypes, shared or copied adapter inputs, Liger, the mask),
  plus the loss at its peak. With gradient checkpointing only each layer's input is kept,
  and one layer is recomputed at a time.
An estimate, not a measurement: the CUDA context, kernel workspaces and allocator
fragmentation are not counted, which is why a GPU "fits" only with 10% to spare.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

from lora_cli.model.adapters import BASE_CHANGING_INITS, add_adapter
from lora_cli.errors import LoraError
from lora_cli.model.methods import RANKED, method_of
from lora_cli.train.objectives import objective_of
from lora_cli.data.batching import batch_layout, batch_shape, FLATTENED, PADDED, STEP_ROWS
from lora_cli.recipe.schema import Recipe
from lora_cli.libraries import quiet_libraries
from lora_cli import tasks
from lora_cli.tasks.hooks import prepare_recipe
from lora_cli.train.activations import adapted_layer, pass_bytes, Saving, Shapes
from lora_cli.model.kernels import choose_attention, choose_liger, choose_rows, DeviceFacts, PADDING_FREE
from lora_cli.model.load import gpu_facts
from lora_cli.ui.terminal import table_box

GPU_SIZES_GB = (16, 24, 40, 48, 80)
GPU_USABLE = 0.9  # share of a card left after CUDA context, workspaces and fragmentation

NF4_BLOCK = 64          # weights per first-level absmax (stored as 8-bit by double quantization)
NF4_DOUBLE_BLOCK = 256  # first-level absmax values per fp32 second-level constant
NF4_BITS_PER_PARAM = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DOUBLE_BLOCK)

GiB = 1024 ** 3


# --------------------------------------------------------------------------- results

@dataclass
class TargetGroup:
    """The adapted modules sharing one short name, e.g. every layer's q_proj."""
    name: str
    count: int
    shapes: set = field(default_factory=set)  # (in_features, out_features)
    lora_params: int = 0


@dataclass
class ParameterEstimate:
    trainable: int
    total: int
    lora_params: int      # A and B matrices
    full_params: int      # trained in full: modules_to_save copies, biases, DoRA magnitudes
    rank: int
    per_rank: int         # LoRA parameters added by each unit of rank
    adapter_bytes: int    # adapter_model.safetensors as peft will write it
    groups: list[TargetGroup]

    def trainable_at(self, rank: int) -> int:
        return self.full_params + self.per_rank * rank


@dataclass
class MemoryEstimate:
    rows: list[tuple[str, int, str]]  # (component, bytes, how it was counted), shared by both totals
    activations: int                  # without gradient checkpointing
    activations_checkpointed: int
    checkpointing: bool               # what the recipe uses

    @property
    def fixed(self) -> int:
        return sum(b for _, b, _ in self.rows)

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    @property
    def total_checkpointed(self) -> int:
        return self.fixed + self.activations_checkpointed


def fits(total_bytes: int) -> list[int]:
    """The common GPU sizes (GB) that hold total_bytes with 10% to spare."""
    return [gb for gb in GPU_SIZES_GB if total_bytes <= gb * GiB * GPU_USABLE]


# --------------------------------------------------------------------------- the meta model

def storage_dtype(recipe: Recipe):
    """Weights' dtype on a training GPU: 'auto' is bfloat16 there (what estimate assumes)."""
    import torch

    return torch.bfloat16 if recipe.model.dtype == "auto" else getattr(torch, recipe.model.dtype)


def load_model_config(recipe: Recipe):
    quiet_libraries()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoraError(f"cannot read the config of model.name_or_path {recipe.model.name_or_path!r}: {first}",
                        "give a local model folder with config.json, or a hub id (needs network access)") from None


def build_meta_model(recipe: Recipe):
    """(peft model on the meta device, its config, ids of the weights bitsandbytes would quantize)."""
    import torch

    config = load_model_config(recipe)
    prepare_recipe(recipe)  # a classifier's label count sizes its head
    tasks.check_model_can(recipe.model)
    for name, value in tasks.load_kwargs(recipe.model).items():
        setattr(config, name, value)
    with torch.device("meta"):  # (accelerate's init_empty_weights does not tie embeddings)
        base = tasks.get_task(recipe.model.task).model_class().from_config(
            config, dtype=storage_dtype(recipe), trust_remote_code=recipe.model.trust_remote_code)
    quantized = quantized_weights(base) if recipe.model.quantization != "none" else {}
    lora = recipe.lora
    if lora.init in BASE_CHANGING_INITS:
        # Those start from an SVD / QR of the base weights, which meta tensors do not have;
        # the shapes, and so every count, are the same as with a random start.
        lora = dataclasses.replace(lora, init="gaussian")
    if lora.prompt_init_text:
        # Text initialisation copies embeddings of real tokens, which meta tensors do not have;
        # the virtual-token table has the same shape either way.
        lora = dataclasses.replace(lora, prompt_init_text=None)
    counting = dataclasses.replace(recipe, lora=lora,
                                   model=dataclasses.replace(recipe.model, quantization="none"))
    with torch.device("meta"):
        model = add_adapter(base, counting)
    return model, config, quantized


def quantized_weights(base) -> dict[int, tuple[str, int]]:
    """id(weight) -> (module name, out_features) for the linear layers bitsandbytes quantizes:
    all but the output embedding and tied weights (transformers' get_keys_to_not_convert)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(base))
    found = {}
    for name, module in base.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and not any(name == s or name.endswith("." + s) for s in skip):
            out = module.out_features if isinstance(module, torch.nn.Linear) else module.nf
            found[id(module.weight)] = (name, out)
    return found


# --------------------------------------------------------------------------- parameters

def estimate_parameters(model, recipe: Recipe) -> ParameterEstimate:
    from peft.tuners.lora import LoraLayer

    trainable, total = model.get_nb_trainable_parameters()
    lora_params = method_of(recipe).rank_parameters(model)
    rank = recipe.lora.r
    groups: dict[str, TargetGroup] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not module.r:
            continue
        short = name.rsplit(".", 1)[-1]
        group = groups.setdefault(short, TargetGroup(short, 0))
        group.count += 1
        group.shapes.add((module.in_features, module.out_features))
        group.lora_params += sum(p.numel() for n, p in module.named_parameters() if ".lora_" in f".{n}"
                                 and "magnitude" not in n)
    return ParameterEstimate(
        trainable=trainable, total=total, lora_params=lora_params, full_params=trainable - lora_params,
        rank=rank, per_rank=lora_params // rank, adapter_bytes=adapter_file_bytes(model),
        groups=sorted(groups.values(), key=lambda g: g.name))


# safetensors lays tensors out by dtype (widest first), then name; the header is compact JSON
# padded with spaces to 8 bytes, after an 8-byte length.
_SAFETENSORS_DTYPES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
                       "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]


def _safetensors_dtype(dtype) -> str:
    import torch

    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int8: "I8", torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}[dtype]


def adapter_file_bytes(model) -> int:
    """Size of the adapter_model.safetensors peft writes for this model: the state dict it
    saves (adapter name stripped), laid out as safetensors does."""
    from peft.utils import get_peft_model_state_dict

    if model.active_peft_config.is_prompt_learning:
        # peft copies the prompt table to the CPU to save it, which meta tensors cannot do;
        # without a projection the saved table is the embedding itself (same shape, same dtype).
        state = {"prompt_embeddings": model.prompt_encoder[model.active_adapter].embedding.weight}
    else:
        state = get_peft_model_state_dict(model)
    entries = sorted(((_safetensors_dtype(t.dtype), name, list(t.shape), t.numel() * t.element_size())
                      for name, t in state.items()),
                     key=lambda e: (-_SAFETENSORS_DTYPES.index(e[0]), e[1]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for dtype, name, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_len = len(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    return 8 + header_len + (-header_len) % 8 + offset


# --------------------------------------------------------------------------- memory

def _architecture(config) -> dict:
    """The shapes the activation estimate needs, under transformers' standard attribute names
    (configs map their own, e.g. GPT-2's n_embd, onto these)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
             or getattr(cfg, "ffn_hidden_size", None) or getattr(cfg, "d_ff", None)  # T5
             or getattr(cfg, "encoder_ffn_dim", None) or 4 * h)  # BART
    layers = cfg.num_hidden_layers
    if getattr(cfg, "is_encoder_decoder", False):  # T5 / BART: the decoder's layers hold activations too
        layers += getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None) or layers
    return {"h": h, "layers": layers, "heads": heads, "q": heads * head_dim,
            "kv": kv_heads * head_dim, "inter": inter, "vocab": cfg.vocab_size}


def _is_gated_mlp(model) -> bool:
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    return bool(names & {"gate_proj", "gate_up_proj", "w1", "w3", "gate"})


def estimate_memory(recipe: Recipe, model, config, quantized: dict, saving=None) -> MemoryEstimate:
    rows = [weights_row(recipe, model, quantized)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if p.requires_grad and ".lora_" in n)
    full_bytes = sum(p.numel() * p.element_size() for p in trainable) - lora_bytes
    train_bytes = lora_bytes + full_bytes
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    rows.append(("LoRA weights", lora_bytes, "A and B, " + "/".join(
        sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}))))
    if full_bytes:
        rows.append(("trained in full", full_bytes, "modules_to_save copies, trainable biases"))
    rows.append(("gradients", train_bytes, "one per trainable weight, " + "/".join(dtypes)))
    rows.append(optimizer_row(recipe.train.optimizer, trainable))
    full, ckpt = activations(recipe, model, config, saving)
    objective = objective_of(recipe)
    if objective.sequences_per_row > 1:  # chosen and rejected (kto: the answer and a mismatched one) per row
        full, ckpt = full * objective.sequences_per_row, ckpt * objective.sequences_per_row
    if objective.reference:
        rows.append(reference_row(recipe, config, objective.sequences_per_row))
    return MemoryEstimate(rows, full, ckpt, recipe.train.gradient_checkpointing)


def _activation_bytes(recipe: Recipe) -> int:
    """16-bit under bf16/fp16 autocast or a 16-bit base; 4 only for an fp32 base trained in fp32."""
    fp32 = recipe.model.dtype == "float32" and recipe.train.precision == "fp32"
    return 4 if fp32 else 2


def reference_row(recipe: Recipe, config, sequences: int) -> tuple[str, int, str]:
    """The reference pass of dpo / kto: the same weights with the adapter disabled, under no_grad,
    so no second model and no stored activations; its logits are the transient peak."""
    tokens = batch_shape(recipe.train, recipe.data.max_length).batch_size * recipe.data.max_length * sequences
    logits = tokens * _architecture(config)["vocab"] * (_activation_bytes(recipe) + 4)
    return ("reference pass", logits, f"no second model (adapter disabled, no grad); logits of {sequences} sequences per row")


# bitsandbytes' 8-bit optimizers: one uint8 per moment and weight, one fp32 absmax per block of
# 256 weights and a 256-entry fp32 quantization map per moment and tensor. Tensors under 4096
# weights (min_8bit_size) keep fp32 moments instead.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096

# train.optimizer -> (moments kept per weight, how they are stored, what the table says)
OPTIMIZER_STATE = {
    "adamw_torch": (2, "param", "AdamW: two moments per trainable weight, in its dtype"),
    "adamw_torch_fused": (2, "param", "AdamW (fused): two moments per trainable weight, in its dtype"),
    "adamw_8bit": (2, "8bit", "8-bit AdamW: two uint8 moments + fp32 absmax per 256 weights"),
    "paged_adamw_8bit": (2, "8bit", "paged 8-bit AdamW: two uint8 moments + absmax (paged: spills to CPU RAM on spikes)"),
    "paged_adamw_32bit": (2, "fp32", "paged AdamW: two fp32 moments (paged: spills to CPU RAM on spikes)"),
    "lion_8bit": (1, "8bit", "8-bit Lion: one uint8 moment + fp32 absmax per 256 weights"),
    "paged_lion_8bit": (1, "8bit", "paged 8-bit Lion: one uint8 moment + absmax (paged)"),
    "adafactor": (1, "factored", "Adafactor: factored second moment (row + column sums), no first moment"),
    "sgd": (0, "param", "SGD without momentum: no state"),
}


def optimizer_state_bytes(optimizer: str, shapes: list[tuple[tuple[int, ...], int]]) -> int:
    """Bytes of state `optimizer` allocates for trainable tensors given as (shape, element size)."""
    moments, storage, _ = OPTIMIZER_STATE[optimizer]
    total = 0
    for shape, element in shapes:
        n = math.prod(shape)
        if storage == "param":
            total += moments * n * element
        elif storage == "fp32":
            total += moments * n * 4
        elif storage == "8bit":
            total += moments * (n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256) if n >= BNB_MIN_8BIT_SIZE else moments * n * 4
        else:  # factored (transformers' Adafactor): row and column statistics of the last two dims
            total += (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) * element if len(shape) >= 2 else n * element
    return total


def optimizer_row(optimizer: str, trainable) -> tuple[str, int, str]:
    shapes = [(tuple(p.shape), p.element_size()) for p in trainable]
    return ("optimizer state", optimizer_state_bytes(optimizer, shapes), f"{optimizer}: {OPTIMIZER_STATE[optimizer][2]}")


def weights_row(recipe: Recipe, model, quantized: dict) -> tuple[str, int, str]:
    frozen = [p for p in model.parameters() if not p.requires_grad]
    total = 0
    for p in frozen:
        if id(p) in quantized:
            total += quantized_bytes(recipe.model.quantization, p.numel(), quantized[id(p)][1])
        else:
            total += p.numel() * p.element_size()
    q = recipe.model.quantization
    how = {"none": f"{str(storage_dtype(recipe)).removeprefix('torch.')}",
           "4bit": f"NF4 + double quant, {NF4_BITS_PER_PARAM:.3f} bits/weight; rest {_dtype_name(recipe)}",
           "8bit": f"int8 + fp32 scale per row; rest {_dtype_name(recipe)}"}[q]
    return ("base weights (frozen)", total, how)


def _dtype_name(recipe: Recipe) -> str:
    return str(storage_dtype(recipe)).removeprefix("torch.")


def quantized_bytes(kind: str, numel: int, out_features: int) -> int:
    if kind == "4bit":
        blocks = math.ceil(numel / NF4_BLOCK)
        return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / NF4_DOUBLE_BLOCK)
    return numel + 4 * out_features  # LLM.int8: int8 weights, one fp32 scale per output row


def activation_shapes(config, model):
    """(Shapes, adapted layers) of lora_cli.train.activations for this config and peft model."""
    from peft.tuners.lora import LoraLayer

    arch = _architecture(config)
    shapes = Shapes(h=arch["h"], q=arch["q"], kv=arch["kv"], inter=arch["inter"], heads=arch["heads"],
                    layers=arch["layers"], vocab=arch["vocab"], gated=_is_gated_mlp(model))
    adapted = [adapted_layer(name, m.in_features, next(iter(m.r.values())))
               for name, m in model.named_modules() if isinstance(m, LoraLayer) and m.r]
    return shapes, adapted


def expected_attention(recipe) -> str:
    """The attention kernel a GPU run of this recipe gets (for the estimate); 'sdpa' for
    transformers' default."""
    if recipe.model.attn_implementation not in (None, "auto"):
        return recipe.model.attn_implementation

    return choose_attention("auto", gpu_facts(recipe.model)) or "sdpa"


def uses_liger(recipe, facts=None) -> bool:
    """Whether the run uses Liger's kernels (for the estimate: on a GPU with this machine's packages)."""
    import importlib.util

    facts = facts or DeviceFacts(cuda=True, liger=importlib.util.find_spec("liger_kernel") is not None)
    return choose_liger(recipe.train.kernels, facts, tasks.get_task(recipe.model.task).token_stream)


def saving_of(recipe: Recipe, layout: str | None = None, attention: str | None = None, liger: bool | None = None):
    """The facts of lora_cli.train.activations.Saving for this recipe as `lora train` runs it on a CUDA
    GPU: dtype auto is bfloat16 and precision auto is bf16 (autocast); lora keeps the weights
    bitsandbytes leaves alone in the model's dtype, and under autocast peft's cast of each
    adapted layer's input is off (adapters.keep_one_input_copy). layout / attention / liger:
    what the run chose (lora_cli.model.kernels), else what it would choose on a GPU."""
    import torch

    storage = storage_dtype(recipe).itemsize
    autocast = recipe.train.precision != "fp32"  # auto is bf16 on a GPU
    compute = 2 if autocast else storage
    quantized = recipe.model.quantization != "none"
    adapter = getattr(torch, recipe.lora.adapter_dtype).itemsize
    attention = attention or expected_attention(recipe)
    layout = layout or batch_layout(recipe, attention, masks_from_positions=True)
    return Saving(
        compute=compute, stream=storage,
        projection=storage if quantized or not autocast else compute,
        # under autocast an input not already in the compute dtype is cast, and each layer keeps
        # its cast; without it peft casts to the adapters' dtype when that differs
        input_copies=("stream" if storage != compute else "") if autocast else ("all" if adapter != storage else ""),
        dropout=recipe.lora.dropout > 0,
        liger=uses_liger(recipe) if liger is None else liger,
        dense_mask=_dense_mask(recipe, layout, attention),
        eager=attention == "eager",
        classification=tasks.get_task(recipe.model.task).head_size(recipe.model))


def with_weight_copies(saving, model):
    """Autocast casts each trainable weight wider than its dtype (fp32 adapters under bf16) once
    per step and keeps the copy until backward."""
    import dataclasses

    wider = sum(p.numel() for p in model.parameters() if p.requires_grad and p.element_size() > saving.compute)
    return dataclasses.replace(saving, weight_copies=wider * saving.compute)


def _dense_mask(recipe: Recipe, layout: str, attention: str) -> str:
    """Which dense mask reaches attention: none for padding-free kernels and single padded rows."""

    if attention in PADDING_FREE:
        return ""
    if layout == FLATTENED:
        return "flattened"
    if layout == PADDED and batch_shape(recipe.train, recipe.data.max_length).batch_size == 1:
        return ""  # one row, no padding: transformers passes no mask, attention is causal
    return "rows"


def activations(recipe: Recipe, model, config, saving=None) -> tuple[int, int]:
    """(bytes without, bytes with gradient checkpointing) for one batch."""

    shapes, adapted = activation_shapes(config, model)
    rows = batch_shape(recipe.train, recipe.data.max_length).batch_size
    saving = saving or with_weight_copies(saving_of(recipe), model)
    counted = pass_bytes(shapes, adapted, saving, rows, recipe.data.max_length)
    return counted.full, counted.checkpointed


def sized_tokens_per_batch(recipe, model, facts) -> int | None:
    """train.tokens_per_batch for a run whose recipe leaves it empty: sized from the card's free
    memory on a CUDA GPU (rows x max_length); None elsewhere (batching's default applies).
    facts: lora_cli.model.kernels.DeviceFacts, free_bytes read after the model was loaded."""

    if recipe.train.tokens_per_batch is not None or not facts.cuda or facts.free_bytes is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shapes, adapted = activation_shapes(base.config, model)
    attention = getattr(base.config, "_attn_implementation", None)
    saving = with_weight_copies(saving_of(recipe, attention=attention, liger=choose_liger(
        recipe.train.kernels, facts, tasks.get_task(recipe.model.task).token_stream)), model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fixed = sum(p.numel() * p.element_size() for p in trainable) + optimizer_state_bytes(
        recipe.train.optimizer, [(tuple(p.shape), p.element_size()) for p in trainable])
    length = recipe.data.max_length
    checkpointing = recipe.train.gradient_checkpointing

    def per_pass(rows: int) -> int:
        counted = pass_bytes(shapes, adapted, saving, rows, length)
        return counted.checkpointed if checkpointing else counted.full

    rows = choose_rows(STEP_ROWS, length, facts.free_bytes, per_pass, fixed)
    return rows * length if rows else None


# --------------------------------------------------------------------------- budget

def parse_count(text: str) -> int:
    """'10M' -> 10_000_000; also k, B and plain numbers."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text or "")
    if not m:
        raise LoraError(f"--budget {text!r} is not a parameter count", "write e.g. 10M, 500k, 1.5B or 2000000")
    scale = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def largest_rank_within(params: ParameterEstimate, budget: int) -> int:
    """The largest r with trainable(r) = full + per_rank * r <= budget."""
    if params.per_rank <= 0:
        raise LoraError("--budget: this adapter has no rank-dependent parameters to size",
                        f"--budget solves for lora.r; use it with {', '.join(RANKED)}")
    rank = (budget - params.full_params) // params.per_rank
    if rank < 1:
        raise LoraError(f"--budget {budget:,d} is below the smallest adapter: r=1 needs "
                        f"{params.trainable_at(1):,d} trainable parameters"
                        + (f" ({params.full_params:,d} of them trained in full: modules_to_save / biases)"
                           if params.full_params else ""),
                        "raise the budget, target fewer modules, or drop modules_to_save")
    return int(rank)


# --------------------------------------------------------------------------- the command

@dataclass
class Estimate:
    model_class: str
    params: ParameterEstimate
    memory: MemoryEstimate
    budget: int | None = None
    budget_rank: int | None = None


def estimate_recipe(recipe: Recipe, budget: int | None = None) -> Estimate:
    model, config, quantized = build_meta_model(recipe)
    params = estimate_parameters(model, recipe)
    memory = estimate_memory(recipe, model, config, quantized)
    result = Estimate(type(model.get_base_model()).__name__, params, memory)
    if budget is not None:
        result.budget, result.budget_rank = budget, largest_rank_within(params, budget)
    return result


def format_bytes(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= 1024 ** 2:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def print_estimate(est: Estimate, recipe: Recipe, console) -> None:
    from rich.table import Table

    p, m = est.params, est.memory
    lora = recipe.lora
    console.print(f"[bold]model[/]    {est.model_class} from {recipe.model.name_or_path} (config only; no weights loaded)")
    if method_of(recipe).learns_virtual_tokens:
        # r, alpha and targets mean nothing to these methods (the recipe may not even set them)
        console.print(f"[bold]adapter[/]  {lora.method}: {lora.num_virtual_tokens} virtual tokens")
    else:
        console.print(f"[bold]adapter[/]  {lora.method}: r={lora.r}, alpha={lora.alpha:g}, targets {lora.target_modules!r}"
                      + (f", modules_to_save {lora.modules_to_save}" if lora.modules_to_save else ""))
    if p.groups:  # prompt-learning methods wrap no module
        targets = Table("target", "modules", "in -> out", f"LoRA params at r={lora.r}", box=None, pad_edge=False)
        for g in p.groups:
            shapes = ", ".join(f"{i} -> {o}" for i, o in sorted(g.shapes))
            targets.add_row(g.name, str(g.count), shapes, f"{g.lora_params:,d}")
        console.print(targets)
    console.print(f"[bold]params[/]   trainable {p.trainable:,d} || all {p.total:,d} || trainable% "
                  f"{100 * p.trainable / p.total:.4f}   (LoRA {p.lora_params:,d} = {p.per_rank:,d} per rank; "
                  f"trained in full {p.full_params:,d})")
    console.print(f"[bold]file[/]     adapter_model.safetensors {format_bytes(p.adapter_bytes)} ({p.adapter_bytes:,d} bytes)")
    table = Table(title=f"training memory on one GPU (batch {batch_shape(recipe.train, recipe.data.max_length).batch_size} "
                        f"x {recipe.data.max_length} tokens)",
                  title_justify="left", box=table_box())
    table.add_column("component")
    table.add_column("size", justify="right")
    table.add_column("counted as")
    for name, nbytes, how in m.rows:
        table.add_row(name, format_bytes(nbytes), how)
    mark = {True: " (recipe)", False: ""}
    sequences = objective_of(recipe).sequences_per_row
    per_row = f", {sequences} sequences per row ({recipe.train.objective})" if sequences > 1 else ""
    table.add_row("activations", format_bytes(m.activations), "no gradient checkpointing" + per_row + mark[not m.checkpointing])
    table.add_row("activations", format_bytes(m.activations_checkpointed), "gradient checkpointing" + per_row + mark[m.checkpointing])
    totals = (("without", m.total, not m.checkpointing), ("with", m.total_checkpointed, m.checkpointing))
    for how, total, is_recipe in totals:
        table.add_row("[bold]total[/]", f"[bold]{format_bytes(total)}[/]", f"{how} checkpointing{mark[is_recipe]}")
    console.print(table)
    for how, total, is_recipe in totals:
        ok = fits(total)
        where = f"fits {', '.join(f'{gb} GB' for gb in ok)}" if ok else f"needs more than {GPU_SIZES_GB[-1]} GB"
        console.print(f"[bold]gpu[/]      {how} gradient checkpointing{mark[is_recipe]}: {format_bytes(total)}, {where}")
    console.print("[dim]fits = under 90% of the card; CUDA context, kernel workspaces and fragmentation are not "
                  "counted. An estimate: measure with a short run before a long one.[/]")
    if est.budget is not None:
        r = est.budget_rank
        ratio = lora.alpha / lora.r
        console.print(f"[bold]budget[/]   {est.budget:,d} trainable parameters: largest rank r={r} "
                      f"({p.trainable_at(r):,d} trainable; r={r + 1} would need {p.trainable_at(r + 1):,d}). "
                      f"Keep alpha/r = {ratio:g}: --set lora.r={r} --set lora.alpha={ratio * r:g}")
