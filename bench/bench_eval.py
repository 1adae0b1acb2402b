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

import sys

import benchkit


def rows_per_second(request, kind: str) -> float:
    """Rows/s of the candidates `request` names: asking only, loading excluded."""
    from lora_cli.eval.run import ask_all, load_candidates

    candidates, asking, metrics, _ = load_candidates(request)
    chosen = [c for c in candidates if c.kind == kind]
    _, seconds = benchkit.timed(ask_all, chosen, asking, metrics, request.settings)
    return len(asking.rows) / seconds


def main() -> int:
    parser = benchkit.arguments(__doc__.splitlines()[0], "4 rows, 8 new tokens")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        args.rows, args.new_tokens = 4, 8
    benchkit.require_model(args.model)
    import yaml

    from lora_cli.eval.run import Request, Settings
    from lora_cli.export.gguf import export
    from lora_cli.export.merge import merge_adapter
    from lora_cli.infer.serve import ServerThread, build_server

    quiet = lambda *_: None  # noqa: E731
    with benchkit.scratch("bench-eval-") as tmp:
        adapter = benchkit.random_adapter(args.model, tmp / "adapter", r=8, alpha=16, scale=0.1)
        (adapter / "lora_recipe.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(args.model)},
                                                                  "data": {"template": "human_assistant"}}))
        merged = merge_adapter(adapter, tmp / "merged", log=quiet)
        gguf = export(adapter, tmp / "f32.gguf", format="gguf", dtype="f32", log=quiet)
        settings = Settings(max_new_tokens=args.new_tokens)
        same = dict(data=str(benchkit.DATA), limit=args.rows, settings=settings, metrics=["rouge_l"])
        server = build_server({"a": str(adapter)})
        results = {}
        with ServerThread(server) as running:
            cases = {"base": Request(adapters={"a": str(adapter)}, base=True, **same),
                     "adapter": Request(adapters={"a": str(adapter)}, **same),
                     "merged": Request(merged=[str(merged)], **same),
                     "gguf": Request(adapters={"a": str(adapter)}, gguf=[str(gguf)], **same),
                     "endpoint": Request(adapters={"a": str(adapter)}, endpoint=[running.url], endpoint_model="a",
                                         **same)}
            for kind, request in cases.items():
                results[kind] = rows_per_second(request, kind)
        server.scheduler.close()
    print(f"{args.rows} demo rows, {args.new_tokens} new tokens, greedy (machine shared: figures move with its load)"
          f"{benchkit.quick_note(args)}")
    for kind, rate in results.items():
        print(f"  {kind:9s} {rate:8.2f} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
