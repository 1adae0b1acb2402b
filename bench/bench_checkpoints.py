"""What surviving costs: atomic checkpoints and the per-step guards, on the tiny offline base.

    python bench/bench_checkpoints.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_checkpoints.py --steps 60 --save-steps 5
    python bench/bench_checkpoints.py --quick    (6 steps, a checkpoint every 2: proves it runs)

Two `lora train` runs of the same recipe (LoRA r=16 on all linear layers, demo data), one
saving a checkpoint every --save-steps steps and one saving none, each timed by the Trainer's
own train_runtime. Printed: wall time per save (the Trainer's _save_checkpoint, which writes
into the staging folder; lora's marker, rename and rotation follow in its on_save hook and are
not in that figure, though they are in the run's slowdown), the run's slowdown from saving, the size of one checkpoint on disk against the preflight disk
estimate for one checkpoint (3 x trainable bytes + tokenizer + 2 MiB), and the time a resume
takes to reach its first step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import benchkit


def recipe_dict(model: Path, out: Path, steps: int, save_steps: int, cache: Path) -> dict:
    return benchkit.recipe_raw(
        model, benchkit.DATA, out, data={"max_length": 256, "cache_dir": str(cache)},
        train={"max_steps": steps, "save_steps": save_steps, "save_total_limit": 2, "batch_size": 4,
               "gradient_accumulation": 1, "learning_rate": 1e-3, "warmup_steps": 0, "logging_steps": 5, "seed": 0})


def run(recipe_raw: dict, resume: "ckpt.Resume | None" = None):
    from rich.console import Console

    from lora_cli.recipe.schema import recipe_from_dict
    from lora_cli.train import run as train_module

    saves: list[float] = []
    original = train_module.SafeTrainer._save_checkpoint

    def timed(self, model, trial):
        saves.append(benchkit.timed(original, self, model, trial)[1])

    train_module.SafeTrainer._save_checkpoint = timed
    try:
        _, wall = benchkit.timed(train_module.run_training, recipe_from_dict(recipe_raw), resume=resume,
                                 console=Console(quiet=True))
    finally:
        train_module.SafeTrainer._save_checkpoint = original
    metrics = [json.loads(x) for x in (Path(recipe_raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    runtime = sum(m["train_runtime"] for m in metrics if "train_runtime" in m)
    return wall, runtime, saves


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0], "6 steps, a checkpoint every 2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.save_steps = 6, 2
    benchkit.require_model(args.model)
    from lora_cli.files import atomic
    from lora_cli.train import checkpoint as ckpt
    from lora_cli.train import preflight

    with benchkit.scratch("bench-checkpoints-") as tmp:
        cache = tmp / "cache"
        _, plain_runtime, _ = run(recipe_dict(args.model, tmp / "plain", args.steps, 0, cache))
        saving = recipe_dict(args.model, tmp / "saving", args.steps, args.save_steps, cache)
        _, saving_runtime, saves = run(saving)
        newest = ckpt.newest_complete(tmp / "saving")
        actual = benchkit.bytes_on_disk(newest)
        adapter = (tmp / "saving" / "adapter_model.safetensors").stat().st_size
        tokenizer = preflight.tokenizer_bytes(str(args.model))
        estimate = preflight.OPTIMIZER_FACTOR * adapter + tokenizer + preflight.CHECKPOINT_OVERHEAD

        # resume: drop the final adapter and the last checkpoint, continue from the one before
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (tmp / "saving" / name).unlink()
        atomic.remove_tree(newest)
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
    if args.quick:
        print(benchkit.QUICK_MARK)
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
