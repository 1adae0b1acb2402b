"""The whole path on a tiny pre-trained base: train -> generate -> chat -> save -> merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, demo_rows, make_recipe, write_jsonl

ROWS = demo_rows(24)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """An adapter trained through the real command on 24 bundled rows until it knows them."""
    from lora_cli.cli import run

    tmp = tmp_path_factory.mktemp("path")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    recipe = make_recipe(tmp, tiny_base, data,
                         lora={"r": 16, "alpha": 32, "target_modules": "all-linear"},
                         train={"max_steps": -1, "epochs": 12, "learning_rate": 3e-3, "batch_size": 4,
                                "gradient_accumulation": 1, "warmup_steps": 5, "save_steps": 30,
                                "save_total_limit": 2})
    assert run(["train", str(recipe)]) == 0
    return tmp / "run", recipe


def test_run_folder_is_a_standard_peft_adapter(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "lora_recipe.yaml",
                 "tokenizer.json", "tokenizer_config.json", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("*.bin"))
    ckpts = sorted(run_dir.glob("checkpoint-*"))
    assert len(ckpts) == 2  # save_total_limit
    # plain peft loads it
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(run_dir))
    assert any("lora_B" in n for n, _ in model.named_parameters())


def test_generate_returns_trained_answers_and_base_does_not(trained, tiny_base, cli):
    run_dir, _ = trained
    hits, base_hits = 0, 0
    for row in ROWS[:6]:
        res = cli("generate", "--adapter", run_dir, row["instruction"], "--input", row["input"], "--max-new-tokens", 96)
        assert res.code == 0, res
        hits += res.out.strip() == row["output"]
        base = cli("generate", "--base", tiny_base, row["instruction"], "--input", row["input"], "--max-new-tokens", 96)
        base_hits += base.out.strip() == row["output"]
    assert hits >= 4, f"only {hits}/6 trained answers reproduced"
    assert base_hits == 0


def test_generation_stops_at_eos(trained):
    from lora_cli.infer.generate import build_prompt_ids, generate_response
    from lora_cli.model.load import load_for_inference

    run_dir, _ = trained
    model, tok, infos = load_for_inference({"a": run_dir})
    row = ROWS[0]
    answer = generate_response(model, tok, infos["a"].template, row["instruction"])
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    assert len(ids) < 120  # stopped on its own, well before max_new_tokens (128)
    # and the model's next token after the trained answer is EOS
    import torch

    prompt = build_prompt_ids(tok, "human_assistant", row["instruction"])
    full = torch.tensor([prompt + tok(row["output"], add_special_tokens=False)["input_ids"]])
    assert model(input_ids=full).logits[0, -1].argmax().item() == tok.eos_token_id


def test_chat_answers_as_generate_does_and_exits(trained):
    """Driven as a user would: the real command, typed lines on stdin."""
    from lora_cli.infer.generate import generate_response
    from lora_cli.model.load import load_for_inference

    run_dir, _ = trained
    row = ROWS[1]
    model, tok, infos = load_for_inference({"a": run_dir})
    expected = generate_response(model, tok, infos["a"].template, row["instruction"])
    proc = subprocess.run([sys.executable, "-m", "lora_cli.cli", "chat", "--adapter", str(run_dir)],
                          input=f"{row['instruction']}\n/exit\n", capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert expected and expected in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr


def test_dry_run_prints_plan_and_writes_nothing(tiny_random, tmp_path, cli):
    recipe = make_recipe(tmp_path, tiny_random)
    res = cli("train", recipe, "--dry-run")
    assert res.code == 0, res
    assert "trainable params: " in res.out and "|| all params: " in res.out
    assert "16/16 rows kept" in res.out
    assert "masked (no loss): '<s>Human: " in res.out and "supervised:" in res.out
    assert not (tmp_path / "run").exists()


def test_trainable_count_matches_peft(tiny_random, tmp_path, cli):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(tmp_path, tiny_random)
    res = cli("train", recipe, "--dry-run")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in res.out


def test_output_dir_of_another_run_is_not_overwritten(tiny_random, tmp_path, cli):
    recipe = make_recipe(tmp_path, tiny_random, train={"max_steps": 1})
    assert cli("train", recipe).code == 0
    weights = (tmp_path / "run" / "adapter_model.safetensors").read_bytes()
    res = cli("train", recipe)
    assert res.code == 2 and "already holds files from another run" in res.err and "--overwrite" in res.err
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == weights
    # a folder that is not a lora run is never deleted, even with --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.txt").write_text("precious")
    res = cli("train", recipe, "--set", f"output_dir={other}", "--overwrite")
    assert res.code == 2 and (other / "thesis.txt").read_text() == "precious"
    assert cli("train", recipe, "--overwrite").code == 0


def test_save_exports_clean_adapter_from_checkpoint(trained, tmp_path, cli, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained
    ckpt = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert (ckpt / "optimizer.pt").exists()
    res = cli("save", ckpt, "--out", tmp_path / "clean")
    assert res.code == 0, res
    files = {p.name for p in (tmp_path / "clean").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lora_recipe.yaml", "tokenizer.json"} <= files
    assert not files & {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(tmp_path / "clean"))
    # an existing --out is not replaced without --force
    res = cli("save", ckpt, "--out", tmp_path / "clean")
    assert res.code == 2 and "already exists" in res.err


def test_merged_logits_equal_base_plus_adapter(tiny_random, tmp_path, cli):
    """B is made non-zero first: with B = 0, merged == unmerged would prove nothing."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_random)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "adapter")
    res = cli("merge", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged")
    assert res.code == 0, res
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_random), str(tmp_path / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tiny_random)
    with torch.no_grad():
        a, b, c = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list((tmp_path / "merged").glob("*.bin"))


