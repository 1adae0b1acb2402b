"""Building the trainable adapter on a base model, and describing what it wrapped.

The recipe's lora section says *what* (method, rank, init, a target preset); the method's
registry entry (methods.py) builds its peft config, with presets resolved against the model's
own module names (targets.py). Nothing here imports torch or peft at module level.
"""

from __future__ import annotations

import re

from lora_cli.errors import LoraError
from lora_cli.model.methods import method_of
from lora_cli.model.targets import linear_module_names
from lora_cli.model.adapter_folder import verify_adapter

# Inits that rewrite the base weights (W - B0·A0); peft redoes them whenever the adapter is loaded.
BASE_CHANGING_INITS = {"pissa", "olora"}


# --------------------------------------------------------------------------- peft configs

def peft_config(recipe, model):
    """The peft config for recipe.lora.method on this model (built as its registry entry says)."""
    return method_of(recipe).peft_config(recipe, model)


# --------------------------------------------------------------------------- building

def add_adapter(model, recipe):
    """Wrap the base in a trainable PEFT adapter as the recipe describes."""
    from peft import get_peft_model

    checkpointing = recipe.train.gradient_checkpointing
    if checkpointing:
        # Reentrant checkpointing only back-propagates into segments whose inputs require grad;
        # with a frozen base they do not, and every lora_B would stay zero.
        model.enable_input_require_grads()
    # A quantized base is not passed through peft's prepare_model_for_kbit_training: it upcasts
    # every weight bitsandbytes left alone (norms, embeddings, lm_head) to float32, which turns
    # the whole residual stream, and so every activation saved for backward, into float32 (4-bit
    # then peaked above bf16 LoRA on an H200: 50.0 vs 47.4 GiB). Kept in the compute dtype, they
    # run exactly as a 16-bit LoRA's do; get_peft_model freezes the base, as that helper would.
    if recipe.lora.init_from:
        return keep_one_input_copy(cast_trainable(trained_adapter(model, recipe.lora.init_from),
                                                  recipe.lora.adapter_dtype))
    _check_modules_exist(model, recipe.lora)
    config = peft_config(recipe, model)
    try:
        return keep_one_input_copy(cast_trainable(get_peft_model(model, config), recipe.lora.adapter_dtype))
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target module" in str(e) or "target_modules" in str(e):
            raise LoraError(f"lora.target_modules: {recipe.lora.target_modules!r} matches no module of the model",
                            f"linear layers in this model: {', '.join(linear_module_names(model))}") from None
        raise


def trained_adapter(model, folder: str):
    """lora.init_from: the base with a trained adapter (e.g. an SFT run) loaded trainable, to be
    trained further; its own config (method, rank, targets) is kept."""
    from peft import PeftModel

    verify_adapter(folder)
    return PeftModel.from_pretrained(model, folder, is_trainable=True)


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


def keep_one_input_copy(model):
    """Adapters in float32 on a 16-bit base: peft casts each adapted layer's input to float32
    before lora_A, and under autocast lora_A then casts it back to 16 bits and keeps that copy for
    backward: one copy per adapted layer (q, k and v each keep their own of the same input), about
    a fifth more activation memory for an 8B model. Under autocast the cast is autocast's job
    (it casts the weight, cached once per step, not the input), so peft's is switched off there,
    through its public cast_input_dtype_enabled flag; outside autocast peft still casts, as the
    matmul needs one dtype."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.register_forward_pre_hook(_cast_input_outside_autocast)
    return model


def _cast_input_outside_autocast(module, args) -> None:
    import torch

    x = args[0] if args else None
    if torch.is_tensor(x):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


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
