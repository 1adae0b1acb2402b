"""Data path speed and memory: `lora train` against the source workflow done by hand, on the
same tiny model, data and LoRA settings, measured in one run; then the peak memory of the
data path against the size of the JSONL it reads.

    python bench/bench_data.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_data.py --rows 20000 --epochs 3 --memory-sizes 20,200,1000
    python bench/bench_data.py --quick    (small sizes, one seed: proves it runs end to end)

The source workflow (seed article 002): rows tokenised one at a time by a per-row function
through Dataset.map (prompt and answer + EOS tokenised separately, cut at 256 tokens), then
the Hugging Face Trainer with DataCollatorForSeq2Seq, batch 1 x gradient accumulation 8.
`lora train`: batched tokenisation (plus its on-disk cache on a second run), then packed
sequences (2 packs of <= 256 tokens per step, about 8 rows, as many as the baseline's step).

Printed: preprocessing rows/s (best of --repeat; the two workflows alternate, so a busy
machine slows both alike), training supervised tokens/s (supervised tokens the optimizer saw /
Trainer train_runtime, best over the seeds; both workflows train back to back for every seed)
and the final loss: mean cross-entropy over every row's supervised tokens, computed the same
way for both trained adapters after training, averaged over seeds.

Memory: for each size in --memory-sizes (MB), a JSONL of distinct alpaca rows is written to a
temporary folder and the real command `lora data preview` reads it in its own process (format
detected, every row checked and tokenised, cache written); its peak resident memory (the
kernel's VmHWM for it, which counts memory-mapped file pages it touched) is reported beside the
same command's peak on a one-row file (Python, libraries, tokenizer: no data), so that growth
with the file shows.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchkit
from benchkit import DATA, read_jsonl, timed

MAX_LENGTH = 256
LORA = benchkit.LORA
LORA_INIT = "kaiming"  # peft's default, which the by-hand workflow gets; `lora train` is told the same
LR = 3e-3


# --------------------------------------------------------------------------- the source workflow

def source_preprocess(rows: list[dict], tokenizer, max_length: int = MAX_LENGTH):
    """Seed 002's process_func, applied row by row with Dataset.map."""
    from datasets import Dataset

    def process_func(example):
        prompt = "\n".join(["Human: " + example["instruction"], example["input"]]).strip() + "\n\nAssistant: "
        instruction = tokenizer(prompt, add_special_tokens=False)
        response = tokenizer(example["output"] + tokenizer.eos_token, add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"]
        attention_mask = instruction["attention_mask"] + response["attention_mask"]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
        if len(input_ids) > max_length:
            input_ids, attention_mask, labels = input_ids[:max_length], attention_mask[:max_length], labels[:max_length]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    ds = Dataset.from_list(rows)
    return ds.map(process_func, remove_columns=ds.column_names, desc=None)


def lora_model(base: Path, dtype: str = "float32"):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                     target_modules=LORA["target_modules"])
    return get_peft_model(model, cfg)


def source_train(dataset, tokenizer, out: Path, epochs: int, seed: int, base: Path, max_steps: int = -1,
                 dtype: str = "float32", callbacks: list | None = None, **arguments):
    """Returns (model, Trainer train_runtime). `arguments` add to TrainingArguments (bf16 on a GPU);
    callbacks: TrainerCallbacks (bench_gpu.py's step timer)."""
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    model = lora_model(base, dtype)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=8,
                             num_train_epochs=epochs, max_steps=max_steps, learning_rate=LR, warmup_steps=5, logging_steps=10,
                             save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, data_seed=seed,
                             **arguments)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the final metrics into the table
    output = trainer.train()
    return model, output.metrics["train_runtime"]


# --------------------------------------------------------------------------- lora

def lora_recipe(base: Path, data_path: Path, out: Path, epochs: int, cache_dir: Path, **data):
    return benchkit.recipe(
        base, data_path, out, lora={**LORA, "init": LORA_INIT},
        data={"max_length": MAX_LENGTH, "cache_dir": str(cache_dir), **data},
        train={"epochs": epochs, "learning_rate": LR, "batch_size": 2, "gradient_accumulation": 1,
               "warmup_steps": 5, "logging_steps": 10,
               "save_steps": 100_000})  # no checkpoint inside the timed loop, like the baseline's save_strategy="no"


