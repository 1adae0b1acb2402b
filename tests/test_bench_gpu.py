"""bench/bench_gpu.py stays ready for a GPU machine: it runs end to end on CPU at toy size
(CUDA-only variants skipped with their reason), and its FLOP formula counts what the model has."""

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


def test_runs_end_to_end_on_cpu_at_toy_size(bench_gpu, tmp_path, capsys):
    out = tmp_path / "out"
    code = bench_gpu.main(["--shapes", "toy", "--seq", "32", "--steps", "1", "--no-warmup",
                           "--variants", "source,defaults,packing,qlora,liger",
                           "--work", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    records = {r["variant"]: r for r in json.loads((out / "bench_gpu.json").read_text())["records"]}
    assert list(records) == ["source", "defaults", "packing", "qlora", "liger"]
    for name in ("source", "defaults", "packing"):
        r = records[name]
        assert r["tokens"] > r["supervised_tokens"] > 0 and r["tokens_per_s"] > 0, r
        assert r["estimate_bytes"] > 0 and r["model_tflops"] > 0
        assert r["mfu"] is None and r["peak_bytes"] is None  # a CPU has neither figure
    assert records["defaults"]["tokens"] == records["packing"]["tokens"]  # the same rows, split back out of packs
    assert "CUDA" in records["qlora"]["skipped"] and "CUDA" in records["liger"]["skipped"]
    table = (out / "bench_gpu.md").read_text()
    assert "| toy | defaults |" in table and "skipped: Liger's Triton kernels need a CUDA GPU" in table
