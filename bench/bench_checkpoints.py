"""What surviving costs: atomic checkpoints and the per-step guards, on the tiny offline base.

    python bench/bench_checkpoints.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_checkpoints.py --steps 60 --save-steps 5

Two `lora train` runs of the same recipe (LoRA r=16 on all linear layers, demo data), one
saving a checkpoint every --save-steps steps and one saving none, each timed by the Trainer's
own train_runtime. Printed: wall time per atomic save (stage, marker, rename, rotate), the
run's slowdown from saving, the size of one checkpoint on disk against the preflight disk
estimate for one checkpoint (3 x trainable bytes + tokenizer + 2 MiB), and the time a resume
takes to reach its first step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "tiny-llama"
DATA = REPO / "data" / "demo.jsonl"


def recipe_dict(out: Path, steps: int, save_steps: int, cache: Path) -> dict:
    return {
        "model": {"name_or_path": str(MODEL)},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(DATA), "max_length": 256, "cache_dir": str(cache)},
        "train": {"max_steps": steps, "save_steps": save_steps, "save_total_limit": 2, "batch_size": 4,
                  "gradient_accumulation": 1, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 5, "seed": 0},
        "output_dir": str(out),
    }


def run(recipe_raw: dict, resume: "ckpt.Resume | None" = None):
    from rich.console import Console

    from lora_cli.train import run as train_module
    from lora_cli.recipe.schema import recipe_from_dict

    saves: list[float] = []
    original = train_module.SafeTrainer._save_checkpoint

    def timed(self, model, trial):
        t0 = time.perf_counter()
        original(self, model, trial)
        saves.append(time.perf_counter() - t0)

    train_module.SafeTrainer._save_checkpoint = timed
    try:
        t0 = time.perf_counter()
        train_module.run_training(recipe_from_dict(recipe_raw), resume=resume, console=Console(quiet=True))
        wall = time.perf_counter() - t0
    finally:
        train_module.SafeTrainer._save_checkpoint = original
    metrics = [json.loads(x) for x in (Path(recipe_raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    runtime = sum(m["train_runtime"] for m in metrics if "train_runtime" in m)
    return wall, runtime, saves


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=5)
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        print(f"{MODEL} missing: run `make tiny` first")
        return 1
    from lora_cli.train import checkpoint as ckpt
    from lora_cli.train import preflight

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        _, plain_runtime, _ = run(recipe_dict(tmp / "plain", args.steps, 0, cache))
        saving = recipe_dict(tmp / "saving", args.steps, args.save_steps, cache)
        _, saving_runtime, saves = run(saving)
        newest = ckpt.newest_complete(tmp / "saving")
        actual = folder_bytes(newest)
        adapter = (tmp / "saving" / "adapter_model.safetensors").stat().st_size
        tokenizer = preflight.tokenizer_bytes(str(MODEL))
        estimate = preflight.OPTIMIZER_FACTOR * adapter + tokenizer + preflight.CHECKPOINT_OVERHEAD

        # resume: drop the final adapter and the last checkpoint, continue from the one before
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (tmp / "saving" / name).unlink()
        ckpt._remove(newest)
        before = ckpt.newest_complete(tmp / "saving")
        remaining = args.steps - ckpt.checkpoint_step(before)
        resume_wall, _, _ = run(saving, resume=ckpt.Resume())

    mib = 1 << 20
    rows = [
        ("optimizer steps", f"{args.steps}"),
        ("checkpoints written (save_steps)", f"{len(saves)} (every {args.save_steps})"),
        ("atomic save, median wall", f"{sorted(saves)[len(saves) // 2] * 1000:.1f} ms"),
        ("train_runtime without saving", f"{plain_runtime:.2f} s"),
        ("train_runtime with saving", f"{saving_runtime:.2f} s"),
        ("one checkpoint on disk", f"{actual / mib:.2f} MiB"),
        ("preflight estimate per checkpoint", f"{estimate / mib:.2f} MiB ({estimate / actual:.2f}x actual)"),
        (f"resume from {before.name}: load + {remaining} steps, wall", f"{resume_wall:.2f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
