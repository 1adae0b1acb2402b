"""The preference rows the tests train on (a rule the base does not know) and the recipe that
trains them: shared by the preference, DDP and evaluation tests."""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from conftest import write_jsonl

# --------------------------------------------------------------------------- a rule the base does not know

FILLERS = ["LoRA", "QLoRA", "adapter", "matrix", "training", "memory", "data", "token", "layer", "prompt",
           "answer", "method", "base", "paper", "update", "loss", "weights", "model", "scaling", "dropout"]


def rule_pairs(fillers: list[str], seed: int, n: int) -> list[dict]:
    """A prompt ending in 'alpha' is answered A, one ending in 'rank' B: half the pairs prefer
    each answer, so a base that always leans one way is right about half the time (chance)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        key = ("alpha", "rank")[i % 2]
        a, b = rng.sample(fillers, 2)
        good, bad = ("A", "B") if key == "alpha" else ("B", "A")
        rows.append({"prompt": f"{a} {b} {key}", "chosen": good, "rejected": bad})
    return rows


def as_labelled(pairs: list[dict]) -> list[dict]:
    """KTO rows from pairs: the chosen answer is good, the rejected one bad."""
    return [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                        {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]


TRAIN_ROWS = rule_pairs(FILLERS[:14], seed=1, n=32)
HELD_OUT = rule_pairs(FILLERS[14:], seed=2, n=16)  # fillers never seen in training
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def preference_recipe(tmp_path: Path, model: Path, objective: str, rows=None, **train) -> Path:
    rows = rows if rows is not None else (as_labelled(TRAIN_ROWS) if objective == "kto" else TRAIN_ROWS)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    settings = {"objective": objective, "max_steps": 12, "learning_rate": 1e-2, "batch_size": 8,
                "gradient_accumulation": 1, "save_steps": 0, "logging_steps": 2, **train}
    recipe = {"model": {"name_or_path": str(model)}, "lora": LORA, "data": {"path": str(data), "max_length": 32},
              "train": {"warmup_steps": 0, "seed": 0, **settings}, "output_dir": str(tmp_path / "run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
