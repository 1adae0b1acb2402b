"""The data people bring: tool-calling conversations (ShareGPT and OpenAI shapes), content as
text parts, per-message loss flags, .txt / .md documents, format detection, and the refusals
for each; every shape built here as a small file and run through the real data path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import make_recipe, write_jsonl
from lora_cli.recipe.schema import recipe_from_dict
from lora_cli.data.template import IGNORE_INDEX

WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}

SHAREGPT_TOOLS = {
    "conversations": [
        {"from": "human", "value": "巴黎天气怎么样？"},
        {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
        {"from": "observation", "value": "18°C, sunny"},
        {"from": "gpt", "value": "巴黎18度，晴。"},
    ],
    "tools": json.dumps([WEATHER], ensure_ascii=False),  # ShareGPT dumps keep the schemas as a JSON string
}
OPENAI_TOOLS = {
    "messages": [
        {"role": "user", "content": "巴黎天气怎么样？"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C, sunny"},
        {"role": "assistant", "content": "巴黎18度，晴。"},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}
PLAIN = {"messages": [{"role": "user", "content": "What is LoRA?"}, {"role": "assistant", "content": "Low-rank adapters."}]}

# A chat template with tools support (tools, tool_calls and the tool role), as Qwen / Hermes
# style templates have: every feature is rendered, so the test sees what is supervised.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}Tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n\n{% endif %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Human: {{ m['content'] }}\n\nAssistant: "
    "{% elif m['role'] == 'tool' %}Result: {{ m['content'] }}\n\nAssistant: "
    "{% else %}{{ m['content'] or '' }}{% for c in m.tool_calls or [] %}CALL {{ c['function']['name'] }} "
    "{{ c['function']['arguments'] | tojson }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tok(tiny_random):
    from lora_cli.model.load import load_tokenizer

    return load_tokenizer(str(tiny_random))


def build(tmp_path: Path, tok, **data):
    from lora_cli.data.examples import build_sft_data

    data.setdefault("cache", False)
    raw = {"model": {"name_or_path": "m"}, "data": data, "output_dir": str(tmp_path / "run")}
    return build_sft_data(recipe_from_dict(raw, base_dir=tmp_path).data, tok)


def runs(example, tok, supervised: bool) -> list[str]:
    """The decoded stretches of an example that are supervised (or masked), in order."""
    from lora_cli.data.examples import label_runs

    return [tok.decode(ids) for flag, ids in label_runs(example) if flag == supervised]


def recipe_for(tmp_path: Path, model: Path, **data) -> Path:
    recipe = make_recipe(tmp_path, model)
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"].pop("format", None)  # left out: detected, unless the test sets it
    raw["data"].update({"cache": False, **data})
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return recipe


def preview_rows(cli, tmp_path, model, rows: list, **data):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    return cli("data", "preview", recipe_for(tmp_path, model, path=str(path), **data))


def refusal(tmp_path, tok, rows: list, **data) -> str:
    """The error (with its fix) building these rows gives; the CLI prints it and exits 2."""
    from lora_cli.errors import DataError

    with pytest.raises(DataError) as caught:
        build(tmp_path, tok, path=str(write_jsonl(tmp_path / "rows.jsonl", rows)), **data)
    return str(caught.value)


# --------------------------------------------------------------------------- tool calls

def test_sharegpt_and_openai_tool_calls_render_alike_with_calls_supervised_and_results_masked(tmp_path, tok):
    share = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT_TOOLS])))
    openai = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "o.jsonl", [OPENAI_TOOLS])))
    assert share.train["input_ids"] == openai.train["input_ids"] and share.train["labels"] == openai.train["labels"]
    (ex,) = openai.train
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert runs(ex, tok, True) == [call + tok.eos_token, "巴黎18度，晴。" + tok.eos_token]
    masked = "".join(runs(ex, tok, False))
    assert '"name": "get_weather", "description": "Weather of a city"' in masked  # the schema: context
    assert "Human: <tool_response>18°C, sunny</tool_response>\n\nAssistant: " in masked  # the result: context
    assert "format chat (detected)" in openai.stats.summary()


def test_parallel_tool_results_share_one_turn(tmp_path, tok):
    row = json.loads(json.dumps(OPENAI_TOOLS))
    row["messages"][1]["tool_calls"].append({"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}})
    row["messages"].insert(3, {"role": "tool", "content": "20°C"})
    (ex,) = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "p.jsonl", [row]))).train
    assert "<tool_response>18°C, sunny</tool_response>\n<tool_response>20°C</tool_response>" in "".join(runs(ex, tok, False))
    assert runs(ex, tok, True)[0].count("<tool_call>") == 2


def test_tool_calls_through_a_chat_template_with_tools_support(tmp_path, tok):
    original, tok.chat_template = tok.chat_template, TOOLS_TEMPLATE
    try:
        data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT_TOOLS])), template="chat_template")
    finally:
        tok.chat_template = original
    (ex,) = data.train
    assert runs(ex, tok, True) == ['CALL get_weather {"city": "Paris"}' + tok.eos_token, "巴黎18度，晴。" + tok.eos_token]
    # (Hugging Face renders with trim_blocks: the newline after {% endfor %} goes)
    assert runs(ex, tok, False) == [tok.bos_token + "Tools: get_weather \nHuman: 巴黎天气怎么样？\n\nAssistant: ",
                                    "Result: 18°C, sunny\n\nAssistant: "]


def test_a_chat_template_without_tools_support_refuses_tool_rows(tmp_path, cli, tiny_random):
    r = preview_rows(cli, tmp_path, tiny_random, [OPENAI_TOOLS], template="chat_template")
    assert r.code == 2 and "chat template has no support for tools, tool_calls, tool" in r.err, r
    assert "use template: human_assistant" in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("turn, message", [
    ({"from": "function_call", "value": "{get_weather"}, "turn 2: function_call value is not valid JSON"),
    ({"from": "function_call", "value": '{"arguments": {}}'}, "turn 2, tool call 1: a tool call needs a 'name'"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "turn 2, tool call 1: arguments of 'f' are not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]},
     "turn 2, tool call 1: arguments of 'f' must be a JSON object, got list"),
    ({"role": "user", "content": "x", "tool_calls": [CALL]}, "turn 2: a 'user' turn carries tool calls"),
    ({"role": "assistant", "tool_calls": "get_weather"}, "turn 2: tool_calls must be a list"),
])
def test_malformed_tool_turns_name_file_row_and_turn(tmp_path, tok, turn, message):
    row = {"messages": [{"role": "user", "content": "q"}, turn, {"role": "assistant", "content": "a"}]}
    error = refusal(tmp_path, tok, [PLAIN, row])
    assert f"rows.jsonl, row 2, {message}" in error and "fix:" in error


@pytest.mark.parametrize("tools, message", [
    ("[{oops", "field 'tools': not valid JSON"),
    ([{"description": "no name"}], "field 'tools', tool 1: a function schema needs a 'name'"),
    ({"get_weather": {}}, "field 'tools': expected a list of function schemas, got dict"),
])
def test_malformed_tools_are_refused(tmp_path, tok, tools, message):
    error = refusal(tmp_path, tok, [dict(PLAIN, tools=tools)])
    assert f"rows.jsonl, row 1, {message}" in error and "fix:" in error


def test_dry_run_shows_the_tool_call_supervised(tmp_path, cli, tiny_random):
    path = write_jsonl(tmp_path / "tools.jsonl", [SHAREGPT_TOOLS, OPENAI_TOOLS])
    r = cli("train", recipe_for(tmp_path, tiny_random, path=str(path)), "--dry-run")
    assert r.code == 0, r
    supervised = next(line for line in r.out.splitlines() if line.startswith("supervised:"))
    assert "<tool_call>" in supervised and "巴黎18度，晴。" in supervised and "18°C" not in supervised


# --------------------------------------------------------------------------- generate / chat with --tools

def test_inference_prompt_with_tools_is_the_prompt_training_built(tmp_path, tok):
    from lora_cli.infer.generate import build_prompt_ids

    row = {"messages": [{"role": "user", "content": "巴黎天气怎么样？"}, {"role": "assistant", "content": "晴。"}],
           "tools": [WEATHER]}
    (ex,) = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "t.jsonl", [row]))).train
    first_answer = ex["labels"].index(next(t for t in ex["labels"] if t != IGNORE_INDEX))
    tools = [{"type": "function", "function": WEATHER}]
    assert build_prompt_ids(tok, "human_assistant", "巴黎天气怎么样？", tools=tools) == ex["input_ids"][:first_answer]


def test_generate_takes_tools_and_refuses_a_bad_tools_file(tmp_path, cli, tiny_random):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    r = cli("generate", "--base", tiny_random, "--tools", tools, "--max-new-tokens", "2", "-o", out, "巴黎天气怎么样？")
    assert r.code == 0, r
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert "System:" not in row["prompt"]  # the tools stand alone; no system turn is invented
    assert '{"name": "get_weather"' in row["prompt"] and row["prompt"].endswith("Human: 巴黎天气怎么样？\n\nAssistant: ")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"description": "x"}]', encoding="utf-8")
    r = cli("generate", "--base", tiny_random, "--tools", bad, "hi")
    assert r.code == 2 and f"--tools {bad}, tool 1: a function schema needs a 'name'" in r.err, r
    r = cli("chat", "--base", tiny_random, "--tools", tmp_path / "missing.json")
    assert r.code == 2 and "no such file" in r.err, r


# --------------------------------------------------------------------------- content parts

def test_content_as_text_parts_equals_the_string(tmp_path, tok):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "LoRA?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Low-rank adapters."}]}]}
    a = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "p.jsonl", [parts])))
    b = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "s.jsonl", [PLAIN])))
    assert a.train["input_ids"] == b.train["input_ids"] and a.train["labels"] == b.train["labels"]


def test_a_non_text_part_is_refused_naming_row_turn_and_part(tmp_path, cli, tiny_random):
    image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                        {"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat."}]}
    r = preview_rows(cli, tmp_path, tiny_random, [PLAIN, image])
    assert r.code == 2 and "rows.jsonl, row 2, turn 1, content part 2: type 'image_url' is not text" in r.err, r
    assert "remove the non-text parts" in r.err


# --------------------------------------------------------------------------- per-message loss

FLAGGED = {"messages": [
    {"role": "user", "content": "Say hi.", "train": True},
    {"role": "assistant", "content": "Hello there.", "weight": 0},
    {"role": "user", "content": "Again."},
    {"role": "assistant", "content": "Hi.", "loss_weight": 1.0},
]}


def test_per_message_flags_override_train_on(tmp_path, tok):
    data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "f.jsonl", [FLAGGED])))
    (ex,) = data.train
    assert runs(ex, tok, True) == ["Human: Say hi.\n\nAssistant: ", "Hi." + tok.eos_token]
    assert "Hello there." in "".join(runs(ex, tok, False))
    assert data.stats.turn_flags == {"supervised": 2, "masked": 1}
    # train_on: last would supervise only "Hi."; the flags still win on their own turns
    (last,) = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "f.jsonl", [FLAGGED])), train_on="last").train
    assert runs(last, tok, True) == runs(ex, tok, True)


def test_preview_shows_per_message_flags(tmp_path, cli, tiny_random):
    r = preview_rows(cli, tmp_path, tiny_random, [FLAGGED, PLAIN])
    assert r.code == 0, r
    assert "per-turn  1 turns masked, 2 turns supervised by their own weight / loss_weight / train flag" in r.out


@pytest.mark.parametrize("flags, message", [
    ({"weight": 0.5}, "turn 2: weight must be 0 or 1 (or true / false), got 0.5"),
    ({"train": "yes"}, "turn 2: train must be 0 or 1 (or true / false), got 'yes'"),
    ({"weight": 1, "train": False}, "turn 2: loss flags disagree (weight=True, train=False)"),
])
def test_bad_loss_flags_are_refused(tmp_path, tok, flags, message):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **flags}]}
    error = refusal(tmp_path, tok, [row])
    assert f"rows.jsonl, row 1, {message}" in error and "fix:" in error


# --------------------------------------------------------------------------- .txt / .md documents

def test_text_files_and_folders_are_documents(tmp_path, tok):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("LoRA 冻结基座。\n\nQLoRA 量化基座。\n", encoding="utf-8")
    (folder / "sub" / "b.md").write_text("# Title\n\nBody text.\n", encoding="utf-8")
    (folder / "notes.json").write_text("{}", encoding="utf-8")  # not a document: skipped
    one = build(tmp_path, tok, path=str(folder / "a.txt"))
    assert one.stats.rows == 1 and "format text (detected)" in one.stats.summary()
    (ex,) = one.train
    assert tok.decode(ex["input_ids"]) == tok.bos_token + "LoRA 冻结基座。\n\nQLoRA 量化基座。\n" + tok.eos_token
    assert build(tmp_path, tok, path=str(folder)).stats.rows == 2  # one document per file
    paragraphs = build(tmp_path, tok, path=str(folder), document_split="blank_lines")
    assert paragraphs.stats.rows == 4
    assert [tok.decode(e["input_ids"][1:-1]) for e in paragraphs.train] == [
        "LoRA 冻结基座。", "QLoRA 量化基座。", "# Title", "Body text."]


def test_text_files_with_a_conversation_format_are_refused(tmp_path, cli, tiny_random):
    doc = tmp_path / "doc.txt"
    doc.write_text("some text\n", encoding="utf-8")
    r = cli("data", "preview", recipe_for(tmp_path, tiny_random, path=str(doc), format="alpaca"))
    assert r.code == 2 and "doc.txt: .txt / .md documents are format text, but data.format is alpaca" in r.err, r
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("data", "preview", recipe_for(tmp_path, tiny_random, path=str(empty)))
    assert r.code == 2 and "a folder with no .txt / .md files" in r.err, r


def test_documents_and_conversations_do_not_mix(tmp_path, cli, tiny_random):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n", encoding="utf-8")
    chat = write_jsonl(tmp_path / "chat.jsonl", [PLAIN])
    r = cli("data", "preview", recipe_for(tmp_path, tiny_random, path=[str(chat), str(doc)]))
    assert r.code == 2 and "text documents mixed with conversations" in r.err and "chat (detected)" in r.err, r


# --------------------------------------------------------------------------- format detection

def test_format_detected_and_said(tmp_path, tok):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a"}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}])
    assert "format alpaca (detected)" in build(tmp_path, tok, path=str(alpaca)).stats.summary()
    assert "format text (detected)" in build(tmp_path, tok, path=str(text)).stats.summary()
    mixed = build(tmp_path, tok, path=[str(alpaca), str(write_jsonl(tmp_path / "c.jsonl", [PLAIN]))])
    assert "format alpaca (detected), chat (detected)" in mixed.stats.summary() and mixed.stats.kept == 2
    assert "detected" not in build(tmp_path, tok, path=str(alpaca), format="alpaca").stats.summary()


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a", "messages": PLAIN["messages"]}],
     "row 2: the format is ambiguous, the row fits alpaca and chat"),
    ([{"instruction": "q", "output": "a"}, PLAIN], "row 2: this row is chat but"),
    ([{"prompt": "q", "completion": "a"}], "row 1: cannot tell the format; the row has: prompt, completion"),
])
def test_ambiguous_mixed_or_unknown_files_are_refused_naming_the_row(tmp_path, tok, rows, message):
    error = refusal(tmp_path, tok, rows)
    assert f"rows.jsonl, {message}" in error and "data.format" in error


# --------------------------------------------------------------------------- on disk, a batch at a time

def test_batches_give_the_same_examples_and_live_on_disk(tmp_path, tok, monkeypatch):
    from lora_cli.data import examples as data_module

    rows = [SHAREGPT_TOOLS, OPENAI_TOOLS, FLAGGED, PLAIN] * 3
    path = str(write_jsonl(tmp_path / "r.jsonl", rows))
    whole = build(tmp_path, tok, path=path, val_fraction=0.25)
    monkeypatch.setattr(data_module, "BATCH_ROWS", 2)
    small = build(tmp_path, tok, path=path, val_fraction=0.25)
    assert small.train["input_ids"] == whole.train["input_ids"] and small.eval["labels"] == whole.eval["labels"]
    assert small.stats.to_dict() == whole.stats.to_dict()
    assert whole.train.cache_files and whole.eval.cache_files  # memory-mapped Arrow files, not Python lists


def test_recipe_check_accepts_text_files_and_folders(tmp_path, cli, tiny_random):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n", encoding="utf-8")
    assert cli("check", recipe_for(tmp_path, tiny_random, path=str(doc))).code == 0
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
