"""Training speed with no knob set: `lora train` with its default batching against the source
workflow done by hand, on the tiny model and a larger random one, interleaved in one run.

    python bench/bench_train.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_train.py --quick    (3 steps per run, one seed, the tiny model: proves the script works)

The source workflow is bench_data.py's (seed article 002): rows tokenised one at a time through
Dataset.map, then the Hugging Face Trainer with DataCollatorForSeq2Seq, batch 1 x gradient
accumulation 8. `lora train` gets the same model, rows, LoRA settings, learning rate, epochs and
seed, and nothing about batching: data.packing, data.group_by_length, train.batch_size and
train.gradient_accumulation are left empty, so lora_cli.data.batching chooses (on CPU: sdpa, 8 rows
per forward pass flattened into one row (positions restarting per example, so sdpa masks the
examples apart), 8 rows per optimizer step like the baseline).

Models: models/tiny-llama (0.9M parameters) and a random 8-layer, 512-wide Llama (25.7M, built
by benchkit.build_larger with the tiny tokenizer). For each model and seed both workflows
train back to back, in alternating order, so a busy machine slows both alike.

Printed per model: supervised tokens/s (supervised tokens the optimizer saw / Trainer
train_runtime; best over seeds, median beside it), the ratio (goal >= 1.5x), and the final loss
(mean cross-entropy over every row's supervised tokens after training, computed by the same
function for both adapters; mean over seeds, each seed listed) twice: on the rows each side
trained on, and on the same rows for both, tokenised as inference presents a prompt (with BOS,
which the source workflow's training rows lack; see docs/benchmarks.md, Data).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import bench_data  # the source workflow and the loss measurement live there
import benchkit

GOAL = 1.5


def default_recipe(base: Path, data_path: Path, out: Path, epochs: float, cache_dir: Path, seed: int,
                   max_steps: int):
    """The bench's recipe with every batching key left empty (the defaults under test)."""
    recipe = bench_data.lora_recipe(base, data_path, out, epochs, cache_dir)
    recipe.train.batch_size = recipe.train.gradient_accumulation = None
    recipe.train.seed, recipe.train.max_steps = seed, max_steps
    return recipe


def measure(name: str, base: Path, rows: list[dict], args, work: Path) -> dict:
    from lora_cli.data.examples import build_sft_data
    from lora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    data_path = benchkit.write_jsonl(work / f"{name}.jsonl", rows)
    source_ds = bench_data.source_preprocess(rows, tokenizer)
    ours = build_sft_data(default_recipe(base, data_path, work / "x", 1, work / "cache", 0, -1).data, tokenizer).train
    steps = args.max_steps
    rows_seen = steps * 8 if steps > 0 else None  # 8 rows per step on both sides
    sup_source = _supervised(source_ds, args.epochs, rows_seen)
    sup_lora = _supervised(ours, args.epochs, rows_seen)

    def losses(model, trained_on) -> tuple[float, float]:
        # Two losses: on the rows this side trained on, and on the rows as inference presents
        # them (the prompt with BOS, as `lora generate` and the source workflow's own
        # generation code tokenise it): the same rows for both sides.
        return (bench_data.mean_supervised_loss(model, list(trained_on), tokenizer.pad_token_id),
                bench_data.mean_supervised_loss(model, list(ours), tokenizer.pad_token_id))

    def source(i: int) -> tuple:
        seed = args.seeds[i]
        model, runtime = bench_data.source_train(source_ds, tokenizer, work / f"{name}-source-{seed}", args.epochs, seed,
                                                 base, steps)
        return (sup_source / runtime, *losses(model, source_ds))

    def lora(i: int) -> tuple:
        seed = args.seeds[i]
        out = work / f"{name}-lora-{seed}"
        _, runtime = bench_data.lora_train(default_recipe(base, data_path, out, args.epochs, work / "cache", seed, steps))
        return (sup_lora / runtime, *losses(bench_data.trained_adapter(out, base), ours))

    # every seed trains both back to back, in alternating order, so a busy machine slows both alike
    return benchkit.round_robin({"source": source, "lora": lora}, len(args.seeds), alternate=True)


def _supervised(dataset, epochs: float, rows_seen: int | None) -> float:
    """Supervised tokens the optimizer sees: every row x epochs, or (quick run) the first
    rows_seen rows' share of it, counted at the mean per row."""
    per_epoch = bench_data.supervised_tokens(dataset)
    if rows_seen is None:
        return per_epoch * epochs
    return per_epoch / len(dataset) * rows_seen


def report(name: str, params: str, runs: dict, seeds: list[int]) -> float:
    (best_src, med_src), (best_lora, med_lora) = (
        (max(r[0] for r in runs[k]), statistics.median(r[0] for r in runs[k])) for k in ("source", "lora"))
    own_src, own_lora, served_src, served_lora = (statistics.mean(r[i] for r in runs[k])
                                                  for i, k in ((1, "source"), (1, "lora"), (2, "source"), (2, "lora")))
    print(f"| {name} ({params}) | source workflow, batch 1 x accum 8 | {best_src:,.0f} | {med_src:,.0f} | 1.00x | "
          f"{own_src:.4f} | {served_src:.4f} |")
    print(f"| {name} ({params}) | lora train, defaults | {best_lora:,.0f} | {med_lora:,.0f} | "
          f"{best_lora / best_src:.2f}x | {own_lora:.4f} | {served_lora:.4f} |")
    for i, what in ((1, "own rows"), (2, "rows as inference presents them")):
        per_seed = "; ".join(f"seed {s}: {a[i]:.4f} vs {b[i]:.4f}" for s, a, b in zip(seeds, runs["lora"], runs["source"]))
        print(f"  {name}: final loss on {what}, lora vs source: {per_seed}")
    print(f"  {name}: speed-up {best_lora / best_src:.2f}x (goal >= {GOAL}x)")
    return best_lora / best_src


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0], "3 steps per run, one seed, 48 rows, the tiny model only")
    parser.add_argument("--epochs", type=float, default=3, help="epochs over the 240 demo rows (tiny model)")
    parser.add_argument("--larger-epochs", type=float, default=1, help="epochs for the 25.7M model")
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[42, 1, 2])
    parser.add_argument("--no-larger", action="store_true", help="the tiny model only")
    args = parser.parse_args()
    args.max_steps = 3 if args.quick else -1
    if args.quick:
        args.seeds, args.no_larger = args.seeds[:1], True
    benchkit.require_model(args.model)

    from datasets.utils.logging import disable_progress_bar

    from lora_cli.libraries import quiet_libraries

    quiet_libraries()
    disable_progress_bar()
    rows = benchkit.read_jsonl(benchkit.DATA)
    if args.quick:
        rows = rows[:48]
    with benchkit.scratch("bench-train-") as work:
        models = [("tiny-llama", args.model, "0.9M", args.epochs)]
        if not args.no_larger:
            models.append(("random Llama 8 x 512", benchkit.build_larger(work / "larger", args.model), "25.7M",
                           args.larger_epochs))
        print(f"{len(rows)} demo rows, seeds {args.seeds}, {benchkit.cpus_and_load()}{benchkit.quick_note(args)}")
        print("| model | workflow | supervised tokens/s (best) | median | vs source | final loss, own rows (mean) "
              "| final loss, rows as inference presents them (mean) |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for name, base, params, epochs in models:
            args.epochs = epochs
            report(name, params, measure(name, base, rows, args, work), args.seeds)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
