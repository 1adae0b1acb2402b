"""The GPU training path, measured: the source workflow by hand and `lora train` variants on
random-weight models of real shapes, with steady-state tokens/s, MFU, peak memory and
`lora estimate`'s prediction.

    python bench/bench_gpu.py                              (on a GPU box: 8B and 1B shapes, seq 4096)
    python bench/bench_gpu.py --shapes llama3-8b --seq 4096 --steps 12
    python bench/bench_gpu.py --quick                      (toy shape, seq 32, 3 steps: proves it runs; a test does this)
    bench/gpu_check.sh                                     (the user path on CUDA, then this table, into docs/benchmarks.md)

Models are built here, from config shapes alone (no hub): `llama3-8b` (Llama-3-8B: 32 layers,
hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256), `llama-1b` (Llama-3.2-1B: 16
layers, hidden 2048, MLP 8192, 32 / 8 heads, vocab 128256, tied embeddings) and `toy` (2 layers,
hidden 128). Weights are random (speed and memory do not depend on their values); the tokenizer
is a byte-level BPE trained here on data/demo.jsonl (token ids only index the embedding, so its
small vocabulary changes nothing but the text). Built models are kept under --work for reruns.

Data: --steps x 8 alpaca rows whose lengths are drawn uniformly between --seq/4 and --seq tokens
(cut at --seq), one epoch, so every variant sees exactly the same rows. LoRA r=16, alpha=32,
dropout 0, every linear layer, peft's default init; lr 3e-3.

Variants, each in its own process (a fresh CUDA context and allocator, and Liger's patching of
transformers' Llama code stays in its own process):
  source         the source workflow by hand: Dataset.map per row, Trainer + DataCollatorForSeq2Seq,
                 batch 1 x accumulation 8, bf16 on a GPU, transformers' default attention (sdpa)
  defaults       `lora train` with no batching or kernel key set (lora_cli.data.batching and
                 lora_cli.model.kernels choose)
  packing        + data.packing: true
  checkpointing  + train.gradient_checkpointing: true
  qlora          + model.quantization: 4bit (CUDA only here)
  qlora-paper    + 4bit, checkpointing, paged_adamw_8bit, lora.adapter_dtype bfloat16 (the QLoRA paper's setting)
  liger          + train.kernels: liger (CUDA and liger-kernel only)
A variant that cannot run on this machine is skipped with its reason in the table.

Timing: a TrainerCallback synchronises the device at the end of every optimizer step and
records its wall time and the tokens its forward passes saw (read from the batches
themselves). The first --warmup-steps steps (CUDA context, cuBLAS / Triton autotuning, flex
attention's compilation, allocator growth) are reported apart, as is the start-up (load,
data, model build before the first step); tokens/s and MFU are over the remaining, steady
steps only. Every step's time is printed. The attention kernel the model really ran
(config._attn_implementation) and lora's `batches` line are recorded.

Measured per variant: steady tokens/s and supervised tokens/s, MFU, peak memory
(torch.cuda.max_memory_allocated of the variant's process), and `lora estimate`'s total for the
same recipe and the batch shape the run used (the checkpointed total where checkpointing is on).

MFU = model FLOPs / (steady time x the card's peak dense bf16 FLOP/s), with model FLOPs:
  per token:    4 x N_linear            (frozen base: forward 2N, backward 2N for input gradients only,
                                         no weight gradients; N_linear = every linear weight of
                                         every layer plus lm_head, embeddings excluded)
              + 6 x sum over adapted layers of r x (d_in + d_out)
                                        (LoRA A and B: forward 2, input grads 2, weight grads 2)
  per sequence of L tokens, per layer:  6 x q_dim x L x (L + 1)
                                        (causal QK^T and AV, only the unmasked half: forward
                                         2 x 2 x q_dim x L(L+1)/2, backward twice that)
Recomputation under gradient checkpointing is not counted (MFU, not hardware FLOPs
utilisation), nor are padding tokens: a padded batch scores lower for the work it wastes.
Peak FLOP/s: --peak-tflops, else a table by card name (H100/H200 989 TFLOP/s dense bf16, A100
312, L40S 362); on a CPU, MFU is not given.

Writes --out/bench_gpu.json and --out/bench_gpu.md (--doc also replaces the table between
the GPU-table markers of docs/benchmarks.md), and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests, which import this file by its path

import bench_data  # noqa: E402  (the source workflow by hand lives there)
import benchkit  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    # dims multiples of 64, which bitsandbytes' 4-bit kernels need; vocab = the tokenizer's
    "toy": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False),
}
VARIANTS = ("source", "defaults", "packing", "checkpointing", "qlora", "qlora-paper", "liger")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "init": "kaiming"}
ROWS_PER_STEP = 8
VARIANT_KEYS = {  # what each variant writes into the recipe, section by section
    "source": [("data", {"packing": False}), ("train", {"batch_size": 1, "gradient_accumulation": 8})],
    "packing": [("data", {"packing": True})],
    "checkpointing": [("train", {"gradient_checkpointing": True})],
    "qlora": [("model", {"quantization": "4bit"})],
    "qlora-paper": [("model", {"quantization": "4bit"}), ("lora", {"adapter_dtype": "bfloat16"}),
                    ("train", {"gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"})],
    "liger": [("train", {"kernels": "liger"})],
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 70.0}


# --------------------------------------------------------------------------- models and data

def bench_tokenizer():
    from lora_cli.tiny.decoder import corpus_from_rows, train_tokenizer

    tokenizer = train_tokenizer(corpus_from_rows(benchkit.read_jsonl(benchkit.DATA)), 2048)
    tokenizer.pad_token = tokenizer.eos_token  # as lora's load_tokenizer does; the by-hand collator needs one
    return tokenizer


def build_model(shape: str, tokenizer, out: Path, seq: int) -> Path:
    """A random-weight Llama of the named shape with the bench tokenizer, saved to `out` (reused
    when already there). Built on the GPU in bf16 when there is one: an 8B model initialised on
    a CPU takes many minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or len(tokenizer)
    config = LlamaConfig(**dims, max_position_embeddings=max(seq, 8192), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    del model
    _free()
    os.replace(tmp, out)
    return out


def bench_rows(tokenizer, seq: int, count: int, seed: int = 0) -> list[dict]:
    """`count` alpaca rows of about U(seq/4, seq) tokens: demo instructions, answers made of demo
    answers strung together (lengths counted once per demo answer, so building stays quick)."""
    demo = benchkit.read_jsonl(benchkit.DATA)
    answers = [(r["output"], len(tokenizer(r["output"], add_special_tokens=False)["input_ids"])) for r in demo]
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        target, text, n = rng.randint(max(8, seq // 4), seq), [], 0
        while n < target:
            answer, length = answers[rng.randrange(len(answers))]
            text.append(answer)
            n += length + 1
        base = demo[i % len(demo)]
        rows.append({"instruction": base["instruction"], "input": base.get("input", ""), "output": "\n".join(text)})
    return rows


# --------------------------------------------------------------------------- FLOPs

def linear_weights(config) -> int:
    """N_linear of the MFU formula: q, k, v, o, gate, up, down of every layer, plus lm_head."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * inter
    return layers * per_layer + h * config.vocab_size


def lora_width(config, rank: int) -> int:
    """sum over adapted layers of r x (d_in + d_out), all-linear (lm_head is not adapted)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h + q_dim) * 2 + (h + kv_dim) * 2 + (h + inter) * 3
    return layers * rank * per_layer


def training_flops(config, rank: int, lengths: list[int]) -> float:
    """Model FLOPs of one pass of training over sequences of these lengths (formula above)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_dim = config.num_attention_heads * head_dim
    tokens = sum(lengths)
    per_token = 4 * linear_weights(config) + 6 * lora_width(config, rank)
    attention = sum(6 * q_dim * n * (n + 1) for n in lengths) * config.num_hidden_layers
    return float(per_token * tokens + attention)


def peak_flops(explicit_tflops: float | None) -> tuple[float | None, str]:
    import torch

    if explicit_tflops:
        return explicit_tflops * 1e12, f"{explicit_tflops} TFLOP/s (--peak-tflops)"
    if not torch.cuda.is_available():
        return None, "CPU: no peak figure, MFU not given"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops} TFLOP/s dense bf16"
    return None, f"{name}: peak unknown, pass --peak-tflops"


# --------------------------------------------------------------------------- variants

def skip_reason(variant: str) -> str | None:
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    if variant == "liger" and not cuda:
        return "Liger's Triton kernels need a CUDA GPU"
    if variant == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'lora-cli[liger]')"
    if variant.startswith("qlora") and not cuda:
        return "4-bit QLoRA is measured on a CUDA GPU only (bitsandbytes' CPU path says nothing about it)"
    if variant.startswith("qlora") and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'lora-cli[quant]')"
    return None


def variant_recipe(variant: str, model: Path, data: Path, out: Path, seq: int, cache: Path):
    """The `lora train` recipe of a variant; `source` gets the recipe that describes the source
    workflow (batch 1 x 8, no packing), which only the estimate reads."""
    sections = {"model": {}, "lora": dict(LORA), "data": {"max_length": seq, "cache_dir": str(cache)},
                "train": {"epochs": 1, "learning_rate": bench_data.LR, "warmup_steps": 5, "logging_steps": 1,
                          "save_steps": 100_000}}  # no checkpoint inside the timed loop
    for section, values in VARIANT_KEYS.get(variant, []):
        sections[section].update(values)
    return benchkit.recipe(model, data, out, lora=sections.pop("lora"), **sections)


def predicted_bytes(recipe) -> int:
    from lora_cli.train.estimate import estimate_recipe

    memory = estimate_recipe(recipe).memory
    return memory.total_checkpointed if recipe.train.gradient_checkpointing else memory.total


class StepTimer:
    """TrainerCallback (built lazily: transformers is imported in the child only) timing every
    optimizer step, device synchronised, and counting what its forward passes saw."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _StepTimer(TrainerCallback):
            def __init__(self):
                self.steps: list[dict] = []
                self.pending: list[dict] = []
                self.attention = None
                self.shape = None
                self.began = None
                self._last = None

            def on_train_begin(self, args, state, control, model=None, **kwargs):
                from lora_cli.model.load import attention_in_use

                self.attention = attention_in_use(model)
                self.shape = (args.per_device_train_batch_size, args.gradient_accumulation_steps)
                model.register_forward_pre_hook(self._saw, with_kwargs=True)
                self.began = self._last = _synchronised_now()

            def _saw(self, module, args, kwargs):
                if module.training:
                    self.pending.append({k: kwargs.get(k) for k in ("input_ids", "attention_mask", "position_ids", "labels")})

            def on_step_end(self, args, state, control, **kwargs):
                seconds = _synchronised_now() - self._last
                lengths, supervised = _count(self.pending)
                self.pending = []
                self.steps.append({"s": seconds, "tokens": sum(lengths), "supervised": supervised, "lengths": lengths})
                print(f"  step {len(self.steps):3d}: {seconds:8.3f} s  {sum(lengths):6d} tokens", flush=True)
                self._last = _synchronised_now()  # counting is outside the next step's time

        return _StepTimer()


def _synchronised_now() -> float:
    import time

    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _count(batches: list[dict]) -> tuple[list[int], int]:
    """(sequence lengths, supervised tokens) of the forward passes of one step: rows cut by their
    attention mask, flattened and packed rows split where position_ids restart at 0."""
    lengths, supervised = [], 0
    for batch in batches:
        ids, mask, positions, labels = (batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels"))
        if labels is not None:
            supervised += int((labels != -100).sum())
        for row in range(ids.shape[0]):
            valid = int(mask[row].sum()) if mask is not None and mask.dim() == 2 else ids.shape[1]
            if positions is None:
                lengths.append(valid)
                continue
            starts = (positions[row, :valid] == 0).nonzero().flatten().tolist() + [valid]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
    return lengths, supervised


def run_variant(variant: str, recipe, rows: list[dict], tokenizer, work: Path, timer) -> dict:
    """Train one variant with the step timer; returns the final loss and lora's batches line."""
    import torch

    if variant == "source":
        dataset = bench_data.source_preprocess(rows, tokenizer, recipe.data.max_length)
        cuda = torch.cuda.is_available()
        bench_data.source_train(dataset, tokenizer, work / "source", 1, 0, Path(recipe.model.name_or_path),
                                dtype="bfloat16" if cuda else "float32", bf16=cuda, callbacks=[timer])
        return {"final_loss": None, "batches": "batch 1 x accumulation 8, padded rows (by hand)"}
    from rich.console import Console

    from lora_cli.train import run as train_module

    console = Console(record=True, width=400, file=open(os.devnull, "w"))
    result = train_module.run_training(recipe, overwrite=True, console=console, callbacks=[timer])
    batches = next((line.split("batches", 1)[1].strip() for line in console.export_text().splitlines()
                    if line.startswith("batches")), None)
    return {"final_loss": result.final_loss, "batches": batches}


def steady(steps: list[dict], warmup: int) -> tuple[list[dict], list[dict]]:
    """(warm-up steps, steady steps); at least one steady step when there is more than one."""
    warmup = min(warmup, max(0, len(steps) - 1))
    return steps[:warmup], steps[warmup:]


def measure(variant: str, shape: str, model: Path, data: Path, tokenizer, args) -> dict:
    """One variant, in this (child) process."""
    import dataclasses

    import torch

    started = time.perf_counter()
    record = {"shape": shape, "variant": variant, "seq": args.seq}
    reason = skip_reason(variant)
    if reason:
        return {**record, "skipped": reason}
    work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{shape}-{variant}-", dir=args.work))
    recipe = variant_recipe(variant, model, data, work / "run", args.seq, args.work / "cache")
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    timer = StepTimer()
    run = run_variant(variant, recipe, rows, tokenizer, work, timer)
    first, rest = steady(timer.steps, args.warmup_steps)
    if variant != "source" and timer.shape and recipe.train.batch_size is None:
        # the estimate of the batch shape the run used (the token budget may be sized on the card)
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(
            recipe.train, tokens_per_batch=timer.shape[0] * recipe.data.max_length))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    seconds = sum(s["s"] for s in rest)
    lengths = [n for s in rest for n in s["lengths"]]
    tokens, supervised = sum(lengths), sum(s["supervised"] for s in rest)
    flops = training_flops(config, LORA["r"], lengths)
    peak, peak_note = peak_flops(args.peak_tflops)
    cuda = torch.cuda.is_available()
    record.update(peak=peak_note, pid=os.getpid(),
        device=torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)", versions=benchkit.versions(),
        attention=timer.attention, batches=run["batches"], batch_shape=timer.shape,
        step_s=[round(s["s"], 4) for s in timer.steps], warmup_steps=len(first),
        startup_s=round(timer.began - started, 2) if timer.began else None,
        warmup_s=round(sum(s["s"] for s in first), 3), steady_steps=len(rest), steady_s=round(seconds, 3),
        tokens=tokens, supervised_tokens=supervised, tokens_per_s=tokens / seconds if seconds else None,
        supervised_tokens_per_s=supervised / seconds if seconds else None, model_tflops=flops / 1e12,
        mfu=(flops / seconds / peak) if peak and seconds else None,
        peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        estimate_bytes=predicted_bytes(recipe), final_loss=run["final_loss"])
    return record


# --------------------------------------------------------------------------- report

def markdown(records: list[dict], header: str) -> str:
    gib = 1 << 30
    lines = [header, "",
             "| shape | seq | variant | tokens/s | supervised tokens/s | vs source | MFU | peak GiB | estimate GiB "
             "| estimate / peak | attention | warm-up s | start-up s | note |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    source = {(r["shape"], r["seq"]): r for r in records if r["variant"] == "source" and r.get("tokens_per_s")}
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['seq']} | {r['variant']} | | | | | | | | | | | skipped: {r['skipped']} |")
            continue
        base = source.get((r["shape"], r["seq"]))
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base and r["tokens_per_s"] else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] is not None else "n/a"
        est = f"{r['estimate_bytes'] / gib:.2f}"
        vs = f"{r['estimate_bytes'] / r['peak_bytes']:.2f}" if r["peak_bytes"] else "n/a"
        note = f"{r['steady_steps']} steady steps; batches: {r['batches']}"
        if r["final_loss"] is not None:
            note += f"; final loss {r['final_loss']:.3f}"
        lines.append(f"| {r['shape']} | {r['seq']} | {r['variant']} | {r['tokens_per_s'] or 0:,.0f} | "
                     f"{r['supervised_tokens_per_s'] or 0:,.0f} | {ratio} | {mfu} | {peak} | {est} | {vs} | "
                     f"{r['attention']} | {r['warmup_s']:.1f} | {r['startup_s']} | {note} |")
    return "\n".join(lines) + "\n"


