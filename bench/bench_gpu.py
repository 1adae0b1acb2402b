"""The GPU training path, measured: the source workflow by hand and `lora train` variants on
random-weight models of real shapes, with tokens/s, MFU, peak memory and `lora estimate`.

    python bench/bench_gpu.py                              (on a GPU box: 8B and 1B shapes, seq 4096)
    python bench/bench_gpu.py --shapes llama3-8b --seq 4096 --steps 20
    python bench/bench_gpu.py --shapes toy --seq 64 --steps 2      (CPU, toy size: proves it runs; a test does this)

Models are built here, from config shapes alone (no hub): `llama3-8b` (Llama-3-8B: 32 layers,
hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256), `llama-1b` (Llama-3.2-1B: 16
layers, hidden 2048, MLP 8192, 32 / 8 heads, vocab 128256, tied embeddings) and `toy` (2 layers,
hidden 128). Weights are random (speed and memory do not depend on their values); the tokenizer
is a byte-level BPE trained here on data/demo.jsonl (token ids only index the embedding, so its
small vocabulary changes nothing but the text). Built models are kept under --work for reruns.

Data: --steps x 8 alpaca rows whose lengths are drawn uniformly between --seq/4 and --seq tokens
(cut at --seq), one epoch, so every variant sees exactly the same rows and its token counts are
exact. LoRA r=16, alpha=32, dropout 0, every linear layer, peft's default init; lr 3e-3.

Variants (each trains in this process, one after another; Liger last, since it patches
transformers' Llama code for the rest of the process):
  source         the source workflow by hand: Dataset.map per row, Trainer + DataCollatorForSeq2Seq,
                 batch 1 x accumulation 8, bf16 on a GPU, transformers' default attention (sdpa)
  defaults       `lora train` with no batching key set (lora_cli.batching chooses)
  packing        + data.packing: true
  checkpointing  + train.gradient_checkpointing: true
  qlora          + model.quantization: 4bit (CUDA only here)
  liger          + train.kernels: liger (CUDA and liger-kernel only)
A variant that cannot run on this machine is skipped with its reason in the table.

Measured per variant: tokens/s (every non-padding token the optimizer saw / Trainer
train_runtime, which includes the first, slower steps of each run), supervised tokens/s, peak
memory (torch.cuda.max_memory_allocated, reset before each variant), and `lora estimate`'s
total for the same recipe (the checkpointed total where checkpointing is on).

MFU = model FLOPs / (train_runtime x the card's peak dense bf16 FLOP/s), with model FLOPs:
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

Writes --out/bench_gpu.json and --out/bench_gpu.md, and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import bench_data  # noqa: E402  (the source workflow by hand lives there)

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    # dims multiples of 64, which bitsandbytes' 4-bit kernels need; vocab = the tokenizer's
    "toy": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=None, tie_word_embeddings=False),
}
VARIANTS = ("source", "defaults", "packing", "checkpointing", "qlora", "liger")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "init": "kaiming"}
ROWS_PER_STEP = 8
VARIANT_KEYS = {  # what each variant writes into the recipe, section by section
    "source": [("data", {"packing": False}), ("train", {"batch_size": 1, "gradient_accumulation": 8})],
    "packing": [("data", {"packing": True})],
    "checkpointing": [("train", {"gradient_checkpointing": True})],
    "qlora": [("model", {"quantization": "4bit"})],
    "liger": [("train", {"kernels": "liger"})],
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.05, "A10G": 70.0}


# --------------------------------------------------------------------------- models and data

def bench_tokenizer():
    from lora_cli.tiny import corpus_from_rows, train_tokenizer

    tokenizer = train_tokenizer(corpus_from_rows(bench_data.read_jsonl(bench_data.DATA)), 2048)
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
    demo = bench_data.read_jsonl(bench_data.DATA)
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
    if variant == "qlora" and not cuda:
        return "4-bit QLoRA is measured on a CUDA GPU only (bitsandbytes' CPU path says nothing about it)"
    if variant == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'lora-cli[quant]')"
    return None


def variant_recipe(variant: str, model: Path, data: Path, out: Path, seq: int, cache: Path):
    """The `lora train` recipe of a variant; `source` gets the recipe that describes the source
    workflow (batch 1 x 8, no packing), which only the estimate reads."""
    from lora_cli.recipe import recipe_from_dict

    raw = {"model": {"name_or_path": str(model)}, "lora": dict(LORA),
           "data": {"path": str(data), "max_length": seq, "cache_dir": str(cache)},
           "train": {"epochs": 1, "learning_rate": bench_data.LR, "warmup_steps": 5, "logging_steps": 1,
                     "save_steps": 100_000},  # no checkpoint inside the timed loop
           "output_dir": str(out)}
    for section, values in VARIANT_KEYS.get(variant, []):
        raw[section].update(values)
    return recipe_from_dict(raw)


def predicted_bytes(recipe) -> int:
    from lora_cli.estimate import estimate_recipe

    memory = estimate_recipe(recipe).memory
    return memory.total_checkpointed if recipe.train.gradient_checkpointing else memory.total


def run_variant(variant: str, recipe, rows: list[dict], tokenizer, work: Path) -> dict:
    """Train one variant; returns runtime, token counts, final loss."""
    import torch

    from lora_cli.data import build_sft_data

    if variant == "source":
        dataset = bench_data.source_preprocess(rows, tokenizer, recipe.data.max_length)
        cuda = torch.cuda.is_available()
        _, runtime = bench_data.source_train(dataset, tokenizer, work / "source", 1, 0, Path(recipe.model.name_or_path),
                                             dtype="bfloat16" if cuda else "float32", bf16=cuda)
        lengths = [len(ids) for ids in dataset["input_ids"]]
        supervised = bench_data.supervised_tokens(dataset)
        loss = None
    else:
        result, runtime = bench_data.lora_train(recipe)
        train = build_sft_data(recipe.data, tokenizer).train  # from the cache the run wrote
        lengths = [len(ids) for ids in (_examples_of(train))]
        supervised = bench_data.supervised_tokens(train)
        loss = result.final_loss
    return {"runtime_s": runtime, "lengths": lengths, "supervised_tokens": supervised, "final_loss": loss}


def _examples_of(train) -> list[list[int]]:
    """Each example's ids, packs split at their restarting positions."""
    from lora_cli.data import split_pack

    return [piece["input_ids"] for row in train for piece in split_pack(row)]


