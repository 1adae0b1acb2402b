"""`lora generate`: batched (left-padded) answers equal one-at-a-time greedy answers, several
adapters side by side, base-only, seeded sampling, prompt files, and clear refusals."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_DATA, demo_rows, write_jsonl
from inference_helpers import random_adapter, two_random_adapters

MAX_NEW = "12"


@pytest.fixture(scope="module")
def adapters(tiny_random, tmp_path_factory):
    return two_random_adapters(tiny_random, tmp_path_factory.mktemp("adapters"), seeds=(11, 12))


@pytest.fixture
def prompts(tmp_path):
    """Prompts of quite different lengths, some with an input: padding really happens."""
    rows = [{"instruction": r["instruction"], "input": r.get("input", "")} for r in demo_rows(5)]
    rows.append({"instruction": "Hi"})
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_batched_equals_unbatched_greedy(adapters, prompts, tmp_path, cli):
    one, _ = adapters
    args = ["generate", "--adapter", f"a={one}", "--file", prompts, "--max-new-tokens", MAX_NEW]
    assert cli(*args, "--batch-size", "1", "--out", tmp_path / "single.jsonl").code == 0
    res = cli(*args, "--batch-size", "4", "--out", tmp_path / "batched.jsonl")
    assert res.code == 0, res
    single, batched = _rows(tmp_path / "single.jsonl"), _rows(tmp_path / "batched.jsonl")
    assert len(batched) == 6 and [r["response"] for r in batched] == [r["response"] for r in single]
    assert len({r["response"] for r in batched}) > 1 and all(r["response"] for r in batched)
    first = batched[0]
    assert first["instruction"] == demo_rows(1)[0]["instruction"] and first["adapter"] == "a"
    assert first["template"] == "human_assistant"
    row = demo_rows(1)[0]
    assert first["prompt"] == "<s>" + "\n".join(["Human: " + row["instruction"], row.get("input", "")]).strip() + "\n\nAssistant: "
    assert first["settings"] == {"max_new_tokens": 12, "temperature": 0.0, "top_p": 1.0,
                                 "repetition_penalty": 1.0, "seed": None, "batch_size": 4}


def test_batched_answer_matches_generate_response(adapters, tiny_random):
    """The CLI path and the library path render and decode the same way."""
    from lora_cli.infer.engines import TransformersBackend
    from lora_cli.infer.generate import Prompt, generate_response, generate_rows
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference

    model, tok, infos = load_for_inference({"a": adapters[0]})
    settings = GenerationSettings(max_new_tokens=10)
    prompts = [Prompt(r["instruction"], r.get("input", "")) for r in demo_rows(3)]
    rows = generate_rows(TransformersBackend(model, tok), prompts, {"a": ("a", infos["a"].template)}, settings, batch_size=3)
    alone = [generate_response(model, tok, infos["a"].template, p.instruction, input=p.input, settings=settings)
             for p in prompts]
    assert [r["response"] for r in rows] == alone


def test_adapters_side_by_side_and_base_only(adapters, tiny_random, tmp_path, cli):
    one, two = adapters
    txt = tmp_path / "prompts.txt"
    txt.write_text("What is LoRA?\n\nExplain rank.\n", encoding="utf-8")
    res = cli("generate", "-a", f"one={one}", "-a", f"two={two}", "--file", txt, "--max-new-tokens", MAX_NEW,
              "--out", tmp_path / "both.jsonl")
    assert res.code == 0, res
    assert "4 answers (2 prompts x 2 variants)" in res.out
    both = _rows(tmp_path / "both.jsonl")
    assert [(r["id"], r["adapter"]) for r in both] == [(0, "one"), (0, "two"), (1, "one"), (1, "two")]
    assert both[0]["response"] != both[1]["response"]
    # alone, each adapter answers as it did side by side
    res = cli("generate", "-a", f"two={two}", "--file", txt, "--max-new-tokens", MAX_NEW, "--out", tmp_path / "two.jsonl")
    assert [r["response"] for r in _rows(tmp_path / "two.jsonl")] == [r["response"] for r in both if r["adapter"] == "two"]
    # base-only: the adapter switched off gives what the plain base gives
    cli("generate", "-a", one, "--base-only", "--file", txt, "--max-new-tokens", MAX_NEW, "--out", tmp_path / "off.jsonl")
    cli("generate", "--base", tiny_random, "--file", txt, "--max-new-tokens", MAX_NEW, "--out", tmp_path / "base.jsonl")
    off, base = _rows(tmp_path / "off.jsonl"), _rows(tmp_path / "base.jsonl")
    assert [r["adapter"] for r in off] == ["base", "base"]
    assert [r["response"] for r in off] == [r["response"] for r in base]
    assert off[0]["response"] != both[0]["response"]


def test_seed_makes_sampling_reproducible(adapters, cli):
    args = ["generate", "-a", adapters[0], "What is LoRA?", "--temperature", "1.0", "--max-new-tokens", "16"]
    first, again, other = cli(*args, "--seed", "7"), cli(*args, "--seed", "7"), cli(*args, "--seed", "8")
    assert first.code == 0, first
    assert first.out.strip() and first.out == again.out
    assert other.out != first.out


def test_bad_input_is_refused(adapters, tiny_random, tmp_path, cli):
    one, _ = adapters
    res = cli("generate", "-a", one)
    assert res.code == 2 and "give one instruction or --file" in res.err
    res = cli("generate", "-a", one, "--file", tmp_path / "missing.jsonl")
    assert res.code == 2 and "missing.jsonl: no such file" in res.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"question": "no instruction"}\n', encoding="utf-8")
    res = cli("generate", "-a", one, "--file", bad)
    assert res.code == 2 and "bad.jsonl, line 2: expected an object with a string 'instruction'" in res.err
    res = cli("generate", "-a", one, "--file", DEMO_DATA.with_suffix(".csv"))
    assert res.code == 2
    out = tmp_path / "results.jsonl"
    out.write_text("earlier results\n")
    res = cli("generate", "-a", one, "hi", "--out", out)
    assert res.code == 2 and "--out" in res.err and "--force" in res.err
    assert out.read_text() == "earlier results\n"
    res = cli("generate", "-a", one, "hi", "--temperature", "-1")
    assert res.code == 2 and "--temperature must be between 0 and 100" in res.err
    res = cli("generate", "-a", one, "hi", "--template", "chatml")
    assert res.code == 2 and "unknown template 'chatml'" in res.err
    res = cli("generate", "hi")
    assert res.code == 2 and "nothing to load" in res.err
    for res in (cli("generate", "-a", f"x={one}", "-a", f"x={one}", "hi"),):
        assert res.code == 2 and "name 'x' given twice" in res.err
    assert "Traceback" not in res.err


def test_adapters_of_different_bases_are_refused(adapters, tmp_path, cli):
    from lora_cli.tiny.decoder import build_tiny_model

    other_base = build_tiny_model(tmp_path / "other", DEMO_DATA, hidden=32, steps=0, log=lambda *_: None)
    other = random_adapter(other_base, tmp_path / "other-adapter", seed=13)
    for command in (["generate", "hi"], ["chat"]):
        res = cli(*command, "-a", f"one={adapters[0]}", "-a", f"other={other}")
        assert res.code == 2, res
        assert "adapters were trained on different base models" in res.err
        assert f"other -> {other_base}" in res.err and "separate session" in res.err
