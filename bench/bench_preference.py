"""Preference objectives next to SFT: tokens/s and peak memory of `lora train` for sft, dpo, orpo,
simpo and kto on the same model and rows.

    python bench/bench_preference.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_preference.py --quick    (2 steps per objective, all in one process: proves the script works)
    python bench/bench_preference.py --model PATH --steps 50 --max-length 512

Rows: data/dpo_demo.jsonl. sft trains on the chosen answers ({"prompt", "completion"} as alpaca
rows), the pair objectives on the pairs, kto on each pair split into a good and a bad answer, so
every objective reads the same prompts and answers. Each objective runs in its own process (peak
memory is per process): on a GPU torch.cuda.max_memory_allocated, on CPU the peak resident set
(VmHWM, which includes Python and the libraries). tokens/s = tokens in the forward passes
(prompt and answer of every sequence; a pair is two sequences, kto adds its mismatched KL
sequence) / the Trainer's train_runtime. The issue's memory goal: a DPO run within 1.3x of SFT.
--quick trains every objective in one child process (one start-up instead of five), so its
peak memory column is the running peak of them all: a quick run's figures mean nothing anyway.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import benchkit

OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
MEMORY_GOAL = 1.3


def rows_for(objective: str, pairs: list[dict]) -> list[dict]:
    if objective == "sft":
        return [{"instruction": p["prompt"], "output": p["chosen"]} for p in pairs]
    if objective == "kto":
        return [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                            {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    return pairs


def recipe_for(objective: str, model: Path, data: Path, out: Path, args):
    return benchkit.recipe(
        model, data, out,
        data={"max_length": args.max_length, "cache": False,
              **({"packing": False} if objective == "sft" else {})},  # one example per row, as the pairs
        train={"objective": objective, "max_steps": args.steps, "learning_rate": 1e-4, "batch_size": args.batch_size,
               "gradient_accumulation": 1, "warmup_steps": 0, "logging_steps": 1, "save_steps": 0, "seed": 0})


def forward_tokens(recipe) -> float:
    """Tokens per training row as the forward passes see them (both sequences of a pair)."""
    from lora_cli.model.load import load_tokenizer
    from lora_cli.train.objectives import objective_of

    tokenizer = load_tokenizer(recipe.model.name_or_path)
    if objective_of(recipe).preference:
        from lora_cli.train.preference import build_preference_data

        data = build_preference_data(recipe, tokenizer)
        per_row = data.stats.total_tokens / len(data.train)
        return per_row * (2 if "completion_ids" in data.train.column_names and recipe.train.loss_type != "apo_zero_unpaired" else 1)
    from lora_cli.data.examples import build_sft_data

    data = build_sft_data(recipe.data, tokenizer)
    return data.stats.total_tokens / len(data.train)


def run_one(objective: str, args) -> dict:
    """One objective, in this process: train, then report tokens/s and peak memory."""
    import torch
    from rich.console import Console

    from lora_cli.train.metrics import METRICS_FILE, read_metrics
    from lora_cli.train.run import run_training

    pairs = benchkit.read_jsonl(benchkit.REPO / "data" / "dpo_demo.jsonl")
    work = Path(args.work)
    data = benchkit.write_jsonl(work / f"{objective}.jsonl", rows_for(objective, pairs))
    recipe = recipe_for(objective, args.model, data, work / f"run-{objective}", args)
    per_row = forward_tokens(recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_training(recipe, overwrite=True, console=Console(quiet=True))
    runtime = next(r["train_runtime"] for r in read_metrics(work / f"run-{objective}" / METRICS_FILE) if "train_runtime" in r)
    tokens = per_row * args.steps * args.batch_size
    peak, what = benchkit.peak_memory()
    return {"objective": objective, "tokens_per_s": tokens / runtime, "peak_bytes": peak, "memory": what}


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0], "2 steps per objective, max_length 64, one process for all")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process's objectives, comma-separated
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_length = 2, 64
    if args.one:
        for objective in args.one.split(","):
            print(json.dumps(run_one(objective, args)), flush=True)
        return 0
    benchkit.require_model(args.model)
    # each objective in its own process (peak memory is per process); a quick run, all in one
    groups = [",".join(OBJECTIVES)] if args.quick else list(OBJECTIVES)
    results = []
    with benchkit.scratch("bench-preference-") as work:
        for group in groups:
            cmd = [sys.executable, __file__, "--one", group, "--work", str(work), "--model", str(args.model),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{group} failed:\n{done.stderr[-3000:]}")
            # the child's own lines only (a library may print between them)
            results += [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"objective"')]
    if [r["objective"] for r in results] != list(OBJECTIVES):
        sys.exit(f"the children reported {[r['objective'] for r in results]}, not {list(OBJECTIVES)}")
    sft = results[0]
    print(f"{'objective':<10} {'tokens/s':>10} {'peak memory':>14} {'vs sft':>7}   ({results[0]['memory']}; "
          f"{args.steps} steps x {args.batch_size} rows, max_length {args.max_length}{benchkit.quick_note(args, ', ')})")
    for r in results:
        ratio = r["peak_bytes"] / sft["peak_bytes"]
        print(f"{r['objective']:<10} {r['tokens_per_s']:>10.0f} {r['peak_bytes'] / 2**20:>11.1f} MiB {ratio:>6.2f}x")
    dpo = next(r for r in results if r["objective"] == "dpo")
    print(f"dpo peak memory / sft: {dpo['peak_bytes'] / sft['peak_bytes']:.2f}x (goal <= {MEMORY_GOAL}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
