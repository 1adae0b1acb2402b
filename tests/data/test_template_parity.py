"""One rendering path: the ids inference builds for a conversation are the prompt ids training
built for it, for every template, and BOS is never doubled."""

from __future__ import annotations

import pytest

from conftest import make_recipe, tokenize_alpaca, write_jsonl
from lora_cli.data.examples import _last_supervised_start, tokenize_conversations
from lora_cli.infer.generate import build_prompt_ids
from lora_cli.data.template import TemplateSpec

SYSTEM = "你是一个乐于助人的助手。"
TURNS = [("什么是LoRA？", "一种参数高效微调方法。"), ("And QLoRA?", "LoRA on a 4-bit base."), ("哪个更省显存？", "QLoRA。")]

SPECS = {
    "human_assistant": TemplateSpec("human_assistant"),
    "alpaca": TemplateSpec("alpaca"),
    "chat_template": TemplateSpec("chat_template"),
    "custom": TemplateSpec("custom", prompt_format="<|user|>\n{instruction}\n{input}\n<|assistant|>\n",
                           system_format="<|system|>\n{system}\n", turn_separator="\n"),
    "custom_with_bos_text": TemplateSpec("custom", prompt_format="<s>[INST] {instruction} [/INST]"),
}


@pytest.fixture(scope="module")
def tok(tiny_random):
    from lora_cli.model.load import load_tokenizer

    return load_tokenizer(str(tiny_random))


def conversation(turns, system=SYSTEM) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def training_prompt(example) -> list[int]:
    return example["input_ids"][:_last_supervised_start(example["labels"])]


@pytest.mark.parametrize("name", list(SPECS))
def test_inference_prompt_ids_equal_training_prompt_ids(tok, name):
    spec = SPECS[name]
    bos_in_text = name == "custom_with_bos_text"  # a Llama-2 style template writes <s> before every turn
    system = "" if bos_in_text else SYSTEM
    for n in (1, 3):  # single turn, and a third question after two answered ones
        (example,), _ = tokenize_conversations([conversation(TURNS[:n], system)], tok, spec, 512)
        ids = build_prompt_ids(tok, spec, TURNS[n - 1][0], history=TURNS[:n - 1], system=system)
        assert ids == training_prompt(example), (name, n)
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id, (name, n)
        assert ids.count(tok.bos_token_id) == (n if bos_in_text else 1), (name, n)
        # and the answer that follows is what training supervised, closed by EOS
        answer = [t for t in example["labels"][len(ids):]]
        assert tok.decode(answer) == TURNS[n - 1][1] + tok.eos_token


def test_alpaca_row_with_input_matches_generate_with_input(tok):
    row = {"instruction": "翻译成英文", "input": "你好，世界", "output": "Hello, world."}
    for name in ("human_assistant", "alpaca", "custom"):
        (example,), _ = tokenize_alpaca([row], tok, SPECS[name], 256)
        ids = build_prompt_ids(tok, SPECS[name], row["instruction"], input=row["input"])
        assert ids == training_prompt(example), name


def test_system_prompt_from_the_recipe_is_used_by_both(tok):
    spec = TemplateSpec("human_assistant", system_prompt="Answer briefly.")
    (example,), _ = tokenize_conversations([conversation(TURNS[:1], system=None)], tok, spec, 256)
    ids = build_prompt_ids(tok, spec, TURNS[0][0])
    assert ids == training_prompt(example)
    assert tok.decode(ids) == tok.bos_token + "System: Answer briefly.\n\nHuman: 什么是LoRA？\n\nAssistant: "


def test_template_saved_with_the_adapter_renders_what_training_rendered(tmp_path, cli, tiny_random):
    """Train with a custom template; the adapter's saved recipe gives inference the same spec."""
    import yaml

    from lora_cli.model.load import load_tokenizer
    from lora_cli.model.adapter_folder import read_adapter

    chats = [{"messages": conversation(TURNS)} for _ in range(4)]
    recipe = make_recipe(tmp_path, tiny_random, data=write_jsonl(tmp_path / "chat.jsonl", chats),
                         train={"max_steps": 1})
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"].update(format="chat", template="custom", prompt_format="<|user|>\n{instruction}\n<|assistant|>\n",
                       turn_separator="\n", system_prompt="unused: the rows have their own")
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    r = cli("train", recipe)
    assert r.code == 0, r
    info = read_adapter(tmp_path / "run")
    spec = info.template
    assert spec == TemplateSpec("custom", prompt_format="<|user|>\n{instruction}\n<|assistant|>\n",
                                turn_separator="\n", system_prompt="unused: the rows have their own")
    tok = load_tokenizer(str(tmp_path / "run"))
    (example,), _ = tokenize_conversations([conversation(TURNS)], tok, spec, 512)
    ids = build_prompt_ids(tok, spec, TURNS[2][0], history=TURNS[:2], system=SYSTEM)
    assert ids == training_prompt(example)
