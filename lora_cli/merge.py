"""`lora merge` (adapter folded into a full model) and `lora save` (a clean adapter folder).

Both write into a staging folder beside the target and rename it into place at the end, so a
failure leaves nothing half-written and an existing target is never touched without --force."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lora_cli.errors import LoraError
from lora_cli.model import RECIPE_FILE, find_recipe_file, read_adapter

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


@contextmanager
def staged_output(out: Path, force: bool):
    """Yield a staging folder; on success it replaces `out`. On error `out` is untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise LoraError(f"{out} already exists", "choose another --out, or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def merge_adapter(adapter_dir: str | Path, out: str | Path, *, dtype: str | None = None,
                  force: bool = False, base: str | None = None, log=print) -> Path:
    """Fold the adapter into its base and save a full model plain transformers loads.
    The base is always reloaded unquantized: merging into 4-bit weights would round the update away."""
    import torch
    from peft import PeftModel

    from lora_cli.model import inference_model_config, load_base_model, load_tokenizer

    info = read_adapter(adapter_dir)
    model_cfg = inference_model_config(info, base, quantization="none")
    if info.model_section.get("quantization", "none") != "none":
        log(f"adapter was trained on a {info.model_section['quantization']} base; merging into "
            f"{model_cfg.name_or_path} reloaded in full precision")
    save_dtype = getattr(torch, dtype) if dtype else None
    with staged_output(Path(out), force) as staging:
        # Merge in float32 for accuracy; cast to the requested dtype only when saving.
        model = load_base_model(model_cfg, quantize=False, dtype=torch.float32, device="cpu")
        model = PeftModel.from_pretrained(model, str(info.path))
        try:
            merged = model.merge_and_unload(safe_merge=True)
        except ValueError as e:  # peft's safe_merge reports NaN this way
            raise LoraError(f"merging {info.path} would produce non-finite weights ({e})",
                            "the adapter is broken (NaN/Inf); use an earlier checkpoint") from None
        _check_finite(merged)
        if save_dtype is not None:
            merged = merged.to(save_dtype)
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer_src = info.path if (info.path / "tokenizer_config.json").is_file() else model_cfg.name_or_path
        load_tokenizer(str(tokenizer_src)).save_pretrained(staging)
    log(f"merged model written to {out}")
    return Path(out)


def _check_finite(model) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LoraError(f"merged weight {name} has NaN or Inf values; nothing was written",
                            "the adapter is broken; use an earlier checkpoint")


def save_adapter(source: str | Path, out: str | Path, *, force: bool = False, log=print) -> Path:
    """Copy an adapter (a run or a checkpoint-N) into a clean folder: adapter weights and
    config, tokenizer and recipe; no optimizer or scheduler state."""
    info = read_adapter(source)
    src = info.path
    if not (src / "adapter_model.safetensors").is_file():
        raise LoraError(f"{src}: no adapter_model.safetensors", "lora only exports safetensors adapters")
    tokenizer_dir = src if (src / "tokenizer_config.json").is_file() else src.parent
    recipe_file = find_recipe_file(src)
    with staged_output(Path(out), force) as staging:
        for name in ADAPTER_FILES:
            shutil.copy2(src / name, staging / name)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        if recipe_file:
            shutil.copy2(recipe_file, staging / RECIPE_FILE)
    log(f"adapter written to {out}")
    return Path(out)