DOC_BEGIN = "<!-- bench_gpu table: begin (written by bench/bench_gpu.py --doc) -->"
DOC_END = "<!-- bench_gpu table: end -->"


def write_doc(doc: Path, table: str) -> None:
    """Replace the table between the markers of docs/benchmarks.md (added at the end if absent)."""
    benchkit.replace_marked_block(doc, DOC_BEGIN, DOC_END, table)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


QUICK_VARIANTS = "source,defaults,qlora,liger"  # by hand, lora train, and two that a CPU skips with their reason


def parse_args(argv=None):
    parser = benchkit.arguments(__doc__.splitlines()[0], f"the toy shape at seq 32, 3 steps (1 warm-up), variants "
                                f"{QUICK_VARIANTS} unless --variants", model=False)
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, of: {', '.join(SHAPES)}, each optionally :SEQ (llama3-8b:512); "
                             "default llama3-8b,llama-1b on a GPU, toy on a CPU (where `make bench` must not build "
                             "an 8B model)")
    parser.add_argument("--variants", default=None, help="comma-separated, of: " + ", ".join(VARIANTS) + " (default: all)")
    parser.add_argument("--seq", type=int, default=4096, help="data.max_length of a shape given without :SEQ; "
                        "rows are seq/4 to seq tokens")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per variant (x 8 rows)")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="first steps reported apart (context, autotuning, compilation), not in tokens/s or MFU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak dense bf16 TFLOP/s")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora-bench-gpu",
                        help="built models and run folders (models are reused)")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu-results"), help="where the JSON and markdown go")
    parser.add_argument("--doc", type=Path, default=None, help="also write the table into this markdown file "
                        "(between its bench_gpu markers), e.g. docs/benchmarks.md")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds since the epoch after which no variant starts (skipped: out of time)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="no run: join the bench_gpu.json of these --out folders into one table (with --doc)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one variant, or 'build'
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        if args.doc:
            parser.error("--quick never writes a doc: its figures mean nothing (leave out --doc)")
        args.shapes, args.steps, args.warmup_steps = "toy:32", 3, 1
        args.variants = args.variants or QUICK_VARIANTS
    args.variants = args.variants or ",".join(VARIANTS)
    if args.shapes is None:
        import torch

        if torch.cuda.is_available():
            args.shapes = "llama3-8b,llama-1b"
        else:
            print("no CUDA GPU: toy shape, sequence 64, 3 steps (pass --shapes to insist)")
            args.shapes, args.seq, args.steps = "toy", 64, 3
    args.runs = [(name.partition(":")[0], int(name.partition(":")[2] or args.seq)) for name in args.shapes.split(",")]
    args.shapes = [shape for shape, _ in args.runs]
    args.variants = args.variants.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown shape or variant: {', '.join(unknown)}")
    args.variants = [v for v in VARIANTS if v in args.variants]
    return args