def test_target_modules_matching_nothing(tiny_random, tmp_path, cli):
    res = cli("train", make_recipe(tmp_path, tiny_random, lora={"target_modules": ["query_key_value"]}), "--dry-run")
    assert res.code == 2 and "lora.target_modules" in res.err and "q_proj" in res.err
    assert "Traceback" not in res.err


def test_data_without_needed_field(tiny_random, tmp_path, cli):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "answer": "d"}])
    res = cli("train", make_recipe(tmp_path, tiny_random, data), "--dry-run")
    assert res.code == 2
    assert "bad.jsonl, row 2: missing field 'output'" in res.err and "Traceback" not in res.err


def test_save_to_disk_folder_is_read(tiny_random, tmp_path, cli):
    from datasets import Dataset

    Dataset.from_list(demo_rows(8)).save_to_disk(str(tmp_path / "alpaca_data_zh"))
    res = cli("train", make_recipe(tmp_path, tiny_random, tmp_path / "alpaca_data_zh"), "--dry-run")
    assert res.code == 0, res
    assert "8/8 rows kept" in res.out


def test_metrics_are_logged(trained):
    run_dir, _ = trained
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and losses[-1] < losses[0]


def test_bundled_chat_recipe_dry_run_shows_every_turn(tiny_random, cli):
    """recipes/chat.yaml end to end up to training: the chat data, the tokenizer's template,
    and the dry run naming each masked prompt and each supervised answer of a conversation."""
    res = cli("train", REPO / "recipes" / "chat.yaml", "--dry-run", "--set", f"model.name_or_path={tiny_random}",
              "--set", "data.cache=false")
    assert res.code == 0, res
    masked = next(line for line in res.out.splitlines() if line.startswith("masked (no loss): "))
    supervised = next(line for line in res.out.splitlines() if line.startswith("supervised: "))
    assert masked.count("Human: ") == 2 and masked.count(" … ") == 1
    assert supervised.count("</s>") == 2 and "Human:" not in supervised
    assert "eval    6 held-out rows" in res.out
