"""Packing: examples in one sequence never attend to each other, positions restart, and the
loss equals the unpacked loss on the same rows. Length-grouped batching trains too."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import demo_rows, make_recipe, tokenize_alpaca, write_jsonl
from lora_cli.data.examples import FlattenedCollator, PackedCollator, PadCollator, pack_examples, split_pack
from lora_cli.data.template import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tiny_random):
    from lora_cli.model.load import load_tokenizer

    return load_tokenizer(str(tiny_random))


@pytest.fixture(scope="module")
def examples(tok):
    rows = demo_rows(10) + [{"instruction": "什么是LoRA？", "input": "", "output": "低秩适配。"}]
    ex, _ = tokenize_alpaca(rows, tok, "human_assistant", 128)
    return ex


def load_model(path, attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, dtype=torch.float32).eval()


def test_packs_hold_every_example_once_within_max_length(examples):
    packs = pack_examples(examples, 256)
    assert len(packs) < len(examples)
    assert all(len(p["input_ids"]) <= 256 for p in packs)
    starts = Counter()
    for p in packs:
        pos = p["position_ids"]
        assert pos[0] == 0 and len(pos) == len(p["input_ids"]) == len(p["labels"])
        bounds = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
        for a, b in zip(bounds, bounds[1:]):
            assert pos[a:b] == list(range(b - a))  # positions restart per example
            assert p["labels"][a] == IGNORE_INDEX  # nothing predicted across a boundary
            starts[tuple(p["input_ids"][a:b])] += 1
    assert starts == Counter(tuple(e["input_ids"]) for e in examples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_losses_agree(tiny_random, tok, examples, attn):
    import torch

    model = load_model(tiny_random, attn)
    packs = pack_examples(examples, 256)
    packed = PackedCollator(tok.pad_token_id)(packs)
    unpacked = PadCollator(tok.pad_token_id)(examples)
    assert "attention_mask" not in packed
    assert (packed["labels"] != IGNORE_INDEX).sum() == (unpacked["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss_unpacked = model(**unpacked).loss.item()
        loss_packed = model(**packed).loss.item()
        # the control: the same packs with positions running on (one long document) let
        # examples attend to each other, and the loss moves
        crossed = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
        loss_crossed = model(**crossed).loss.item()
    assert loss_packed == pytest.approx(loss_unpacked, abs=1e-5)
    assert abs(loss_crossed - loss_unpacked) > 1e-3


@pytest.mark.parametrize("source", ["examples", "packs"])
def test_flattened_batches_lose_nothing_and_mix_nothing(tiny_random, tok, examples, source):
    """The padding-free layout (the default with flash attention): one row per batch, positions
    restarting per example, cu_seq_lens at the boundaries. Flash attention cannot run on CPU, but
    sdpa reads the same restarted positions (as a block-diagonal mask), so the loss must equal the
    unpacked loss; the control, positions running on, lets examples see each other."""
    import torch

    model = load_model(tiny_random, "sdpa")
    rows = examples if source == "examples" else pack_examples(examples, 256)
    flat = FlattenedCollator()(rows)
    unpacked = PadCollator(tok.pad_token_id)(examples)
    assert flat["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))  # no padding at all
    assert "attention_mask" not in flat and flat["use_cache"] is False
    bounds = [0]
    for e in (piece for row in rows for piece in split_pack(row)):
        bounds.append(bounds[-1] + len(e["input_ids"]))
    assert flat["cu_seq_lens_q"].tolist() == bounds == flat["cu_seq_lens_k"].tolist()
    assert (flat["labels"] != IGNORE_INDEX).sum() == (unpacked["labels"] != IGNORE_INDEX).sum()
    with torch.no_grad():
        loss_unpacked = model(**unpacked).loss.item()
        loss_flat = model(**flat).loss.item()
        crossed = {k: flat[k] for k in ("input_ids", "labels")}
        crossed["position_ids"] = torch.arange(flat["input_ids"].shape[1])[None]
        loss_crossed = model(**crossed).loss.item()
    assert loss_flat == pytest.approx(loss_unpacked, abs=1e-5)
    assert abs(loss_crossed - loss_unpacked) > 1e-3


def test_padded_length_grouped_batches_lose_nothing(tiny_random, tok, examples):
    """The default layout on CPU (sdpa): examples of similar length padded into one batch. Its
    loss equals the examples' loss one at a time; the control, padding that counts as labels,
    moves it."""
    import torch

    model = load_model(tiny_random, "sdpa")
    batch = PadCollator(tok.pad_token_id)(sorted(examples, key=lambda e: len(e["input_ids"])))
    with torch.no_grad():
        total, count = 0.0, 0
        for e in examples:
            one = PadCollator(tok.pad_token_id)([e])
            n = int((one["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += model(**one).loss.item() * n
            count += n
        loss_batched = model(**batch).loss.item()
        leaky = dict(batch, labels=torch.where(batch["attention_mask"] == 0, tok.pad_token_id, batch["labels"]))
        loss_leaky = model(**leaky).loss.item()
    assert loss_batched == pytest.approx(total / count, abs=1e-5)
    assert abs(loss_leaky - total / count) > 1e-3


def test_packed_logits_equal_each_examples_own(tiny_random, tok, examples):
    import torch

    model = load_model(tiny_random, "sdpa")
    pack = pack_examples(examples, 256)[0]
    with torch.no_grad():
        logits = model(**PackedCollator(tok.pad_token_id)([pack])).logits[0]
        pos = pack["position_ids"]
        bounds = [i for i, x in enumerate(pos) if x == 0] + [len(pos)]
        for a, b in zip(bounds, bounds[1:]):
            alone = model(input_ids=torch.tensor([pack["input_ids"][a:b]])).logits[0]
            assert torch.allclose(logits[a:b], alone, atol=1e-4)


def test_train_with_packing_and_length_grouping(tmp_path, cli, tiny_random):
    import yaml

    recipe = make_recipe(tmp_path, tiny_random, data=write_jsonl(tmp_path / "d.jsonl", demo_rows(24)),
                         train={"max_steps": 2, "batch_size": 2})
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"].update(packing=True, group_by_length=True, val_fraction=0.25)
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    r = cli("train", recipe)
    assert r.code == 0, r
    losses = [rec["loss"] for rec in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "loss" in rec]
    assert losses and all(0 < x < 20 for x in losses)
    assert "sequences" in r.out  # the data line says how many packed sequences were made
