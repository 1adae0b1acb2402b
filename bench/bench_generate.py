"""Generation speed: the base, the base + LoRA adapter unmerged (what `lora chat/generate` run),
and the merged model (`lora merge`), greedy, on the same prompts.

    python bench/bench_generate.py                 (make bench runs it after `lora build-tiny`)
    python bench/bench_generate.py --larger --new-tokens 64 --repeats 5

The adapter is LoRA r=16 on every linear layer with random, non-zero A and B (training would
not change the speed, only the values). Every variant generates exactly --new-tokens tokens per
prompt (min_new_tokens = max_new_tokens, so an early EOS cannot flatter one of them). Variants
are timed round-robin, `--repeats` times, and the best time is kept: on a shared machine the
fastest run is the one least disturbed by others (the median is printed beside it).
--larger adds a randomly initialised 8-layer, 512-wide Llama (~30M parameters) with the same
tokenizer, where the adapter's extra matmuls weigh less against the base's.

Printed: generated tokens/s (prompts x new tokens / seconds) per model, variant and batch
size, the ratio to the base, and whether the merged model's tokens equal the unmerged ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "tiny-llama"
PROMPTS = ["用一句话解释什么是LoRA", "What is QLoRA?", "Explain the rank r of a LoRA adapter in one sentence.",
           "写一首关于秋天的短诗", "What does lora_alpha do?", "Why is B initialised to zero?",
           "How do I merge an adapter?", "列出三种参数高效微调方法"]


def build_larger(out: Path) -> Path:
    """A random 8-layer Llama with the tiny model's tokenizer (no training: speed only)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(MODEL)
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
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(out)
    return out


def variants(base: Path, adapter: Path, work: Path) -> dict:
    """name -> model, each loaded the way the product loads it."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_cli.export.merge import merge_adapter
    from lora_cli.model.load import load_for_inference

    merged_dir = merge_adapter(adapter, work / f"merged-{base.name}", log=lambda *_: None)
    unmerged, _, _ = load_for_inference({"a": adapter}, device="cpu")
    return {
        "base": AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(),
        "unmerged": unmerged,
        "merged": AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(),
    }


def batch_inputs(tokenizer, batch: int):
    """Left-padded prompt ids, rendered by the training template (as `lora generate` does)."""
    import torch

    from lora_cli.infer.generate import build_prompt_ids

    ids = [build_prompt_ids(tokenizer, "human_assistant", p) for p in (PROMPTS * 4)[:batch]]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    return (torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
            torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))


def timed_generate(model, inputs, new_tokens: int, tokenizer):
    import torch

    input_ids, mask = inputs
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    return out[:, input_ids.shape[1]:], seconds


def bench_model(label: str, base: Path, work: Path, batches: list[int], new_tokens: int, repeats: int) -> list[tuple]:
    from lora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    models = variants(base, random_adapter(base, work / f"adapter-{base.name}"), work)
    params = sum(p.numel() for p in models["base"].parameters())
    rows = []
    for batch in batches:
        inputs = batch_inputs(tokenizer, batch)
        for model in models.values():  # warm-up: first calls allocate and pick kernels
            timed_generate(model, inputs, 4, tokenizer)
        times = {name: [] for name in models}
        outputs = {}
        for _ in range(repeats):
            for name, model in models.items():
                outputs[name], seconds = timed_generate(model, inputs, new_tokens, tokenizer)
                times[name].append(seconds)
        base_tps = batch * new_tokens / min(times["base"])
        same = bool((outputs["merged"] == outputs["unmerged"]).all())
        for name in models:
            tps = batch * new_tokens / min(times[name])
            median_tps = batch * new_tokens / statistics.median(times[name])
            rows.append((f"{label} ({params / 1e6:.1f}M)", name, batch, tps, median_tps, tps / base_tps,
                         ("yes" if same else "NO") if name == "merged" else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--larger", action="store_true", help="also a random 8-layer 512-wide Llama")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} is missing: run `lora build-tiny` (or make tiny) first")
    from lora_cli.libraries import quiet_libraries

    quiet_libraries()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += bench_model("tiny-llama", MODEL, work, args.batches, args.new_tokens, args.repeats)
        if args.larger:
            rows += bench_model("random-llama-8x512", build_larger(work / "larger"), work, args.batches,
                                args.new_tokens, args.repeats)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"greedy, {args.new_tokens} new tokens per prompt, best and median of {args.repeats}, "
          f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| {'model':<28} | {'variant':<8} | batch | tokens/s (best) | median | best vs base | merged == unmerged |")
    print(f"| {'-' * 28} | {'-' * 8} | ----- | --------------- | ------ | ------------ | ------------------ |")
    for model, name, batch, tps, median_tps, ratio, same in rows:
        print(f"| {model:<28} | {name:<8} | {batch:>5} | {tps:>15.0f} | {median_tps:>6.0f} | {ratio:>11.2f}x | {same:<18} |")


if __name__ == "__main__":
    main()
