"""`lora serve` under concurrent clients: requests/s, output tokens/s and latency for 1, 4 and 16
clients, batched throughput against one-at-a-time, and the server's overhead for one client
against `lora generate`'s path (the same backend, in-process, no HTTP) on the same prompts.

    python bench/bench_serve.py                  (make bench runs it after `lora build-tiny`)
    python bench/bench_serve.py --quick          (a small run that proves the script works)
    python bench/bench_serve.py --larger --requests 4 --new-tokens 32

The server is the real app on uvicorn in a thread on a free localhost port, loaded as
`lora serve` loads it (build_server), driven by the official openai client: each of N client
threads sends --requests chat requests one after another (greedy, --new-tokens tokens, prompts
rotating through the list). Tokens are counted from each response's usage. --larger adds the
random 8-layer, 512-wide Llama of benchkit.build_larger, where a batch's extra rows cost relatively less.

Goals (issue 11): 16 clients >= 3x the one-at-a-time tokens/s; one client within 10% of `lora generate`.
The one-client overhead is measured with a bare keep-alive HTTP client (the server's cost) and,
beside it, with the openai client (whose own work here shares the server's process and cores),
each alternating with `lora generate`'s path --pairs times; the best of each is compared.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchkit
from benchkit import PROMPTS, build_larger, random_adapter


def drive(url: str, clients: int, requests: int, new_tokens: int) -> dict:
    """N clients, each sending `requests` chat requests in turn; returns throughput and latency."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)

    def one_client(c: int) -> list[tuple[float, int]]:
        done = []
        for r in range(requests):
            prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
            start = time.perf_counter()
            reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": prompt}],
                                                   temperature=0, max_tokens=new_tokens)
            done.append((time.perf_counter() - start, reply.usage.completion_tokens))
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for per_client in pool.map(one_client, range(clients)) for x in per_client]
    seconds = time.perf_counter() - start
    latencies = sorted(t for t, _ in results)
    return {"clients": clients, "requests": len(results), "seconds": seconds,
            "req_s": len(results) / seconds, "tok_s": sum(n for _, n in results) / seconds,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def raw_seconds(url: str, prompts: list[str], new_tokens: int) -> float:
    """The same prompts sent one at a time by a bare keep-alive HTTP client (http.client): the
    server's own cost, without the openai client's, which runs in this process and shares its
    GIL and the 2 cores with the server."""
    import http.client
    import json
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=600)
    start = time.perf_counter()
    for prompt in prompts:
        body = {"model": "a", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": new_tokens}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        assert reply.status == 200, reply.read()
        reply.read()
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def direct_seconds(server, prompts: list[str], new_tokens: int) -> float:
    """The same prompts answered one at a time through `lora generate`'s path (generate_rows)."""
    from lora_cli.infer.generate import Prompt, generate_rows
    from lora_cli.infer.settings import GenerationSettings

    settings = GenerationSettings(max_new_tokens=new_tokens)
    start = time.perf_counter()
    for p in prompts:
        generate_rows(server.backend, [Prompt(p)], {"a": ("a", server.models["a"].template)}, settings, batch_size=1)
    return time.perf_counter() - start


def bench_model(label: str, base: Path, work: Path, client_counts: list[int], requests: int, new_tokens: int,
                rounds: int, pairs: int) -> list[dict]:
    """Every client count `rounds` times in turn (the best round of each is kept: other work on a
    shared machine only adds time), then `lora generate`'s path and one client alternately,
    `pairs` times (the overhead is a few percent: it needs more runs than the throughput)."""
    from lora_cli.infer.serve import ServerThread, build_server

    adapter = random_adapter(base, work / f"adapter-{base.name}")
    server = build_server({"a": adapter}, max_batch=max(client_counts), max_queue=4 * max(client_counts))
    try:
        with ServerThread(server) as running:
            drive(running.url, 1, 2, 4)  # warm-up: first calls allocate and pick kernels
            runs = benchkit.round_robin({clients: lambda _, c=clients: drive(running.url, c, requests, new_tokens)
                                         for clients in client_counts}, rounds)
            best = {clients: max(results, key=lambda run: run["tok_s"]) for clients, results in runs.items()}
            one = [PROMPTS[r % len(PROMPTS)] for r in range(requests)]
            pair = benchkit.round_robin({"direct": lambda _: direct_seconds(server, one, new_tokens),
                                         "raw": lambda _: raw_seconds(running.url, one, new_tokens),
                                         "served": lambda _: drive(running.url, 1, requests, new_tokens)["seconds"]},
                                        pairs)
            direct, raw, served = pair["direct"], pair["raw"], pair["served"]
    finally:
        server.scheduler.close()
    rows = [{"model": label, **best[c]} for c in client_counts]
    rows[0]["overhead"] = min(raw) / min(direct) - 1
    rows[0]["overhead_openai"] = min(served) / min(direct) - 1
    return rows


def main() -> int:
    parser = benchkit.arguments(__doc__.split("\n\n")[0], "tiny model, 1 and 4 clients, 2 requests, 8 tokens, one round")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the client counts (best kept)")
    parser.add_argument("--pairs", type=int, default=5, help="alternating lora-generate / one-client runs")
    parser.add_argument("--larger", action="store_true", help="also a random 8-layer 512-wide Llama")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.new_tokens, args.larger, args.rounds = [1, 4], 2, 8, False, 1
        args.pairs = 1
    benchkit.require_model(args.model)
    from lora_cli.libraries import quiet_libraries

    quiet_libraries()
    rows = []
    with benchkit.scratch("bench-serve-") as work:
        rows += bench_model("tiny-llama", args.model, work, args.clients, args.requests, args.new_tokens,
                            args.rounds, args.pairs)
        if args.larger:
            rows += bench_model("random-llama-8x512", build_larger(work / "larger", args.model), work, args.clients,
                                args.requests, args.new_tokens, args.rounds, args.pairs)
    print(f"greedy chat, {args.new_tokens} max tokens, {args.requests} requests per client, best of {args.rounds} "
          f"rounds, {benchkit.device_name()}, {benchkit.load_average()}, "
          f"{benchkit.torch_threads()}{benchkit.quick_note(args)}")
    print("| model | clients | requests/s | output tokens/s | p50 s | p99 s | tokens/s vs 1 client | 1 client vs lora generate |")
    print("| ----- | ------- | ---------- | --------------- | ----- | ----- | -------------------- | ------------------------- |")
    for row in rows:
        single = next(r for r in rows if r["model"] == row["model"])
        overhead = (f"{row['overhead']:+.0%} bare HTTP, {row['overhead_openai']:+.0%} openai client"
                    if "overhead" in row else "")
        print(f"| {row['model']} | {row['clients']} | {row['req_s']:.2f} | {row['tok_s']:.0f} | {row['p50']:.3f} | "
              f"{row['p99']:.3f} | {row['tok_s'] / single['tok_s']:.2f}x | {overhead} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
