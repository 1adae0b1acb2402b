"""`lora export` cost: wall time and file size per format and dtype.

    python bench/bench_export.py --quick     (tiny-llama only, f16 and q8_0: proves the script runs)
    python bench/bench_export.py             (make bench: tiny-llama, every dtype and format)
    python bench/bench_export.py --larger    (adds the random 8-layer, 512-wide Llama of bench_generate.py, 25.7M parameters)

The adapter is LoRA r=16 on every linear layer with random, non-zero A and B. Each export is
timed end to end as the command runs it (load the base in float32, merge, convert, write), once:
on a shared machine a figure is an upper bound. Printed: a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_generate import MODEL, build_larger, random_adapter  # noqa: E402  (one builder for every benchmark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, f16 and q8_0 only")
    parser.add_argument("--larger", action="store_true", help="also the random 25.7M-parameter Llama")
    parser.add_argument("--model", type=Path, default=MODEL, help="the tiny base (default: models/tiny-llama)")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is missing: run `make tiny` first")
    from lora_cli.export.gguf import export

    runs = [("gguf", d) for d in (("f16", "q8_0") if args.quick else ("f32", "f16", "bf16", "q8_0"))]
    if not args.quick:
        runs += [("gguf-adapter", "f32"), ("gguf-adapter", "f16"), ("ollama", "f16")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"tiny-llama": args.model}
        if args.larger:
            models["llama-8x512"] = build_larger(tmp / "larger")
        print("| model | format | dtype | export wall s | file size |")
        print("| --- | --- | --- | --- | --- |")
        for label, base in models.items():
            adapter = random_adapter(base, tmp / f"{label}-adapter")
            for fmt, dtype in runs:
                out = tmp / f"{label}-{fmt}-{dtype}" / ("out" if fmt == "ollama" else "out.gguf")
                start = time.perf_counter()
                export(adapter, out, format=fmt, dtype=dtype, log=lambda *_: None)
                seconds = time.perf_counter() - start
                size = sum(p.stat().st_size for p in (out.iterdir() if out.is_dir() else [out]))
                print(f"| {label} | {fmt} | {dtype} | {seconds:.2f} | {size / 2**20:.2f} MiB |", flush=True)


if __name__ == "__main__":
    main()
