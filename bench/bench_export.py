"""`lora export` cost: wall time and file size per format and dtype.

    python bench/bench_export.py --quick     (tiny-llama only, f16 and q8_0: proves the script runs)
    python bench/bench_export.py             (make bench: tiny-llama, every dtype and format)
    python bench/bench_export.py --larger    (adds the random 8-layer, 512-wide Llama of benchkit.build_larger, 25.7M parameters)

The adapter is LoRA r=16 on every linear layer with random, non-zero A and B. Each export is
timed end to end as the command runs it (load the base in float32, merge, convert, write), once:
on a shared machine a figure is an upper bound. Printed: a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import sys

import benchkit
from benchkit import build_larger, random_adapter


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0], "tiny-llama, gguf f16 and q8_0 only")
    parser.add_argument("--larger", action="store_true", help="also the random 25.7M-parameter Llama")
    args = parser.parse_args()
    benchkit.require_model(args.model)
    from lora_cli.export.gguf import export

    runs = [("gguf", d) for d in (("f16", "q8_0") if args.quick else ("f32", "f16", "bf16", "q8_0"))]
    if not args.quick:
        runs += [("gguf-adapter", "f32"), ("gguf-adapter", "f16"), ("ollama", "f16")]
    with benchkit.scratch("bench-export-") as tmp:
        models = {"tiny-llama": args.model}
        if args.larger and not args.quick:
            models["llama-8x512"] = build_larger(tmp / "larger", args.model)
        if args.quick:
            print(benchkit.QUICK_MARK)
        print("| model | format | dtype | export wall s | file size |")
        print("| --- | --- | --- | --- | --- |")
        for label, base in models.items():
            adapter = random_adapter(base, tmp / f"{label}-adapter")
            for fmt, dtype in runs:
                out = tmp / f"{label}-{fmt}-{dtype}" / ("out" if fmt == "ollama" else "out.gguf")
                _, seconds = benchkit.timed(export, adapter, out, format=fmt, dtype=dtype, log=lambda *_: None)
                size = benchkit.bytes_on_disk(out)
                print(f"| {label} | {fmt} | {dtype} | {seconds:.2f} | {size / 2**20:.2f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
