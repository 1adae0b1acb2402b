"""Adapters for the inference / merge / save tests, built directly with peft (no training):
every LoRA weight random, so B is far from zero and an adapter changes what the model says."""

from __future__ import annotations

from pathlib import Path

import yaml

PROMPT_IDS = [[1, 5, 9, 22, 40, 7, 300, 12]]


def random_adapter(base: Path, out: Path, *, seed: int, target_modules=("q_proj", "v_proj"),
                   modules_to_save=None, scale: float = 0.5, template: str | None = None) -> Path:
    """Save a LoRA adapter on `base` whose A, B (and modules_to_save copies) are random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)  # "all-linear": peft's preset
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM",
                        modules_to_save=list(modules_to_save) if modules_to_save else None)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    if template:
        recipe = {"model": {"name_or_path": str(base)}, "data": {"template": template}}
        (Path(out) / "lora_recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return Path(out)


def logits(model, ids=PROMPT_IDS):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits


def unmerged(base: Path, adapter: Path):
    """Full-precision base + adapter through plain peft: the reference a merge must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)).eval()


def two_random_adapters(base: Path, root: Path, seeds=(11, 12)) -> tuple[Path, Path]:
    """Two different random adapters on one base, wide enough (attention + MLP) that they
    answer differently: what side-by-side and switching tests compare."""
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    return tuple(random_adapter(base, root / name, seed=seed, target_modules=targets)
                 for name, seed in zip(("one", "two"), seeds))
