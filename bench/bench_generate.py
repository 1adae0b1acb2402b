"""Generation speed: the base, the base + LoRA adapter unmerged (what `lora chat/generate` run),
and the merged model (`lora merge`), greedy, on the same prompts.

    python bench/bench_generate.py                 (make bench runs it after `lora build-tiny`)
    python bench/bench_generate.py --larger --new-tokens 64 --repeats 5
    python bench/bench_generate.py --quick          (8 new tokens, batches 1 and 4, one repeat: proves it runs)

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

import statistics
import sys
from pathlib import Path

import benchkit
from benchkit import PROMPTS, build_larger, random_adapter


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


def generate(model, inputs, new_tokens: int, tokenizer):
    """Exactly `new_tokens` greedy tokens per row (an early EOS cannot flatter a variant)."""
    import torch

    input_ids, mask = inputs
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id)
    return out[:, input_ids.shape[1]:]


def bench_model(label: str, base: Path, work: Path, batches: list[int], new_tokens: int, repeats: int) -> list[tuple]:
    from lora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    models = variants(base, random_adapter(base, work / f"adapter-{base.name}"), work)
    params = sum(p.numel() for p in models["base"].parameters())
    rows = []
    for batch in batches:
        inputs = batch_inputs(tokenizer, batch)
        for model in models.values():  # warm-up: first calls allocate and pick kernels
            generate(model, inputs, 4, tokenizer)
        runs = benchkit.round_robin({name: lambda _, m=model: benchkit.timed(generate, m, inputs, new_tokens, tokenizer)
                                     for name, model in models.items()}, repeats)
        times = {name: [seconds for _, seconds in results] for name, results in runs.items()}
        outputs = {name: results[-1][0] for name, results in runs.items()}
        base_tps = batch * new_tokens / min(times["base"])
        same = bool((outputs["merged"] == outputs["unmerged"]).all())
        for name in models:
            tps = batch * new_tokens / min(times[name])
            median_tps = batch * new_tokens / statistics.median(times[name])
            rows.append((f"{label} ({params / 1e6:.1f}M)", name, batch, tps, median_tps, tps / base_tps,
                         ("yes" if same else "NO") if name == "merged" else ""))
    return rows


def main() -> int:
    parser = benchkit.arguments(__doc__.split("\n\n")[0], "8 new tokens, batches 1 and 4, one repeat, no --larger")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--larger", action="store_true", help="also a random 8-layer 512-wide Llama")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.batches, args.larger = 8, 1, [1, 4], False
    benchkit.require_model(args.model)
    from lora_cli.libraries import quiet_libraries

    quiet_libraries()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with benchkit.scratch("bench-generate-") as work:
        rows += bench_model("tiny-llama", args.model, work, args.batches, args.new_tokens, args.repeats)
        if args.larger:
            rows += bench_model("random-llama-8x512", build_larger(work / "larger", args.model), work, args.batches,
                                args.new_tokens, args.repeats)
    print(f"greedy, {args.new_tokens} new tokens per prompt, best and median of {args.repeats}, "
          f"{benchkit.device_name()}, {benchkit.torch_threads()}{benchkit.quick_note(args)}")
    print(f"| {'model':<28} | {'variant':<8} | batch | tokens/s (best) | median | best vs base | merged == unmerged |")
    print(f"| {'-' * 28} | {'-' * 8} | ----- | --------------- | ------ | ------------ | ------------------ |")
    for model, name, batch, tps, median_tps, ratio, same in rows:
        print(f"| {model:<28} | {name:<8} | {batch:>5} | {tps:>15.0f} | {median_tps:>6.0f} | {ratio:>11.2f}x | {same:<18} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
