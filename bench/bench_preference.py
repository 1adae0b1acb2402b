"""Preference objectives next to SFT: tokens/s and peak memory of `lora train` for sft, dpo, orpo,
simpo and kto on the same model and rows.

    python bench/bench_preference.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_preference.py --quick    (2 steps per objective: proves the script works, measures nothing)
    python bench/bench_preference.py --model PATH --steps 50 --max-length 512

Rows: data/dpo_demo.jsonl. sft trains on the chosen answers ({"prompt", "completion"} as alpaca
rows), the pair objectives on the pairs, kto on each pair split into a good and a bad answer, so
every objective reads the same prompts and answers. Each objective runs in its own process (peak
memory is per process): on a GPU torch.cuda.max_memory_allocated, on CPU the peak resident set
(VmHWM, which includes Python and the libraries). tokens/s = tokens in the forward passes
(prompt and answer of every sequence; a pair is two sequences, kto adds its mismatched KL
sequence) / the Trainer's train_runtime. The issue's memory goal: a DPO run within 1.3x of SFT.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OBJECTIVES = ("sft", "dpo", "orpo", "simpo", "kto")
MEMORY_GOAL = 1.3


def rows_for(objective: str, pairs: list[dict]) -> list[dict]:
    if objective == "sft":
        return [{"instruction": p["prompt"], "output": p["chosen"]} for p in pairs]
    if objective == "kto":
        return [r for p in pairs for r in ({"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                                            {"prompt": p["prompt"], "completion": p["rejected"], "label": False})]
    return pairs


def recipe_for(objective: str, model: str, data: Path, out: Path, args):
    from lora_cli.recipe.schema import recipe_from_dict

    return recipe_from_dict({
        "model": {"name_or_path": model},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"path": str(data), "max_length": args.max_length, "cache": False,
                 **({"packing": False} if objective == "sft" else {})},  # one example per row, as the pairs
        "train": {"objective": objective, "max_steps": args.steps, "learning_rate": 1e-4, "batch_size": args.batch_size,
                  "gradient_accumulation": 1, "warmup_steps": 0, "logging_steps": 1, "save_steps": 0, "seed": 0},
        "output_dir": str(out),
    })


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


def peak_rss() -> int:
    """This process's peak resident memory (the kernel's VmHWM; ru_maxrss of a child can start at
    its parent's size, see bench_data.py), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the nearest measure


def run_one(objective: str, args) -> dict:
    """One objective, in this process: train, then report tokens/s and peak memory."""
    import torch
    from rich.console import Console

    from lora_cli.train.metrics import METRICS_FILE, read_metrics
    from lora_cli.train.run import run_training

    pairs = [json.loads(x) for x in (REPO / "data" / "dpo_demo.jsonl").read_text().splitlines() if x.strip()]
    work = Path(args.work)
    data = work / f"{objective}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows_for(objective, pairs)))
    recipe = recipe_for(objective, args.model, data, work / f"run-{objective}", args)
    per_row = forward_tokens(recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_training(recipe, overwrite=True, console=Console(quiet=True))
    runtime = next(r["train_runtime"] for r in read_metrics(work / f"run-{objective}" / METRICS_FILE) if "train_runtime" in r)
    tokens = per_row * args.steps * args.batch_size
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss()
    return {"objective": objective, "tokens_per_s": tokens / runtime, "peak_bytes": peak,
            "memory": "cuda allocated" if torch.cuda.is_available() else "cpu peak RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "models" / "tiny-llama"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="2 steps per objective: proves the script runs")
    parser.add_argument("--one", choices=OBJECTIVES, help=argparse.SUPPRESS)  # a child process's objective
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.max_length = 2, 64
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no model there; run `make tiny` (or pass --model)")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for objective in OBJECTIVES:
            cmd = [sys.executable, __file__, "--one", objective, "--work", work, "--model", args.model,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{objective} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    sft = results[0]
    print(f"{'objective':<10} {'tokens/s':>10} {'peak memory':>14} {'vs sft':>7}   ({results[0]['memory']}; "
          f"{args.steps} steps x {args.batch_size} rows, max_length {args.max_length}{', QUICK: measures nothing' if args.quick else ''})")
    for r in results:
        ratio = r["peak_bytes"] / sft["peak_bytes"]
        print(f"{r['objective']:<10} {r['tokens_per_s']:>10.0f} {r['peak_bytes'] / 2**20:>11.1f} MiB {ratio:>6.2f}x")
    dpo = next(r for r in results if r["objective"] == "dpo")
    print(f"dpo peak memory / sft: {dpo['peak_bytes'] / sft['peak_bytes']:.2f}x (goal <= {MEMORY_GOAL}x)")


if __name__ == "__main__":
    main()