def measure(variant: str, shape: str, model: Path, rows: list[dict], data: Path, tokenizer, args, peak) -> dict:
    import torch

    work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-{shape}-{variant}-", dir=args.work))
    recipe = variant_recipe(variant, model, data, work / "run", args.seq, args.work / "cache")
    record = {"shape": shape, "variant": variant}
    reason = skip_reason(variant)
    if reason:
        return {**record, "skipped": reason}
    record["estimate_bytes"] = predicted_bytes(recipe)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run = run_variant(variant, recipe, rows, tokenizer, work)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    tokens = sum(run["lengths"])
    flops = training_flops(config, LORA["r"], run["lengths"])
    record.update(
        tokens=tokens, supervised_tokens=run["supervised_tokens"], runtime_s=round(run["runtime_s"], 3),
        tokens_per_s=tokens / run["runtime_s"], supervised_tokens_per_s=run["supervised_tokens"] / run["runtime_s"],
        model_tflops=flops / 1e12, mfu=(flops / run["runtime_s"] / peak) if peak else None,
        peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        final_loss=run["final_loss"])
    _free()
    return record


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report

def markdown(records: list[dict], header: str) -> str:
    gib = 1 << 30
    lines = [header, "",
             "| shape | variant | tokens/s | supervised tokens/s | vs source | MFU | peak GiB | estimate GiB | estimate / peak | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    source = {r["shape"]: r for r in records if r["variant"] == "source" and "skipped" not in r}
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | | | | | | | | skipped: {r['skipped']} |")
            continue
        base = source.get(r["shape"])
        ratio = f"{r['supervised_tokens_per_s'] / base['supervised_tokens_per_s']:.2f}x" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        peak = f"{r['peak_bytes'] / gib:.2f}" if r["peak_bytes"] is not None else "n/a"
        est = f"{r['estimate_bytes'] / gib:.2f}"
        vs = f"{r['estimate_bytes'] / r['peak_bytes']:.2f}" if r["peak_bytes"] else "n/a"
        loss = f"final loss {r['final_loss']:.3f}" if r["final_loss"] is not None else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {r['supervised_tokens_per_s']:,.0f} | "
                     f"{ratio} | {mfu} | {peak} | {est} | {vs} | {loss} |")
    return "\n".join(lines) + "\n"


