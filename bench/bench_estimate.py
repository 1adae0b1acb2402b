"""`lora estimate` on real model shapes: how long it takes from config alone, and what it says.

Run by `make bench` (after models/tiny-llama exists) or alone:
    python bench/bench_estimate.py
Config-only: the 7B/8B/0.5B shapes below are written as config.json files and built on the
meta device, so this needs no hub access and no GPU. It measures the estimate's own wall time;
the memory columns are the estimate's arithmetic, not measurements (see docs/benchmarks.md).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def model_folders(tmp: Path) -> dict[str, Path]:
    folders = {"tiny-llama": REPO / "models" / "tiny-llama"}
    for name, config in SHAPES.items():
        folder = tmp / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders


def main() -> None:
    from lora_cli.train.estimate import GiB, estimate_recipe
    from lora_cli.recipe.schema import recipe_from_dict

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in model_folders(Path(tmp)).items():
            if not (folder / "config.json").is_file():
                print(f"skip {name}: {folder} missing (make tiny)")
                continue
            for quant in ("none", "4bit"):
                raw = {"model": {"name_or_path": str(folder), "quantization": quant},
                       "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
                       "data": {"path": str(REPO / "data" / "demo.jsonl"), "max_length": 1024},
                       "train": {"batch_size": 4},
                       "output_dir": str(Path(tmp) / "out")}
                recipe = recipe_from_dict(raw)
                start = time.perf_counter()
                est = estimate_recipe(recipe)
                seconds = time.perf_counter() - start
                m = est.memory
                rows.append((name, quant, est.params.total, est.params.trainable, est.params.adapter_bytes,
                             m.total / GiB, m.total_checkpointed / GiB, seconds))
    header = ("model", "quant", "params", "trainable (r16 all-linear)", "adapter MB",
              "GiB no ckpt", "GiB ckpt", "estimate s")
    print("batch 4 x 1024 tokens, bf16 compute, AdamW")
    print(" | ".join(header))
    for name, quant, total, trainable, nbytes, full, ckpt, seconds in rows:
        print(f"{name} | {quant} | {total / 1e9:.3f}B | {trainable:,d} | {nbytes / 1e6:.1f} | "
              f"{full:.2f} | {ckpt:.2f} | {seconds:.2f}")


if __name__ == "__main__":
    main()
