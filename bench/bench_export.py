"""`lora export` cost: wall time and file size per format and dtype.

    python bench/bench_export.py --quick     (tiny-llama only, f16 and q8_0: proves the script runs)
    python bench/bench_export.py             (make bench: tiny-llama, every dtype and format)
    python bench/bench_export.py --larger    (adds a random 8-layer, 512-wide Llama, ~30M parameters)

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
MODEL = REPO / "models" / "tiny-llama"
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_larger(out: Path, tiny: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def random_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, lora_alpha=32, target_modules=LINEAR, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, f16 and q8_0 only")
    parser.add_argument("--larger", action="store_true", help="also a random ~30M-parameter Llama")
    parser.add_argument("--model", type=Path, default=MODEL, help="the tiny base (default: models/tiny-llama)")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        sys.exit(f"{args.model} is missing: run `make tiny` first")
    from lora_cli.export import export

    runs = [("gguf", d) for d in (("f16", "q8_0") if args.quick else ("f32", "f16", "bf16", "q8_0"))]
    if not args.quick:
        runs += [("gguf-adapter", "f32"), ("gguf-adapter", "f16"), ("ollama", "f16")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"tiny-llama": args.model}
        if args.larger:
            models["llama-8x512"] = build_larger(tmp / "larger", args.model)
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
