"""`lora eval` throughput: rows per second for each candidate kind (base, adapter, merged folder,
f32 GGUF, `lora serve` endpoint) on the same demo rows, greedy.

    python bench/bench_eval.py            (make bench runs it after `lora build-tiny`)
    python bench/bench_eval.py --quick    (4 rows, 8 new tokens: proves the script runs end to end)

The adapter is LoRA r=8 on every linear layer with random, non-zero A and B (speed, not skill).
Each candidate is timed on its own (`lora eval` with that candidate alone, generation metrics
only, so the loss pass does not count), from first row asked to last answer; loading is not
timed. Printed: rows/s per kind. On a shared machine these figures move with its load.
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
sys.path.insert(0, str(REPO / "tests"))
MODEL = REPO / "models" / "tiny-llama"
DATA = REPO / "data" / "demo.jsonl"


def timed(request, kind: str) -> float:
    """Rows/s of the candidates `request` names: asking only, loading excluded."""
    from lora_cli.eval.run import ask_all, load_candidates

    candidates, asking, metrics, _ = load_candidates(request)
    chosen = [c for c in candidates if c.kind == kind]
    start = time.perf_counter()
    ask_all(chosen, asking, metrics, request.settings)
    return len(asking.rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="4 rows, 8 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.new_tokens = 4, 8
    if not (MODEL / "config.json").is_file():
        sys.exit(f"{MODEL} is missing: run `lora build-tiny` (or `make tiny`) first")
    import yaml
    from inference_helpers import random_adapter

    from lora_cli.eval.run import Request, Settings
    from lora_cli.export.gguf import export
    from lora_cli.export.merge import merge_adapter
    from lora_cli.infer.serve import ServerThread, build_server

    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = random_adapter(MODEL, tmp / "adapter", seed=0, target_modules="all-linear", scale=0.1)
        (adapter / "lora_recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(MODEL)},
                                                                  "data": {"template": "human_assistant"}}))
        merged = merge_adapter(adapter, tmp / "merged", log=quiet)
        gguf = export(adapter, tmp / "f32.gguf", format="gguf", dtype="f32", log=quiet)
        settings = Settings(max_new_tokens=args.new_tokens)
        common = dict(data=str(DATA), limit=args.rows, settings=settings, metrics=["rouge_l"])
        server = build_server({"a": str(adapter)})
        results = {}
        with ServerThread(server) as running:
            cases = {"base": Request(adapters={"a": str(adapter)}, base=True, **common),
                     "adapter": Request(adapters={"a": str(adapter)}, **common),
                     "merged": Request(merged=[str(merged)], **common),
                     "gguf": Request(adapters={"a": str(adapter)}, gguf=[str(gguf)], **common),
                     "endpoint": Request(adapters={"a": str(adapter)}, endpoint=[running.url], **common)}
            for kind, request in cases.items():
                results[kind] = timed(request, kind)
        server.scheduler.close()
    print(f"{args.rows} demo rows, {args.new_tokens} new tokens, greedy (machine shared: figures move with its load)")
    for kind, rate in results.items():
        print(f"  {kind:9s} {rate:8.2f} rows/s")


if __name__ == "__main__":
    main()
