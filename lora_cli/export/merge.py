"""`lora merge` (adapter folded into a full model) and `lora save` (a clean adapter folder).

Both check --out and write it through lora_cli.files.ownership (check_output, writing_folder): a
staging folder beside the target renamed into place at the end, so a failure leaves nothing
half-written; an existing target is replaced only with --force, and only when the same command
wrote it and it holds nothing else; --out may not be, hold or sit inside the command's inputs."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

from lora_cli.files import ownership
from lora_cli.model.adapter_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, find_recipe_file, RECIPE_FILE, verify_adapter
from lora_cli.ui import progress
from lora_cli.errors import LoraError
from lora_cli.model.methods import for_peft_type
from lora_cli.libraries import quiet_libraries
from lora_cli.model.load import inference_model_config, load_base_model, load_tokenizer
from lora_cli.tasks import bind_tokenizer, get_task

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt")


def check_mergeable(info) -> None:
    """Refuse what cannot be folded into the base: methods that learn virtual tokens instead of
    weight updates. Ours say so in the method registry; peft knows about adapters made elsewhere."""
    method = for_peft_type(info.peft_type)
    if method is not None:
        mergeable = method.merges
    else:
        from peft import PeftConfig

        mergeable = not PeftConfig.from_pretrained(str(info.path)).is_prompt_learning
    if not mergeable:
        raise LoraError(f"{info.path}: a {info.peft_type} adapter learns virtual tokens, not weight updates, "
                        "so it cannot be merged into the base",
                        f"use it as it is (lora generate/chat --adapter {info.path}), or export it with `lora save`")


MERGE_DTYPES = ("float32", "bfloat16", "float16")


def check_merge_options(dtype: str | None, max_shard_size: str | int) -> str | int:
    """Refuse a bad --dtype or --max-shard-size before anything loads; the size as
    save_pretrained takes it (bytes, or text without spaces)."""
    if dtype not in (None, *MERGE_DTYPES):
        raise LoraError(f"--dtype {dtype!r} is not one of {', '.join(MERGE_DTYPES)}")
    if isinstance(max_shard_size, int):
        return max_shard_size
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?i?B", max_shard_size, re.IGNORECASE):
        raise LoraError(f"--max-shard-size {max_shard_size!r} is not a size", "e.g. 5GB, 500MB or 100KB")
    return max_shard_size.replace(" ", "")


def merge_adapter(adapter_dir: str | Path, out: str | Path, *, dtype: str | None = None,
                  force: bool = False, base: str | None = None, max_shard_size: str | int = "5GB",
                  log=print, trust_remote_code: bool = False) -> Path:
    """Fold the adapter into its base and save a full model plain transformers loads.
    The base is always reloaded unquantized: merging into 4-bit weights would round the update away."""

    max_shard_size = check_merge_options(dtype, max_shard_size)
    quiet_libraries()  # before torch/peft imports: bitsandbytes logs a CPU-kernel notice on import
    import torch

    info = verify_adapter(adapter_dir)
    check_mergeable(info)
    model_cfg = inference_model_config(info, base, quantization="none", trust_remote_code=trust_remote_code)
    save_dtype = getattr(torch, dtype) if dtype else None
    tokenizer_src = info.path if (info.path / "tokenizer_config.json").is_file() else model_cfg.name_or_path
    ownership.check_output(Path(out), "merge", force=force, folder=True,
                           inputs=[("adapter", info.path), ("base model", model_cfg.name_or_path),
                                   ("tokenizer", tokenizer_src)])
    tokenizer = load_tokenizer(str(tokenizer_src), trust_remote_code)
    progress.add_total(1)  # writing, after the merge's own stages
    with ownership.writing_folder(Path(out), "merge", force) as staging:
        merged = _merge_into_full_precision(info, model_cfg, tokenizer, log)
        with progress.step(f"writing safetensors shards of at most {max_shard_size}"):
            if save_dtype is not None:
                merged = merged.to(save_dtype)
                merged.config.dtype = save_dtype
            _check_finite(merged)  # after the cast: float16 overflows to Inf above 65504
            merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        saved_as = str(merged.dtype).removeprefix("torch.")
        (staging / "README.md").write_text(model_card(info, model_cfg.name_or_path, merged=True, dtype=saved_as),
                                           encoding="utf-8")
    log(f"merged model ({saved_as}) written to {out}")
    return Path(out)


def merged_model(adapter_dir: str | Path, *, base: str | None = None, log=print, trust_remote_code: bool = False):
    """(info, merged float32 model, model config): the merge `lora merge` saves, in memory, for
    writers of other formats (`lora export`)."""

    quiet_libraries()
    info = verify_adapter(adapter_dir)
    check_mergeable(info)
    model_cfg = inference_model_config(info, base, quantization="none", trust_remote_code=trust_remote_code)
    tokenizer_src = info.path if (info.path / "tokenizer_config.json").is_file() else model_cfg.name_or_path
    merged = _merge_into_full_precision(info, model_cfg, load_tokenizer(str(tokenizer_src), trust_remote_code), log)
    _check_finite(merged)
    return info, merged, model_cfg


def _merge_into_full_precision(info, model_cfg, tokenizer, log):
    trained_on = info.model_section.get("quantization", "none")
    if trained_on != "none":
        log(f"adapter was trained on a {trained_on} base; merging into {model_cfg.name_or_path} "
            "reloaded in full precision (float32), never into the quantized weights")
    merged, was_tied = _merged_model(info, model_cfg, tokenizer)
    _untie_trained_embeddings(merged, was_tied, log)
    return merged


def _merged_model(info, model_cfg, tokenizer):
    """Base in float32 on the CPU (accurate, and no GPU needed) with the adapter folded in;
    also whether the base tied its input and output embeddings. A classifier's trained head
    (saved whole by peft) replaces the base's and its label names are in the saved config."""
    import torch
    from peft import PeftModel

    progress.add_total(3)  # the stages below
    with progress.step(f"loading the base {model_cfg.name_or_path}"):
        model = load_base_model(model_cfg, quantize=False, dtype=torch.float32, device="cpu")
        bind_tokenizer(model, tokenizer)
    was_tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    with progress.step(f"loading the adapter {info.path}"):
        model = PeftModel.from_pretrained(model, str(info.path))
    with progress.step("merging"):
        try:
            with warnings.catch_warnings():  # peft's note on untied embeddings: we report that ourselves
                warnings.filterwarnings("ignore", message=".*no longer tied after merging.*")
                return model.merge_and_unload(safe_merge=True), was_tied
        except ValueError as e:  # peft's safe_merge reports NaN this way
            raise LoraError(f"merging {info.path} would produce non-finite weights ({e}); nothing was written",
                            "the adapter is broken (NaN/Inf); use an earlier checkpoint") from None


