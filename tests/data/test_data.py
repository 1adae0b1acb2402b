"""The data path: every format and source, column mapping, weights, validation split,
truncation counts, the cache, and clear errors for bad data (through the real CLI)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import demo_rows, make_recipe, write_jsonl
from lora_cli.recipe.schema import recipe_from_dict
from lora_cli.data.template import IGNORE_INDEX

ROWS = [
    {"instruction": "用一句话解释什么是LoRA", "input": "", "output": "低秩适配：只训练小矩阵A和B。"},
    {"instruction": "Translate to English", "input": "你好，世界", "output": "Hello, world."},
    {"instruction": "What is QLoRA?", "input": "", "output": "LoRA on a 4-bit base."},
]

CHAT = {"messages": [
    {"role": "system", "content": "你是一个乐于助人的助手。"},
    {"role": "user", "content": "什么是LoRA？"},
    {"role": "assistant", "content": "一种参数高效微调方法。"},
    {"role": "user", "content": "And QLoRA?"},
    {"role": "assistant", "content": "LoRA on a quantized base."},
]}


@pytest.fixture(scope="module")
def tok(tiny_random):
    from lora_cli.model.load import load_tokenizer

    return load_tokenizer(str(tiny_random))


def data_cfg(tmp_path: Path, **data):
    """A DataConfig as a recipe would give it (validated), caching off unless asked."""
    data.setdefault("cache", False)
    raw = {"model": {"name_or_path": "m"}, "data": data, "output_dir": str(tmp_path / "run")}
    return recipe_from_dict(raw, base_dir=tmp_path).data


def build(tmp_path, tok, **data):
    from lora_cli.data.examples import build_sft_data

    return build_sft_data(data_cfg(tmp_path, **data), tok)


def supervised_text(example, tok) -> str:
    return tok.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def supervised_runs(example) -> list[list[int]]:
    """The supervised stretches of an example, as lists of ids."""
    runs, current = [], []
    for t, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --------------------------------------------------------------------------- sources

def write_sources(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    from datasets import Dataset, DatasetDict

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    paths["csv"] = tmp_path / "d.csv"
    with paths["csv"].open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["parquet"] = tmp_path / "d.parquet"
    Dataset.from_list(rows).to_parquet(str(paths["parquet"]))
    paths["disk"] = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(paths["disk"]))
    return paths


def test_every_file_kind_gives_the_same_examples(tmp_path, tok):
    paths = write_sources(tmp_path, ROWS)
    built = {kind: build(tmp_path, tok, path=str(p)) for kind, p in paths.items()}
    reference = built["jsonl"].train["input_ids"]
    assert len(reference) == 3
    for kind, data in built.items():
        assert data.train["input_ids"] == reference, kind
        assert data.train["labels"] == built["jsonl"].train["labels"], kind
    # the Chinese answer is supervised, with its EOS, and the prompt is not
    first = built["csv"].train[0]
    assert supervised_text(first, tok) == "低秩适配：只训练小矩阵A和B。" + tok.eos_token
    assert first["labels"][-1] == tok.eos_token_id


def recipe_with_data(tmp_path: Path, model: Path, **data) -> Path:
    """make_recipe, with keys of the data section set."""
    recipe = make_recipe(tmp_path, model)
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["data"].update(data)
    recipe.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return recipe


def test_hub_id_offline_is_a_clear_error(tmp_path, cli, tiny_random):
    recipe = recipe_with_data(tmp_path, tiny_random, path="someone/some-dataset", cache=False)
    r = cli("data", "preview", recipe)
    assert r.code == 2, r
    assert "cannot load hub dataset 'someone/some-dataset'" in r.err and "HF_DATASETS_OFFLINE" in r.err


def test_column_mapping_renames_fields(tmp_path, tok):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ROWS]
    mapped = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "q.jsonl", renamed)),
                   columns={"instruction": "question", "input": "context", "output": "answer"})
    plain = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "p.jsonl", ROWS)))
    assert mapped.train["input_ids"] == plain.train["input_ids"]


def test_weights_repeat_and_subsample_with_a_fixed_seed(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", demo_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", demo_rows(30)[10:])
    one = build(tmp_path, tok, path=[str(a), str(b)], weights=[2.0, 0.5])
    again = build(tmp_path, tok, path=[str(a), str(b)], weights=[2.0, 0.5])
    assert one.stats.rows == len(one.train) == 2 * 10 + 10
    assert one.train["input_ids"] == again.train["input_ids"]
    b_ids = build(tmp_path, tok, path=str(b)).train["input_ids"]
    assert all(ids in b_ids for ids in one.train["input_ids"][20:])


def test_validation_fraction_is_held_out_and_fixed(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "d.jsonl", demo_rows(40)))
    data = build(tmp_path, tok, path=path, val_fraction=0.1)
    assert len(data.train) == 36 and len(data.eval) == 4
    train_ids = {tuple(x) for x in data.train["input_ids"]}
    assert not any(tuple(x) in train_ids for x in data.eval["input_ids"])
    assert build(tmp_path, tok, path=path, val_fraction=0.1).eval["input_ids"] == data.eval["input_ids"]
    assert build(tmp_path, tok, path=path, val_fraction=0.1, seed=7).eval["input_ids"] != data.eval["input_ids"]
    no_eval = build(tmp_path, tok, path=path)
    assert no_eval.eval is None


def test_validation_file_is_tokenised_the_same_way(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", ROWS[:2])
    val = write_jsonl(tmp_path / "v.jsonl", ROWS[2:])
    data = build(tmp_path, tok, path=str(train), val_path=str(val))
    same = build(tmp_path, tok, path=str(val))
    assert data.eval["input_ids"] == same.train["input_ids"] and data.eval["labels"] == same.train["labels"]


# --------------------------------------------------------------------------- chat

def test_chat_supervises_assistant_turns_with_eos_by_default(tmp_path, tok):
    data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "c.jsonl", [CHAT])), format="chat")
    (ex,) = data.train
    answers = [tok.decode(run) for run in supervised_runs(ex)]
    assert answers == ["一种参数高效微调方法。" + tok.eos_token, "LoRA on a quantized base." + tok.eos_token]
    whole = tok.decode(ex["input_ids"])
    assert whole.startswith(tok.bos_token + "System: 你是一个乐于助人的助手。\n\nHuman: 什么是LoRA？\n\nAssistant: ")
    assert ex["input_ids"].count(tok.bos_token_id) == 1


def test_chat_switches_last_turn_and_all_turns(tmp_path, tok):
    path = str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    (last,) = build(tmp_path, tok, path=path, format="chat", train_on="last").train
    assert [tok.decode(r) for r in supervised_runs(last)] == ["LoRA on a quantized base." + tok.eos_token]
    (every,) = build(tmp_path, tok, path=path, format="chat", train_on="all").train
    assert every["labels"][1:] == every["input_ids"][1:] and every["labels"][0] == IGNORE_INDEX


def test_sharegpt_conversations_equal_openai_messages(tmp_path, tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    share = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in CHAT["messages"]]}
    a = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "s.jsonl", [share])), format="chat")
    b = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "o.jsonl", [CHAT])), format="chat")
    assert a.train["input_ids"] == b.train["input_ids"] and a.train["labels"] == b.train["labels"]


def test_chat_template_of_the_tokenizer_matches_the_same_format_by_hand(tmp_path, tok):
    # The tiny tokenizer's Jinja template writes the human_assistant format, so both paths
    # (Jinja prefixes vs text segments) must give the very same ids and labels.
    path = str(write_jsonl(tmp_path / "c.jsonl", [CHAT]))
    jinja = build(tmp_path, tok, path=path, format="chat", template="chat_template")
    text = build(tmp_path, tok, path=path, format="chat", template="human_assistant")
    assert jinja.train["input_ids"] == text.train["input_ids"]
    assert jinja.train["labels"] == text.train["labels"]


def test_custom_template_and_default_system_prompt(tmp_path, tok):
    data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "d.jsonl", ROWS[1:2])), template="custom",
                 prompt_format="<|user|>\n{instruction}\n{input}\n<|assistant|>\n", system_prompt="Be brief.")
    (ex,) = data.train
    prompt = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX])
    assert prompt == tok.bos_token + "System: Be brief.\n\n<|user|>\nTranslate to English\n你好，世界\n<|assistant|>\n"
    assert supervised_text(ex, tok) == "Hello, world." + tok.eos_token


def test_text_format_chunks_documents_and_supervises_every_token(tmp_path, tok):
    docs = [{"text": "LoRA 冻结基座模型，只训练低秩矩阵。" * 20}, {"text": "short"}, {"text": "   "}]
    data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "t.jsonl", docs)), format="text", max_length=32)
    lengths = data.train["length"]
    assert max(lengths) == 32 and len(lengths) > 3
    assert data.stats.truncated["chunked"] == 1 and data.stats.dropped["empty text"] == 1
    for ex in data.train:
        assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]
    assert data.train[-1]["input_ids"][-1] == tok.eos_token_id


# --------------------------------------------------------------------------- truncation

def test_truncation_counted_by_reason_and_keeps_supervision(tmp_path, tok):
    rows = [{"instruction": "长问题" * 60, "output": "短答。"},       # prompt cut
            {"instruction": "Q?", "output": "long answer " * 60},     # answer cut
            {"instruction": "ok", "output": "fine"},
            {"instruction": "empty", "output": ""}]
    data = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=48)
    s = data.stats
    assert s.truncated == {"prompt": 1, "response": 1} and s.dropped == {"empty answer": 1} and s.kept == 3
    for ex in data.train:
        assert len(ex["input_ids"]) <= 48 and any(t != IGNORE_INDEX for t in ex["labels"])
        assert ex["input_ids"][0] == tok.bos_token_id
    assert supervised_text(data.train[0], tok) == "短答。" + tok.eos_token  # the answer survives whole
    assert "truncated: 1 prompt, 1 response" in s.summary() and "dropped: 1 empty answer" in s.summary()


def test_multi_turn_truncation_cuts_the_oldest_turns_first(tmp_path, tok):
    long_chat = {"messages": [{"role": "user", "content": "第一个问题" * 30}, {"role": "assistant", "content": "旧的回答" * 30},
                              {"role": "user", "content": "last question"}, {"role": "assistant", "content": "last answer"}]}
    (ex,) = build(tmp_path, tok, path=str(write_jsonl(tmp_path / "c.jsonl", [long_chat])), format="chat", max_length=64).train
    assert len(ex["input_ids"]) == 64
    assert tok.decode(ex["input_ids"]).endswith("Human: last question\n\nAssistant: last answer" + tok.eos_token)
    assert tok.decode(supervised_runs(ex)[-1]) == "last answer" + tok.eos_token


# --------------------------------------------------------------------------- cache

def test_cache_reuses_and_invalidates(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    settings = {"path": str(path), "cache": True, "cache_dir": str(tmp_path / "cache")}
    first = build(tmp_path, tok, **settings)
    second = build(tmp_path, tok, **settings)
    assert not first.stats.from_cache and second.stats.from_cache
    assert second.train["input_ids"] == first.train["input_ids"] and second.stats.kept == 3
    assert "from cache" in second.stats.summary()
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # not the work folder
    assert len(entries) == 1 and sorted(f.name for f in entries[0].iterdir()) == ["stats.json", "train.arrow"]
    # a change in the template, a setting, or the data re-tokenises
    assert not build(tmp_path, tok, **settings, template="alpaca").stats.from_cache
    assert not build(tmp_path, tok, **settings, max_length=64).stats.from_cache
    write_jsonl(path, ROWS[:2])
    changed = build(tmp_path, tok, **settings)
    assert not changed.stats.from_cache and len(changed.train) == 2
    # and a change in the tokenizer (here its chat template) too
    from lora_cli.data.cache import tokenizer_fingerprint

    before = tokenizer_fingerprint(tok)
    original, tok.chat_template = tok.chat_template, "{{ messages }}"
    try:
        assert tokenizer_fingerprint(tok) != before
    finally:
        tok.chat_template = original


def test_cache_key_covers_every_module_the_data_path_imports():
    from lora_cli.data.cache import imported_modules

    found = imported_modules("lora_cli.data.examples")
    # what data.py imports at module level, inside functions, and through the modules it imports
    assert {"lora_cli.data.examples", "lora_cli.data.formats", "lora_cli.data.template", "lora_cli.data.cache", "lora_cli.errors"} <= set(found)
    assert "lora_cli.train.run" not in found and "lora_cli.infer.generate" not in found  # nothing the data path does not run


def test_a_new_module_the_data_path_imports_changes_the_cache_key(tmp_path):
    """A module added later (and imported lazily, inside a function) cannot be forgotten: the key
    follows the imports, not a list someone has to keep."""
    import shutil

    import lora_cli
    from lora_cli.data.cache import code_fingerprint

    package = tmp_path / "lora_cli"
    shutil.copytree(Path(lora_cli.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_fingerprint(package_dir=package) == code_fingerprint()
    (package / "shaping.py").write_text("SEPARATOR = '\\n'\n")
    template = package / "data" / "template.py"
    template.write_text(template.read_text() + "\n\ndef separator():\n    from lora_cli.shaping import SEPARATOR\n\n"
                        "    return SEPARATOR\n")
    before = code_fingerprint(package_dir=package)
    (package / "shaping.py").write_text("SEPARATOR = '\\n\\n'\n")
    assert code_fingerprint(package_dir=package) != before
    (package / "unrelated.py").write_text("X = 1\n")  # a module the data path does not import
    after = code_fingerprint(package_dir=package)
    (package / "unrelated.py").write_text("X = 2\n")
    assert code_fingerprint(package_dir=package) == after


def test_cache_and_data_do_not_import_each_other():
    import ast

    import lora_cli.data.cache

    tree = ast.parse(Path(lora_cli.data.cache.__file__).read_text(encoding="utf-8"))
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not any(name.startswith("lora_cli.data.examples") for name in names if name)


# --------------------------------------------------------------------------- errors, through the CLI

def preview(cli, tmp_path, model, rows_text: str, suffix=".jsonl", **data):
    path = tmp_path / f"bad{suffix}"
    path.write_text(rows_text, encoding="utf-8")
    return cli("data", "preview", recipe_with_data(tmp_path, model, path=str(path), cache=False, **data))


@pytest.mark.parametrize("text, fmt, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "alpaca",
     "bad.jsonl, row 2: missing field 'output'"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "alpaca",
     "bad.jsonl, row 2 (line 3): missing field 'output'"),
    ('{"instruction": "a", "output": 42}\n', "alpaca", "bad.jsonl, row 1: field 'output' must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "chat", "bad.jsonl, row 1: conversation has no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "chat", "bad.jsonl, row 1, turn 1: unknown role 'robot'"),
    ('{"conversations": "hi"}\n', "chat", "field 'conversations' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}\n', "chat",
     "bad.jsonl, row 1, turn 2: a system turn must come first"),
    ('{"messages": [{"role": "user", "content": null}]}\n', "chat", "turn 1: content must be a string or a list of text parts, got NoneType"),
    ('{"body": "x"}\n', "text", "bad.jsonl, row 1: missing field 'text'"),
    ("\n\n", "alpaca", "bad.jsonl: no rows"),
])
def test_bad_rows_name_file_and_row(tmp_path, cli, tiny_random, text, fmt, message):
    r = preview(cli, tmp_path, tiny_random, text, format=fmt)
    assert r.code == 2, r
    assert message in r.err and "Traceback" not in r.err + r.out


def test_bad_csv_row_and_empty_csv(tmp_path, cli, tiny_random):
    r = preview(cli, tmp_path, tiny_random, "instruction,output\nhello,world\n", suffix=".csv", format="chat")
    assert r.code == 2 and "bad.csv, row 1: missing field 'messages'" in r.err, r
    r = preview(cli, tmp_path, tiny_random, "instruction,output\n", suffix=".csv")
    assert r.code == 2 and "bad.csv: no rows" in r.err, r


def test_missing_field_hints_at_column_mapping(tmp_path, cli, tiny_random):
    r = preview(cli, tmp_path, tiny_random, '{"question": "a", "answer": "b"}\n', format="alpaca")
    assert r.code == 2 and "missing field 'instruction'" in r.err and "data.columns" in r.err, r
    r = preview(cli, tmp_path, tiny_random, '{"question": "a", "answer": "b"}\n')  # format left out
    assert r.code == 2 and "row 1: cannot tell the format; the row has: question, answer" in r.err, r
    assert "data.columns" in r.err and "data.format" in r.err, r


@pytest.mark.parametrize("data, message", [
    ({"template": "custom"}, "data.prompt_format: required by template: custom"),
    ({"template": "custom", "prompt_format": "<user> {input}"}, "has no {instruction} placeholder"),
    ({"template": "custom", "prompt_format": "{instuction} {input}"}, "unknown placeholder {instuction}"),
    ({"system_format": "SYS:"}, "data.system_format: 'SYS:' has no {system} placeholder"),
    ({"columns": {"instrution": "q"}}, "did you mean 'instruction'"),
    ({"weights": [1, 2]}, "data.weights: 2 weights for 1 paths"),
    ({"path": "missing.csv"}, "missing.csv does not exist"),
    ({"val_fraction": 0.1, "val_path": "x.jsonl"}, "data.val_fraction: set together with data.val_path"),
])
def test_recipe_data_mistakes_are_reported_before_loading(tmp_path, cli, tiny_random, data, message):
    r = cli("check", recipe_with_data(tmp_path, tiny_random, **data))
    assert r.code == 2 and message in r.err, r


# --------------------------------------------------------------------------- preview

def test_preview_shows_rows_histogram_share_and_counts(tmp_path, cli, tiny_random):
    rows = ROWS * 4 + [{"instruction": "长问题" * 80, "output": "答。"}]
    recipe = make_recipe(tmp_path, tiny_random, data=write_jsonl(tmp_path / "d.jsonl", rows))
    r = cli("data", "preview", recipe, "--rows", "1", "--set", "data.packing=true", "--set", "data.max_length=64")
    assert r.code == 0, r
    assert "Assistant: " in r.out and "example 1" in r.out and "example 2" not in r.out
    assert "lengths" in r.out and re.search(r"\d+-\d+ +#+ +\d+", r.out) and "█" not in r.out  # plain bars when piped
    assert "Assistant: [[" in r.out and "]]" in r.out  # supervised text marked without colour
    assert "13 read, 13 kept, 1 truncated, 0 dropped" in r.out and "truncated (prompt): 1" in r.out
    assert "tokens (" in r.out and "13 examples -> " in r.out and "sequences of <= 64 tokens" in r.out


def test_batched_backend_tokenisation_equals_the_tokenizer_call(tok):
    from lora_cli.data.template import tokenize_texts

    texts = [r["instruction"] for r in demo_rows(20)] + ["System: 你好\n\n", "", "Human: hi\n\nAssistant: "] * 2
    assert tokenize_texts(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_chat_template_without_one_in_the_tokenizer_is_a_clear_error(tmp_path, cli, tiny_random):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_random, model)
    (model / "chat_template.jinja").unlink()
    recipe = recipe_with_data(tmp_path, model, path=str(write_jsonl(tmp_path / "c.jsonl", [CHAT])),
                              format="chat", template="chat_template", cache=False)
    r = cli("data", "preview", recipe)
    assert r.code == 2 and "the tokenizer has no chat template" in r.err, r
