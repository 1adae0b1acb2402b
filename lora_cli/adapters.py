"""Building the trainable adapter: which modules it wraps, which PEFT method, how it starts.

The recipe's lora section says *what* (method, rank, init, a target preset); this module turns
it into a peft config for the model at hand. Presets are resolved here, against the model's own
module names, because the same words mean q_proj/v_proj on Llama, query_key_value on bloom and
c_attn on gpt2. Nothing here imports torch or peft at module level.
"""

from __future__ import annotations

import re

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

# Which lora.init means which peft init_lora_weights.
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa", "olora": "olora"}
# Inits that rewrite the base weights (W - B0·A0); peft redoes them whenever the adapter is loaded.
BASE_CHANGING_INITS = {"pissa", "olora"}


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
    return [name for name, m in model.named_modules() if _is_linear(m) and m is not head]


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


# --------------------------------------------------------------------------- peft configs

def peft_config(recipe, model):
    """The peft config for recipe.lora.method on this model."""
    from peft import TaskType

    lora = recipe.lora
    if lora.method == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit

        text = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": lora.prompt_init_text,
                "tokenizer_name_or_path": recipe.model.name_or_path} if lora.prompt_init_text else {}
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=lora.num_virtual_tokens, **text)
    if lora.method == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=lora.num_virtual_tokens)
    targets = resolve_target_modules(model, lora.target_modules)
    if lora.method == "ia3":
        from peft import IA3Config

        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets,
                         feedforward_modules=ia3_feedforward(model, targets),
                         modules_to_save=lora.modules_to_save or None)
    from peft import LoraConfig

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save or None,
        init_lora_weights=PEFT_INIT[lora.init],
        use_dora=lora.method == "dora",
        use_rslora=lora.method == "rslora",
    )


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


# --------------------------------------------------------------------------- building

def add_adapter(model, recipe):
    """Wrap the base in a trainable PEFT adapter as the recipe describes."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = recipe.train.gradient_checkpointing
    if recipe.model.quantization != "none":
        # Norms and embeddings to float32, base frozen, and (with checkpointing) input
        # embeddings that require grad, so gradients reach the adapters through checkpoints.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
    elif checkpointing:
        # Reentrant checkpointing only back-propagates into segments whose inputs require grad;
        # with a frozen base they do not, and every lora_B would stay zero.
        model.enable_input_require_grads()
    _check_modules_exist(model, recipe.lora)
    config = peft_config(recipe, model)
    try:
        return cast_trainable(get_peft_model(model, config), recipe.lora.adapter_dtype)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target module" in str(e) or "target_modules" in str(e):
            raise LoraError(f"lora.target_modules: {recipe.lora.target_modules!r} matches no module of the model",
                            f"linear layers in this model: {', '.join(linear_module_names(model))}") from None
        raise


def cast_trainable(model, dtype_name: str):
    """lora.adapter_dtype: peft keeps adapter weights in float32 even on a 16-bit base; the
    QLoRA paper trains them in bfloat16, which halves the weights, their gradients and the
    optimizer state. Only trained parameters change; the frozen base keeps its dtype. float32
    leaves peft's own choice untouched."""
    import torch

    if dtype_name == "float32":
        return model
    dtype = getattr(torch, dtype_name)
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model


def _check_modules_exist(model, lora_cfg) -> None:
    """peft ignores modules_to_save names that match nothing; a typo there would silently
    train nothing extra, so refuse it."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    missing = [m for m in lora_cfg.modules_to_save if m not in names]
    if missing:
        top = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())} - {""})
        raise LoraError(f"lora.modules_to_save: {missing} match no module of the model",
                        f"module names in this model include: {', '.join(top[:30])}")


def refuse_base_changing_with_others(infos: dict) -> None:
    """A pissa / olora adapter rewrites the base when peft loads it (W - B0·A0); any other adapter
    loaded beside it would run on those rewritten weights, and peft only warns. So it loads alone.
    `infos`: adapter name -> model.AdapterInfo."""
    if len(infos) < 2:
        return
    changing = [n for n, i in infos.items()
                if str(i.config.get("init_lora_weights")).lower().startswith(tuple(BASE_CHANGING_INITS))]
    if changing:
        raise LoraError(f"adapter {changing[0]!r} was trained with lora.init "
                        f"{infos[changing[0]].config['init_lora_weights']}, which rewrites the base weights "
                        "when it is loaded, so no other adapter can share that base",
                        "load it alone (one --adapter), or train it with lora.init gaussian or kaiming")


# --------------------------------------------------------------------------- what was wrapped

def adapted_module_names(model) -> list[str]:
    """Full names (in the base model) of the modules the adapter wrapped; empty for
    prompt_tuning / prefix_tuning, which add virtual tokens instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [name for name, m in base.named_modules() if isinstance(m, BaseTunerLayer)]


def describe_adapted_modules(model) -> str:
    """One line for the plan naming every wrapped module, layer indices and siblings folded:
    '4 modules: model.layers.{0,1}.self_attn.{q_proj,v_proj}'."""
    names = adapted_module_names(model)
    if not names:
        config = next(iter(getattr(model, "peft_config", {}).values()), None)
        tokens = getattr(config, "num_virtual_tokens", None)
        return f"none; {tokens} virtual tokens are learned instead" if tokens else "none"
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.match(r"^(.*?)\.(\d+)\.(.*)$", name)
        pattern, index = (f"{m.group(1)}.{{}}.{m.group(3)}", int(m.group(2))) if m else (name, None)
        groups.setdefault(pattern, [])
        if index is not None:
            groups[pattern].append(index)
    by_parent: dict[str, list[str]] = {}  # siblings share one line: self_attn.{q_proj,v_proj}
    for pattern, ix in groups.items():
        folded = "" if not ix else str(ix[0]) if len(ix) == 1 else "{" + _fold(ix) + "}"
        parent, _, leaf = (pattern.format(folded) if ix else pattern).rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    parts = [f"{parent}.{leaves[0]}" if len(leaves) == 1 else f"{parent}.{{{','.join(leaves)}}}"
             for parent, leaves in by_parent.items()]
    line = f"{len(names)} modules: {', '.join(p.lstrip('.') for p in parts)}"
    full = trained_in_full(model)
    return f"{line}; trained in full: {', '.join(full)}" if full else line


def trained_in_full(model) -> list[str]:
    """Modules lora.modules_to_save copied and trains whole (e.g. embed_tokens, lm_head)."""
    from peft.utils.other import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [name for name, m in base.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def _fold(indices: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    runs, ix = [], sorted(set(indices))
    start = prev = ix[0]
    for i in ix[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev - start >= 2 else ",".join(str(n) for n in range(start, prev + 1)))
        if i is not None:
            start = prev = i
    return ",".join(runs)