def _untie_trained_embeddings(model, was_tied: bool, log) -> None:
    """A tied model whose embeddings were trained (modules_to_save) no longer has equal input
    and output embeddings; saved as tied, one would overwrite the other on reload. Save both.
    (peft 0.21 unties them itself; older versions and other paths may not.)"""
    import torch

    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if not was_tied or outp is None or inp.weight is outp.weight or torch.equal(inp.weight, outp.weight):
        return
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    for c in configs:
        c.tie_word_embeddings = False
    log("input and output embeddings differ after the merge (trained embeddings); "
        "saved untied (tie_word_embeddings: false)")


def _check_finite(model) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise LoraError(f"merged weight {name} has NaN or Inf values; nothing was written",
                            "the adapter is broken (use an earlier checkpoint), or the values overflow "
                            "--dtype float16 (use bfloat16 or float32)")


def model_card(info, base: str, *, merged: bool, dtype: str | None = None) -> str:
    """README.md naming the base, the adapter and the recipe that trained it."""
    cfg = info.config
    method = info.peft_type
    registered = for_peft_type(method)
    if registered is not None and registered.has_rank:
        method += f" (r={cfg.get('r')}, alpha={cfg.get('lora_alpha')})"
    rows = [("base model", base), ("adapter", str(info.path)), ("method", method),
            ("target modules", str(cfg.get("target_modules"))),
            ("modules trained in full", str(cfg.get("modules_to_save") or "none")),
            ("template", info.template.name)]
    trained_on = info.model_section.get("quantization", "none")
    if trained_on != "none":
        rows.append(("trained on", f"a {trained_on} quantized base" + ("; merged into the full-precision base" if merged else "")))
    if dtype:
        rows.append(("saved dtype", dtype))
    what = ("The adapter folded into its base with `lora merge`: a plain transformers model, no peft needed."
            if merged else "A LoRA-family adapter exported with `lora save`; load it on its base with peft.")

    auto = get_task(info.model_section.get("task")).auto_class
    load = (f"from transformers import {auto}\nmodel = {auto}.from_pretrained(\"<this folder>\")"
            if merged else
            f"from peft import PeftModel\nfrom transformers import {auto}\n"
            f"base = {auto}.from_pretrained({base!r})\nmodel = PeftModel.from_pretrained(base, \"<this folder>\")")
    lines = ["---", f"base_model: {base}", f"library_name: {'transformers' if merged else 'peft'}",
             "tags: [lora, lora-cli" + (", merged" if merged else "") + "]", "---", "",
             f"# {'Merged model' if merged else 'Adapter'}", "", what, "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Loading", "", "```python", load, "```", "", "Prompts must be rendered with the "
              f"`{info.template.name}` template the adapter was trained with (`lora generate` does this).", ""]
    lines += ["## Recipe", ""]
    if info.recipe:
        import yaml

        lines += ["```yaml", yaml.safe_dump(info.recipe, sort_keys=False, allow_unicode=True).rstrip(), "```"]
    else:
        lines.append("No recipe was saved with this adapter.")
    return "\n".join(lines) + "\n"


def save_adapter(source: str | Path, out: str | Path, *, force: bool = False, log=print) -> Path:
    """Copy an adapter (a run or a checkpoint-N) into a clean folder: adapter weights and
    config, tokenizer and recipe; no optimizer or scheduler state."""
    info = verify_adapter(source)
    src = info.path
    if not (src / ADAPTER_WEIGHTS).is_file():
        raise LoraError(f"{src}: no {ADAPTER_WEIGHTS}", "lora only exports safetensors adapters")
    # A run keeps its tokenizer beside the adapter, a checkpoint one level up; a bare adapter
    # gets its base's, so the exported folder always carries one.
    tokenizer_dir = next((d for d in (src, src.parent, Path(info.base)) if (d / "tokenizer_config.json").is_file()), None)
    recipe_file = find_recipe_file(src)
    ownership.check_output(Path(out), "save", force=force, folder=True,
                           inputs=[("adapter", src), ("tokenizer", tokenizer_dir), ("recipe", recipe_file)])
    with ownership.writing_folder(Path(out), "save", force) as staging:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(src / name, staging / name)
        for name in TOKENIZER_FILES if tokenizer_dir else ():
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        if recipe_file:
            shutil.copy2(recipe_file, staging / RECIPE_FILE)
        (staging / "README.md").write_text(model_card(info, info.base, merged=False), encoding="utf-8")
    log(f"adapter written to {out}")
    return Path(out)