def lora_train(recipe):
    """`lora train` in-process; returns (its TrainResult, Trainer train_runtime)."""
    from rich.console import Console

    from lora_cli.train import run as train_module

    result = train_module.run_training(recipe, overwrite=True, console=Console(quiet=True))
    records = [json.loads(line) for line in (Path(recipe.output_dir) / train_module.METRICS_FILE).read_text().splitlines()]
    return result, next(r["train_runtime"] for r in records if "train_runtime" in r)


def trained_adapter(run_dir: Path, base: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(run_dir))


# --------------------------------------------------------------------------- measuring

def mean_supervised_loss(model, examples, pad_id: int) -> float:
    """Cross-entropy over every supervised token of `examples`, unpacked, in batches of 8."""
    import torch

    from lora_cli.data.examples import PadCollator

    model.eval()
    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[i:i + 8]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return total / count


def supervised_tokens(examples) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


# --------------------------------------------------------------------------- memory

def write_jsonl_of_size(path: Path, megabytes: float, demo: list[dict]) -> int:
    """Distinct alpaca rows (numbered instructions) until the file holds `megabytes`; rows written."""
    target, written, i = megabytes * 1e6, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            row = demo[i % len(demo)]
            line = json.dumps(dict(row, instruction=f"{row['instruction']} (#{i})"), ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            i += 1
    return i


def preview_peak_mb(data_path: Path, cache_dir: Path, work: Path, base: Path) -> dict:
    """The real command the issue measured, `lora data preview`, on a recipe reading `data_path`
    (format left out: detected; every row checked and tokenised; cache written), in its own
    process: its peak resident memory (the kernel's VmHWM for that process, which counts the
    pages of memory-mapped Arrow files it touched), and the peaks of its anonymous memory and of
    its file-backed pages apart, all read every 20 ms. Not ru_maxrss: a child's ru_maxrss starts
    at its parent's resident size when it forks, and this script's process is large after its
    training runs. Returns MB and seconds."""
    import yaml

    recipe = work / f"preview-{data_path.stem}.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(base)},
        "data": {"path": str(data_path), "max_length": MAX_LENGTH, "cache_dir": str(cache_dir)},
        "output_dir": str(work / "unused")}), encoding="utf-8")
    lora = Path(sys.executable).parent / "lora"
    start = time.perf_counter()
    errors = work / f"preview-{data_path.stem}.err"
    with errors.open("wb") as err:  # a file, not a pipe: a pipe nobody reads could fill and stall it
        proc = subprocess.Popen([str(lora), "data", "preview", str(recipe), "--rows", "1"],
                                stdout=subprocess.DEVNULL, stderr=err)
    peak = {"VmHWM": 0.0, "RssAnon": 0.0, "RssFile": 0.0}
    while proc.poll() is None:  # VmHWM only grows: the last reading misses at most the last 20 ms
        for name, value in benchkit.process_status_mb(proc.pid).items():
            peak[name] = max(peak[name], value)
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"lora data preview failed ({proc.returncode}): {errors.read_text()[-2000:]}")
    return {"peak_mb": peak["VmHWM"], "anon_mb": peak["RssAnon"], "file_mb_mapped": peak["RssFile"], "seconds": seconds}


def measure_memory(sizes: list[float], demo: list[dict], work: Path, base: Path) -> list[dict]:
    """Peak memory of `lora data preview` per file size, and of the same command on a one-row
    file (what Python, the libraries and the tokenizer cost before any data)."""
    one_row = work / "mem-one-row.jsonl"
    one_row.write_text(json.dumps(demo[0], ensure_ascii=False) + "\n", encoding="utf-8")
    floor = preview_peak_mb(one_row, work / "memcache-floor", work, base)
    results = []
    for megabytes in sizes:
        path = work / f"mem-{megabytes:g}MB.jsonl"
        rows = write_jsonl_of_size(path, megabytes, demo)
        measured = preview_peak_mb(path, work / f"memcache-{megabytes:g}", work, base)
        results.append({"file_mb": path.stat().st_size / 1e6, "rows": rows, "floor": floor, **measured})
        path.unlink()
        shutil.rmtree(work / f"memcache-{megabytes:g}", ignore_errors=True)
    return results