def _paths(args, shape: str) -> tuple[Path, Path]:
    return args.work / f"model-{shape}", args.work / f"rows-{shape}-{args.seq}-{args.steps}.jsonl"


def child(args) -> int:
    """One job in a fresh process: 'build' (model and rows of each shape) or one variant."""
    from lora_cli.libraries import quiet_libraries

    quiet_libraries()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    tokenizer = bench_tokenizer()
    shape = args.shapes[0]
    model, data = _paths(args, shape)
    if args.child == "build":
        build_model(shape, tokenizer, model, args.seq)
        if not data.is_file():
            benchkit.write_jsonl(data, bench_rows(tokenizer, args.seq, args.steps * ROWS_PER_STEP))
        return 0
    record = measure(args.child, shape, model, data, tokenizer, args)
    args.record.write_text(json.dumps(record), encoding="utf-8")
    return 0


def _run_child(args, argv_base: list[str], job: str, shape: str, record: Path | None = None) -> int:
    command = [sys.executable, str(Path(__file__).resolve()), *argv_base, "--shapes", shape, "--child", job]
    if record is not None:
        command += ["--record", str(record)]
    return subprocess.run(command).returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        code = child(args)
        gc.freeze()  # the process ends here: teardown skips tracing torch's objects again (~1.3 s a child)
        return code
    if args.merge:
        return merge(args)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    base = ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--work", str(args.work),
            "--out", str(args.out)]
    if args.peak_tflops:
        base += ["--peak-tflops", str(args.peak_tflops)]
    records = []
    for shape, seq in args.runs:
        here = base + ["--seq", str(seq)]
        if _run_child(args, here, "build", shape) != 0:
            records += [{"shape": shape, "seq": seq, "variant": v, "skipped": "the model could not be built"}
                        for v in args.variants]
            continue
        for variant in args.variants:
            if args.deadline and time.time() > args.deadline:
                records.append({"shape": shape, "seq": seq, "variant": variant, "skipped": "out of time (--deadline)"})
                continue
            print(f"== {shape} seq {seq}: {variant}", flush=True)
            reason = skip_reason(variant)  # known before a process starts for it
            if reason:
                record = {"shape": shape, "seq": seq, "variant": variant, "skipped": reason}
            else:
                record_file = args.work / f"record-{shape}-{seq}-{variant}.json"
                record_file.unlink(missing_ok=True)
                code = _run_child(args, here, variant, shape, record_file)
                record = (json.loads(record_file.read_text(encoding="utf-8")) if code == 0 and record_file.is_file()
                          else {"shape": shape, "seq": seq, "variant": variant,
                                "skipped": f"failed (exit {code}; see its output above)"})
            print(json.dumps({k: v for k, v in record.items() if k not in ("versions",)}), flush=True)
            records.append(record)
    measured = next((r for r in records if "device" in r), {})
    versions = ", ".join(f"{k} {v}" for k, v in measured.get("versions", {}).items())
    header = (f"`bench_gpu.py --shapes {','.join(f'{s}:{q}' for s, q in args.runs)} --steps {args.steps} "
              f"--warmup-steps {args.warmup_steps}`, {time.strftime('%Y-%m-%d')}; device: {measured.get('device', 'n/a')}; "
              f"peak: {measured.get('peak', 'n/a')}; {versions}; LoRA r=16 all-linear; {args.steps * ROWS_PER_STEP} rows "
              f"of seq/4 to seq tokens per shape; tokens/s and MFU over the steps after the first "
              f"{args.warmup_steps}, each variant in its own process{benchkit.quick_note(args)}")
    table = markdown(records, header)
    (args.out / "bench_gpu.json").write_text(json.dumps({"header": header, "records": records}, indent=2), encoding="utf-8")
    (args.out / "bench_gpu.md").write_text(table, encoding="utf-8")
    if args.doc:
        write_doc(args.doc, table)
    print(table)
    return 0


def merge(args) -> int:
    """One table from several runs' bench_gpu.json (gpu_check.sh runs each shape's variants apart)."""
    runs = [json.loads((folder / "bench_gpu.json").read_text(encoding="utf-8")) for folder in args.merge]
    records = [r for run in runs for r in run["records"]]
    header = "\n\n".join(run["header"] for run in runs)
    table = markdown(records, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_gpu.json").write_text(json.dumps({"header": header, "records": records}, indent=2), encoding="utf-8")
    (args.out / "bench_gpu.md").write_text(table, encoding="utf-8")
    if args.doc:
        write_doc(args.doc, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
