"""Which modules an adapter wraps: target presets resolved against the model's own names.

The same words mean q_proj/v_proj on Llama, query_key_value on bloom and c_attn on gpt2, so the
recipe's presets ('attention-qv', 'attention', 'all-linear') are turned into this model's module
names here, at load time. Nothing here imports torch or peft at module level.
"""

from __future__ import annotations

from lora_cli.errors import LoraError

# Short names of attention projections across the common architectures. A name only counts
# when the module sits inside an attention block (a path part containing "attn"/"attention"),
# so gpt2's mlp.c_proj is not taken for its attn.c_proj.
QUERY = {"q_proj", "query", "q", "wq", "q_lin"}
KEY = {"k_proj", "key", "k", "wk", "k_lin"}
VALUE = {"v_proj", "value", "v", "wv", "v_lin"}
FUSED_QKV = {"query_key_value", "c_attn", "qkv_proj", "Wqkv", "qkv", "W_pack"}  # q, k, v in one matrix
ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out_lin"}

PRESET_PARTS = {
    # The guide's "minimal": query and value. A fused qkv matrix cannot be split, so it is taken whole.
    "attention-qv": QUERY | VALUE | FUSED_QKV,
    # The guide's "standard": every attention projection, output included.
    "attention": QUERY | KEY | VALUE | FUSED_QKV | ATTN_OUT,
}

# --------------------------------------------------------------------------- module names

def _is_linear(module) -> bool:
    """Layers a LoRA/IA3 adapter can wrap: nn.Linear (bitsandbytes' 4/8-bit layers subclass it)
    and transformers' Conv1D (gpt2's linear layers)."""
    import torch

    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def linear_modules(model) -> list[str]:
    """Full names of the linear layers an adapter could wrap, the output head excluded
    (peft's 'all-linear' rule: the head maps to the vocabulary and is left alone)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if _is_linear(m) and m is not head and not _in_classifier_head(name)]


# A classification head (BERT's classifier, a decoder's score, BART's classification_head) is
# new and trained whole by peft's SEQ_CLS task type (its modules_to_save), never LoRA-wrapped.
CLASSIFIER_HEADS = ("classifier", "score", "classification_head")


def _in_classifier_head(full_name: str) -> bool:
    return any(part in CLASSIFIER_HEADS for part in full_name.split("."))


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers a LoRA can target, e.g. ['q_proj', 'v_proj', ...]."""
    return sorted({n.rsplit(".", 1)[-1] for n in linear_modules(model)})


def _in_attention(full_name: str) -> bool:
    return any("attn" in part.lower() or "attention" in part.lower() for part in full_name.split(".")[:-1])


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list entry: the whole name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def shortest_targets(wanted: list[str], all_names: list[str]) -> list[str]:
    """The shortest dotted suffixes that match every wanted module and nothing else,
    e.g. ['q_proj', 'v_proj'] on Llama, ['c_attn', 'attn.c_proj'] on gpt2."""
    wanted_set = set(wanted)
    others = [n for n in all_names if n and n not in wanted_set]
    targets: dict[str, None] = {}  # ordered set: first-seen order reads q, k, v, o
    for name in wanted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(_matches(o, suffix) for o in others):
                targets[suffix] = None
                break
    return list(targets)


def resolve_target_modules(model, target):
    """The recipe's target_modules as peft takes them: presets become this model's module names;
    lists and regexes pass through (peft matches them itself)."""
    if isinstance(target, list):
        return target
    if target == "all-linear":
        wanted = linear_modules(model)
    elif target in PRESET_PARTS:
        parts = PRESET_PARTS[target]
        wanted = [n for n in linear_modules(model) if n.rsplit(".", 1)[-1] in parts and _in_attention(n)]
    else:
        return target  # a regex, matched by peft against full module names
    if not wanted:
        raise LoraError(f"lora.target_modules: preset {target!r} finds no matching layer in this model",
                        f"name the modules yourself; linear layers here: {', '.join(linear_module_names(model))}")
    return shortest_targets(wanted, [n for n, _ in model.named_modules()])


# Feed-forward down projections (IA3 scales their input, every other target's output).
# peft's table per architecture, with the common names as a fallback.
_FEEDFORWARD_FALLBACK = ["down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "mlp.c_proj"]


def ia3_feedforward(model, targets) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF

    ff = FF.get(getattr(model.config, "model_type", None)) or _FEEDFORWARD_FALLBACK
    if isinstance(targets, str):  # regex: peft checks each matched module against these suffixes
        return list(ff)
    names = [n for n, _ in model.named_modules()]
    return [t for t in targets
            if any(_matches(n, t) and any(_matches(n, f) for f in ff) for n in names)]