def print_memory(results: list[dict]) -> None:
    print("| JSONL size | rows | peak RSS of `lora data preview` | same command, one-row file | peak / file size "
          "| (peak - one-row) / file size | peak anonymous memory (one-row file) | peak file-backed pages (one-row file) "
          "| rows/s, whole command |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        f = r["floor"]
        print(f"| {r['file_mb']:,.0f} MB | {r['rows']:,} | {r['peak_mb']:,.0f} MB | {f['peak_mb']:,.0f} MB | "
              f"{r['peak_mb'] / r['file_mb']:.2f}x | {(r['peak_mb'] - f['peak_mb']) / r['file_mb']:.2f}x | "
              f"{r['anon_mb']:,.0f} MB ({f['anon_mb']:,.0f} MB) | {r['file_mb_mapped']:,.0f} MB ({f['file_mb_mapped']:,.0f} MB) | "
              f"{r['rows'] / r['seconds']:,.0f} |")


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0],
                                "500 rows, 16 rows x 1 epoch, 1 seed, one repeat, a 1 MB file")
    parser.add_argument("--rows", type=int, default=20000, help="rows for the preprocessing measurement")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs over the demo rows")
    parser.add_argument("--train-rows", type=int, default=240, help="demo rows trained on (240 = all)")
    parser.add_argument("--repeat", type=int, default=3, help="preprocessing runs per workflow (best is reported)")
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[42, 1, 2],
                        help="training seeds, comma-separated (best speed and mean loss are reported)")
    parser.add_argument("--memory-sizes", type=lambda t: [float(x) for x in t.split(",") if x], default=[20, 200, 1000],
                        help="JSONL sizes in MB for the memory measurement, comma-separated (empty: skip it)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory table")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.train_rows, args.epochs, args.repeat, args.seeds, args.memory_sizes = 500, 16, 1, 1, [42], [1]
    benchkit.require_model(args.model)
    with benchkit.scratch("bench-data-") as work:
        if args.memory_only:
            report_memory(args, read_jsonl(DATA), work)
        else:
            measure_speed(args, work)
            report_memory(args, read_jsonl(DATA), work)
    return 0


