"""`lora estimate` on real model shapes: how long it takes from config alone, and what it says.

Run by `make bench` (after models/tiny-llama exists) or alone:
    python bench/bench_estimate.py
    python bench/bench_estimate.py --quick    (tiny-llama and the 0.5B shape: proves it runs)
Config-only: the 7B/8B/0.5B shapes below are written as config.json files and built on the
meta device, so this needs no hub access and no GPU. It measures the estimate's own wall time;
the memory columns are the estimate's arithmetic, not measurements (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import benchkit

SHAPES = {
    "Llama-2-7B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False},
    "Llama-3-8B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "Qwen2.5-0.5B": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                     "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
                     "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
}


QUICK_SHAPES = ("Qwen2.5-0.5B",)
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}  # dropout left to the schema's default


def model_folders(tmp: Path, tiny: Path, shapes) -> dict[str, Path]:
    folders = {"tiny-llama": tiny}
    for name in shapes:
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(SHAPES[name]))
        folders[name] = folder
    return folders


def main() -> int:
    args = benchkit.arguments(__doc__.splitlines()[0], "tiny-llama and the Qwen2.5-0.5B shape only").parse_args()
    from lora_cli.train.estimate import GiB, estimate_recipe

    rows = []
    with benchkit.scratch("bench-estimate-") as tmp:
        for name, folder in model_folders(tmp, args.model, QUICK_SHAPES if args.quick else SHAPES).items():
            if not (folder / "config.json").is_file():
                print(f"skip {name}: {folder} missing (make tiny)")
                continue
            for quant in ("none", "4bit"):
                recipe = benchkit.recipe(folder, benchkit.DATA, tmp / "out", lora=LORA,
                                         model={"quantization": quant}, data={"max_length": 1024},
                                         train={"batch_size": 4})
                est, seconds = benchkit.timed(estimate_recipe, recipe)
                m = est.memory
                rows.append((name, quant, est.params.total, est.params.trainable, est.params.adapter_bytes,
                             m.total / GiB, m.total_checkpointed / GiB, seconds))
    header = ("model", "quant", "params", "trainable (r16 all-linear)", "adapter MB",
              "GiB no ckpt", "GiB ckpt", "estimate s")
    print("batch 4 x 1024 tokens, bf16 compute, AdamW" + benchkit.quick_note(args))
    print(" | ".join(header))
    for name, quant, total, trainable, nbytes, full, ckpt, seconds in rows:
        print(f"{name} | {quant} | {total / 1e9:.3f}B | {trainable:,d} | {nbytes / 1e6:.1f} | "
              f"{full:.2f} | {ckpt:.2f} | {seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