def warm_up(tokenizer, args) -> None:
    """One untimed step of both workflows on the toy shape: imports, the CUDA context and the
    allocator are paid for here, not by whichever variant happens to run first."""
    model = build_model("toy", tokenizer, args.work / "model-toy", 64)
    rows = bench_rows(tokenizer, 64, ROWS_PER_STEP, seed=1)
    data = args.work / "rows-warm-up.jsonl"
    bench_data_write(rows, data)
    for variant in ("source", "defaults"):
        work = Path(tempfile.mkdtemp(prefix=f"bench-gpu-warm-up-{variant}-", dir=args.work))
        run_variant(variant, variant_recipe(variant, model, data, work / "run", 64, args.work / "cache"), rows,
                    tokenizer, work)
    _free()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, of: {', '.join(SHAPES)}; default llama3-8b,llama-1b on a GPU, "
                             "toy on a CPU (where `make bench` must not build an 8B model)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--seq", type=int, default=4096, help="data.max_length; rows are seq/4 to seq tokens")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per variant (x 8 rows)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's peak dense bf16 TFLOP/s")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora-bench-gpu",
                        help="built models and run folders (models are reused)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed toy-size warm-up run")
    parser.add_argument("--out", type=Path, default=Path("bench-gpu-results"), help="where the JSON and markdown go")
    args = parser.parse_args(argv)
    if args.shapes is None:
        import torch

        if torch.cuda.is_available():
            args.shapes = "llama3-8b,llama-1b"
        else:
            print("no CUDA GPU: toy shape, sequence 64, 2 steps (pass --shapes to insist)")
            args.shapes, args.seq, args.steps = "toy", 64, 2
    args.shapes = args.shapes.split(",")
    args.variants = args.variants.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown shape or variant: {', '.join(unknown)}")
    args.variants = [v for v in VARIANTS if v in args.variants]  # liger last, whatever the order given
    return args


def main(argv=None) -> int:
    import torch

    from lora_cli.libraries import quiet_libraries

    args = parse_args(argv)
    quiet_libraries()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    peak, peak_note = peak_flops(args.peak_tflops)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    tokenizer = bench_tokenizer()
    if not args.no_warmup:
        warm_up(tokenizer, args)
    records = []
    for shape in args.shapes:
        model = build_model(shape, tokenizer, args.work / f"model-{shape}", args.seq)
        rows = bench_rows(tokenizer, args.seq, args.steps * ROWS_PER_STEP)
        data = args.work / f"rows-{shape}-{args.seq}-{args.steps}.jsonl"
        bench_data_write(rows, data)
        for variant in args.variants:
            record = measure(variant, shape, model, rows, data, tokenizer, args, peak)
            print(json.dumps(record), flush=True)
            records.append(record)
    header = (f"bench_gpu.py --shapes {','.join(args.shapes)} --seq {args.seq} --steps {args.steps}; device: {device}; "
              f"peak: {peak_note}; torch {torch.__version__}; LoRA r=16 all-linear; {args.steps * ROWS_PER_STEP} rows "
              f"of {args.seq // 4}-{args.seq} tokens, 1 epoch")
    table = markdown(records, header)
    (args.out / "bench_gpu.json").write_text(json.dumps({"header": header, "records": records}, indent=2), encoding="utf-8")
    (args.out / "bench_gpu.md").write_text(table, encoding="utf-8")
    print(table)
    return 0


def bench_data_write(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
