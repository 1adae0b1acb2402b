"""Prompt masking as the source workflow does it, without its pitfalls."""

from __future__ import annotations

import pytest

from conftest import tokenize_alpaca
from lora_cli.data.examples import PadCollator, fit_to_length
from lora_cli.data.template import IGNORE_INDEX, conversation_segments, history_messages, prompt_ids, with_bos


@pytest.fixture(scope="module")
def tok(tiny_random):
    from lora_cli.model.load import load_tokenizer

    return load_tokenizer(str(tiny_random))


def render_prompt(template: str, instruction: str, input: str = "") -> str:
    """The prompt text training and inference put before an answer (a text template's only segment)."""
    (segment,) = conversation_segments(template, history_messages((), instruction, input), add_generation_prompt=True)
    return segment.text


def test_human_assistant_prompt_is_the_source_workflows():
    assert render_prompt("human_assistant", "考试有哪些技巧?") == "Human: 考试有哪些技巧?\n\nAssistant: "
    assert render_prompt("human_assistant", "Translate", "你好") == "Human: Translate\n你好\n\nAssistant: "


def test_alpaca_prompt_with_and_without_input():
    assert render_prompt("alpaca", "Sort", "3 1 2").endswith("### Input:\n3 1 2\n\n### Response:\n")
    no_input = render_prompt("alpaca", "Say hi")
    assert "### Input" not in no_input and no_input.endswith("### Instruction:\nSay hi\n\n### Response:\n")


def test_labels_mask_prompt_and_supervise_response_and_eos(tok):
    # The tiny tokenizer has no pad token, so EOS doubles as pad: the classic way to
    # lose EOS from the loss and get a model that never stops.
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"instruction": "用一句话解释什么是LoRA", "input": "", "output": "低秩适配。"}]
    (ex,), stats = tokenize_alpaca(rows, tok, "human_assistant", 256)
    prompt = prompt_ids(tok, "human_assistant", history_messages((), rows[0]["instruction"]))  # what inference sends
    response = tok("低秩适配。", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt + response + [tok.eos_token_id]
    # not shifted: label i is the token at i (the model shifts), prompt positions ignored
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    # padding a batch keeps the EOS label even though pad id == EOS id
    batch = PadCollator(tok.pad_token_id)([ex, {k: v[:3] for k, v in ex.items()}])
    assert batch["labels"][0, len(ex["labels"]) - 1].item() == tok.eos_token_id
    assert (batch["labels"][1, 3:] == IGNORE_INDEX).all() and (batch["attention_mask"][1, 3:] == 0).all()
    assert stats.kept == 1 and stats.supervised_tokens == len(response) + 1


def test_bos_never_doubled_when_text_starts_with_it(tok):
    text_ids = tok(tok.bos_token + "Human: hi\n\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert text_ids[0] == tok.bos_token_id
    assert with_bos(tok, text_ids).count(tok.bos_token_id) == 1
    assert with_bos(tok, text_ids[1:]) == text_ids  # and added once where the text lacks it


def test_truncation_cuts_prompt_first_and_keeps_supervision():
    prompt, response = list(range(100)), list(range(1000, 1010))
    p, r, cut = fit_to_length(prompt, response, 50, keep_first=1)
    assert cut == "prompt" and r == response and len(p) + len(r) == 50
    assert p[0] == 0 and p[-1] == 99  # BOS kept, the end of the prompt (the "Assistant:" marker) kept
    p, r, cut = fit_to_length(list(range(10)), list(range(1000, 1100)), 40, keep_first=1)
    assert cut == "response" and p == list(range(10)) and r == list(range(1000, 1030))
    p, r, cut = fit_to_length(list(range(100)), list(range(1000, 1100)), 40)
    assert cut == "prompt+response" and len(p) == 20 and len(r) == 20


def test_rows_without_supervised_tokens_are_dropped_and_counted(tok, monkeypatch):
    import lora_cli.data.examples as data

    rows = [{"instruction": "a" * 50, "output": "b"}, {"instruction": "c", "output": "d"}]
    # A cutting rule that leaves no response must never yield an all -100 row.
    monkeypatch.setattr(data, "fit_to_length", lambda p, r, n, keep_first=0: (p[:n], [], "response"))
    examples, stats = tokenize_alpaca(rows, tok, "human_assistant", 8)
    assert examples == [] and stats.dropped["no supervised token left after truncation"] == 2
    assert "0/2 rows kept" in stats.summary()