def measure_speed(args, work: Path) -> None:
    from datasets.utils.logging import disable_progress_bar

    from lora_cli.data.examples import build_sft_data
    from lora_cli.libraries import quiet_libraries
    from lora_cli.model.load import load_tokenizer

    quiet_libraries()
    disable_progress_bar()
    base = args.model
    tokenizer = load_tokenizer(str(base))
    demo = read_jsonl(DATA)
    big = work / "big.jsonl"
    # Every row distinct (a numbered instruction), so no pipeline gains from repeated text.
    benchkit.write_jsonl(big, (dict(demo[i % len(demo)], instruction=f"{demo[i % len(demo)]['instruction']} (#{i})")
                               for i in range(args.rows)))

    # --- preprocessing: same rows, read from the same file; both warmed up once (imports,
    # arrow), then the best of --repeat runs, since other work on a shared machine only adds time
    source_preprocess(demo[:16], tokenizer)
    build_sft_data(lora_recipe(base, DATA, work / "unused", 1, work / "warm", cache=False).data, tokenizer)
    times = benchkit.round_robin({  # alternating, so load from other work falls on both
        "source": lambda _: timed(lambda: source_preprocess(read_jsonl(big), tokenizer))[1],
        # a fresh cache folder each time: a cold run, cache written
        "lora": lambda i: timed(build_sft_data, lora_recipe(base, big, work / "unused", 1, work / f"cache{i}").data,
                                tokenizer)[1]}, args.repeat)
    t_source, t_lora = min(times["source"]), min(times["lora"])
    cached = lora_recipe(base, big, work / "unused", 1, work / "cache0").data
    t_cached = min(timed(build_sft_data, cached, tokenizer)[1] for _ in range(args.repeat))
    assert build_sft_data(cached, tokenizer).stats.from_cache

    # --- training: the 240 demo rows, same model, LoRA, learning rate, epochs, rows per step;
    # every seed trains both workflows back to back, so a busy machine slows both alike
    train_rows = demo[:args.train_rows]
    train_file = benchkit.write_jsonl(work / "train.jsonl", train_rows)
    source_ds = source_preprocess(train_rows, tokenizer)
    unpacked = build_sft_data(lora_recipe(base, train_file, work / "x", 1, work / "cache").data, tokenizer).train
    sup_source = supervised_tokens(source_ds) * args.epochs
    sup_lora = supervised_tokens(unpacked) * args.epochs
    # The source trains without BOS but its generate code tokenises the prompt with BOS
    # (add_special_tokens defaults to True): its loss on the rows as inference will present them.
    source_as_asked = [{"input_ids": [tokenizer.bos_token_id] + e["input_ids"], "labels": [-100] + e["labels"]}
                       for e in source_ds]
    runs = {"source": [], "lora": []}  # (supervised tokens/s, final loss) per seed
    as_asked = []
    for seed in args.seeds:
        source_model, runtime = source_train(source_ds, tokenizer, work / f"source-{seed}", args.epochs, seed, base)
        runs["source"].append((sup_source / runtime, mean_supervised_loss(source_model, list(source_ds), tokenizer.pad_token_id)))
        as_asked.append(mean_supervised_loss(source_model, source_as_asked, tokenizer.pad_token_id))
        recipe = lora_recipe(base, train_file, work / f"lora-{seed}", args.epochs, work / "cache", packing=True)
        recipe.train.seed = seed
        _, runtime = lora_train(recipe)
        model = trained_adapter(work / f"lora-{seed}", base)
        runs["lora"].append((sup_lora / runtime, mean_supervised_loss(model, list(unpacked), tokenizer.pad_token_id)))
    # speed: the best run (other work on a shared machine only ever adds time); loss: the mean
    mean = {k: (max(t for t, _ in v), statistics.mean(loss for _, loss in v)) for k, v in runs.items()}
    (src_tps, source_loss), (lora_tps, lora_loss) = mean["source"], mean["lora"]
    per_seed = "; ".join(f"seed {seed}: {a[1]:.4f} vs {b[1]:.4f}" for seed, a, b in zip(args.seeds, runs["lora"], runs["source"]))

    rows = [
        ("source workflow (Dataset.map per row; Trainer + DataCollatorForSeq2Seq, batch 1 x accum 8)",
         args.rows / t_source, src_tps, source_loss),
        ("lora train (batched tokenisation; packing, 2 packs/step)", args.rows / t_lora, lora_tps, lora_loss),
        ("lora train, second run (tokenised data from cache)", args.rows / t_cached, None, None),
    ]
    print(f"tiny-llama, {len(train_rows)} demo rows x {args.epochs} epochs for training (seeds {args.seeds}: best speed, "
          f"mean loss), "
          f"{args.rows} distinct rows for preprocessing (best of {args.repeat}), {benchkit.cpus_and_load()}"
          f"{benchkit.quick_note(args)}")
    asked = {0: statistics.mean(as_asked), 1: lora_loss}
    print("| workflow | preprocessing rows/s | training supervised tokens/s | final loss | loss on rows as inference asks (BOS) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for i, (name, pre, tps, loss) in enumerate(rows):
        cells = [f"{pre:,.0f}", "" if tps is None else f"{tps:,.0f}", "" if loss is None else f"{loss:.4f}",
                 f"{asked[i]:.4f}" if i in asked else ""]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"preprocessing speed-up {t_source / t_lora:.1f}x cold, {t_source / t_cached:.0f}x cached (target >= 5x); "
          f"training speed-up {lora_tps / src_tps:.2f}x (target >= 1.3x); final loss {lora_loss:.4f} vs {source_loss:.4f} "
          f"({per_seed})")


def report_memory(args, demo: list[dict], work: Path) -> None:
    if args.memory_sizes:
        print(f"data path memory ({benchkit.cpus_and_load()}; goal: peak <= 2x the file "
              f"at 200 MB and flat beyond){benchkit.quick_note(args)}")
        print_memory(measure_memory(args.memory_sizes, demo, work, args.model))


if __name__ == "__main__":
    sys.exit(main())
