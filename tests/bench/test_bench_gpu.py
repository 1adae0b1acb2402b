"""bench/bench_gpu.py stays ready for a GPU machine: its FLOP formula counts what the model has,
its step counting reads the batches and its table replaces the marked block of the doc.
(gpu_check.sh at toy size on CPU, which makes the script's own quick run, is in
tests/bench/test_bench.py with every other bench's quick run.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


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


def test_the_table_replaces_the_marked_block_of_the_doc(bench_gpu, tmp_path):
    """--doc: the table between the markers, the rest of the doc as it was; markers added at the
    end of a doc that has none. (The run itself, at toy size: tests/bench/test_bench.py, --quick.)"""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nbefore\n\n" + bench_gpu.DOC_BEGIN + "\nold table\n" + bench_gpu.DOC_END
                   + "\n\nafter\n", encoding="utf-8")
    bench_gpu.write_doc(doc, "| toy | 32 | defaults |\n")
    written = doc.read_text()
    assert written == ("# Benchmarks\n\nbefore\n\n" + bench_gpu.DOC_BEGIN + "\n| toy | 32 | defaults |\n"
                       + bench_gpu.DOC_END + "\n\nafter\n")
    bare = tmp_path / "bare.md"
    bare.write_text("# Benchmarks\n", encoding="utf-8")
    bench_gpu.write_doc(bare, "| t |\n")
    assert bare.read_text() == "# Benchmarks\n\n" + bench_gpu.DOC_BEGIN + "\n| t |\n" + bench_gpu.DOC_END + "\n"


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
