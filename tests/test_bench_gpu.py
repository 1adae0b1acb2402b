"""bench/bench_gpu.py stays ready for a GPU machine: it runs end to end on CPU at toy size
(CUDA-only variants skipped with their reason), and its FLOP formula counts what the model has.
One run of bench/gpu_check.sh at toy size (which runs bench_gpu.py) serves both end-to-end tests."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_flop_formula_counts_the_models_own_linear_and_lora_weights(bench_gpu, tiny_random):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_random)
    model = AutoModelForCausalLM.from_pretrained(tiny_random)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench_gpu.linear_weights(config) == linear
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert bench_gpu.lora_width(config, 16) == lora  # each adapted layer: r x (d_in + d_out) parameters
    q_dim = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    expected = (4 * linear + 6 * lora) * 30 + 6 * q_dim * (10 * 11 + 20 * 21) * config.num_hidden_layers
    assert bench_gpu.training_flops(config, 16, [10, 20]) == expected


@pytest.fixture(scope="module")
def gpu_check(bench_gpu, tmp_path_factory, tiny_random):
    """bench/gpu_check.sh at toy size on CPU (GPU_CHECK_TOY=1), run once for the tests below: its
    user path, then bench_gpu.py's toy table (every variant, each in its own process) into a doc."""
    import os
    import subprocess

    tmp = tmp_path_factory.mktemp("gpu-check")
    doc = tmp / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nbefore\n\n" + bench_gpu.DOC_BEGIN + "\nold table\n" + bench_gpu.DOC_END
                   + "\n\nafter\n", encoding="utf-8")
    # GPU_CHECK_SECONDS: no toy variant is skipped as "out of time" on a slow or busy machine
    env = {**os.environ, "GPU_CHECK_TOY": "1", "GPU_CHECK_WORK": str(tmp / "work"), "GPU_CHECK_DOC": str(doc),
           "GPU_CHECK_TINY": str(tiny_random), "GPU_CHECK_SECONDS": "86400", "PY": sys.executable}
    done = subprocess.run(["bash", str(BENCH.parent / "gpu_check.sh")], cwd=BENCH.parents[1], env=env,
                          capture_output=True, text=True, timeout=1500)
    return done, tmp / "work", doc


def test_runs_end_to_end_on_cpu_at_toy_size(gpu_check):
    """Each variant in its own process; every step timed, the first reported apart; the
    attention kernel really run and lora's batches line recorded; the table written into a doc."""
    import os

    done, work, doc = gpu_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads((work / "out-toy" / "bench_gpu.json").read_text())["records"]}
    assert list(records) == ["source", "defaults", "qlora", "liger"]
    for name in ("source", "defaults"):
        r = records[name]
        assert len(r["step_s"]) == 3 and r["warmup_steps"] == 1 and r["steady_steps"] == 2, r
        assert r["steady_s"] == pytest.approx(sum(r["step_s"][1:]), abs=1e-3)
        assert r["tokens"] > r["supervised_tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["estimate_bytes"] > 0 and r["model_tflops"] > 0
        assert r["mfu"] is None and r["peak_bytes"] is None  # a CPU has neither figure
        assert r["attention"] == "sdpa" and r["startup_s"] > 0
    assert records["source"]["pid"] != records["defaults"]["pid"] != os.getpid()
    assert "attention sdpa" in records["defaults"]["batches"] and "kernels none" in records["defaults"]["batches"]
    assert "CUDA" in records["qlora"]["skipped"] and "CUDA" in records["liger"]["skipped"]
    table = (work / "out" / "bench_gpu.md").read_text()
    assert "| toy | 32 | defaults |" in table and "skipped: Liger's Triton kernels need a CUDA GPU" in table
    written = doc.read_text()
    assert table in written and "old table" not in written
    assert written.startswith("# Benchmarks\n\nbefore\n") and written.endswith("\nafter\n")


def test_steps_are_counted_from_the_batches_themselves(bench_gpu):
    """Flattened rows split where positions restart; padded rows cut at their mask."""
    import torch

    flat = {"input_ids": torch.ones(1, 7, dtype=torch.long), "attention_mask": None,
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1]]), "labels": torch.tensor([[-100, 5, 5, -100, 5, 5, 5]])}
    padded = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
              "position_ids": None, "labels": torch.tensor([[-100, 5, 5, 5], [5, -100, -100, -100]])}
    assert bench_gpu._count([flat]) == ([3, 2, 2], 5)
    assert bench_gpu._count([padded]) == ([4, 2], 4)
    warm, rest = bench_gpu.steady([{"s": 9.0}, {"s": 1.0}, {"s": 1.1}], 2)
    assert [s["s"] for s in warm] == [9.0, 1.0] and [s["s"] for s in rest] == [1.1]
    assert bench_gpu.steady([{"s": 9.0}], 3) == ([], [{"s": 9.0}])  # one step: it is all there is


def test_gpu_check_script_runs_the_user_path_and_the_table(bench_gpu, gpu_check):
    """bench/gpu_check.sh at toy size on CPU: train, generate, merge, QLoRA (skipped without
    CUDA), estimate, then the table into the doc it is given."""
    done, _, doc = gpu_check
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("train: ok", "generate: ok", "merge: ok", "estimate: ok", "qlora: skipped"):
        assert step in done.stdout, (step, done.stdout[-3000:])
    assert bench_gpu.DOC_BEGIN in doc.read_text() and "| toy | 32 | defaults |" in doc.read_text()
