"""Preference tuning under DDP: `lora train` with train.objective dpo as 2 CPU processes (gloo,
torchrun, as test_ddp.py runs SFT). The ranks train the same adapter, rank 0 alone writes it, it
loads as an ordinary adapter, and a resumed DDP run ends with the uninterrupted run's adapter."""

from __future__ import annotations

import json

import pytest
from preference_helpers import preference_recipe
from test_ddp import private_data_cache, ranks_agree_and_rank0_is_saved, torchrun  # noqa: F401 (fixture by name)


@pytest.mark.slow
def test_dpo_on_two_processes_saves_loads_and_resumes(tmp_path, tiny_random):
    import torch
    from safetensors.torch import load_file

    recipe = preference_recipe(tmp_path, tiny_random, "dpo", max_steps=3, save_steps=2, logging_steps=1, batch_size=4)
    dump = tmp_path / "ranks"
    dump.mkdir()
    proc = torchrun(tmp_path, dump, "train", recipe)

    # both ranks hold the same trained adapter (gradients all-reduced), and it moved
    run = tmp_path / "run"
    rank0, saved = ranks_agree_and_rank0_is_saved(dump, run)
    assert all(".ref." not in n for n in rank0)  # no reference copy: the reference is the adapter switched off
    assert not (run / "ref").exists()

    # rank 0 alone printed and logged: one record per step, with the preference metrics
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set().union(*rows)
    assert proc.stdout.count("adapter saved to") == 1
    ckpt = run / "checkpoint-2"
    assert {p.name for p in ckpt.glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert (ckpt / "lora_checkpoint_complete.json").is_file()
    # per-device batch 4 x 2 ranks: 32 pairs are 4 steps an epoch, so 3 steps = 0.75 epochs
    assert rows[-1]["epoch"] == pytest.approx(0.75)

    # the adapter loads as any adapter and answers
    from lora_cli.infer.generate import generate_batch
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference
    from lora_cli.data.template import TemplateSpec, prompt_ids

    model, tokenizer, infos = load_for_inference({"dpo": run}, device="cpu")
    assert list(model.peft_config) == ["dpo"]
    ids = prompt_ids(tokenizer, TemplateSpec(), [{"role": "user", "content": "LoRA rank"}])
    (answer,) = generate_batch(model, tokenizer, [ids], GenerationSettings(max_new_tokens=2))
    assert isinstance(answer, str)

    # resume under torchrun from checkpoint-2: the same adapter and losses as the whole run
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (run / name).unlink()
    resumed = torchrun(tmp_path, dump, "train", recipe, "--resume")
    assert resumed.stdout.count("resume  from") == 1 and "checkpoint-2" in resumed.stdout
    again = load_file(str(run / "adapter_model.safetensors"))
    assert again.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.allclose(again[name], tensor, rtol=1e-6, atol=1e-7), name
    rows_again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    logged_again = [(r["step"], r["loss"]) for r in rows_again if "loss" in r]
    assert [s for s, _ in logged_again] == [s for s, _ in logged]
    assert [v for _, v in logged_again] == pytest.approx([v for _, v in logged], rel=1e-6)
