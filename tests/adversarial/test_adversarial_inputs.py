"""Hostile input, every command: each case sets up what a new user might really have lying
around (a recipe with .nan, a YAML alias bomb, a GBK-encoded data file, a truncated adapter, a
pickle, a full disk), runs the real command in-process, and asserts that it exits 2 (or the
code the case documents), prints no traceback, names the culprit, and leaves the user's files
exactly as they were. docs/reliability.md lists these cases; a test keeps the two in step.

To add a case: write a setup function that builds the files in `ctx.root` and returns the
command's argv, add a Case to CASES, and add its name to the table in docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from conftest import REPO, demo_rows, make_recipe
from inference_helpers import random_adapter
from safety_helpers import assert_clean_refusal, assert_tree_unchanged, snapshot_tree

GBK = "用一句话解释什么是LoRA".encode("gbk")  # what a Windows editor in a Chinese locale saves


@dataclass
class Ctx:
    root: Path          # the user's folder: snapshotted before and after
    base: Path          # a tiny model outside root (session fixture; never written)
    adapter_src: Path   # a valid random adapter outside root, copied in by cases that need one
    monkeypatch: pytest.MonkeyPatch

    def recipe(self, **sections) -> Path:
        """A valid recipe in root with `sections` merged in (make_recipe's own `data`
        argument is the data file, so the data section is merged here)."""
        data_section = sections.pop("data", {})
        data = Path(data_section["path"]) if "path" in data_section else None
        path = make_recipe(self.root, self.base, data, **sections)
        if data_section:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            raw["data"].update(data_section)
            path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        return path

    def raw_recipe(self, text: str | bytes, name: str = "recipe.yaml") -> Path:
        path = self.root / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    def adapter(self, name: str = "adapter") -> Path:
        dest = self.root / name
        shutil.copytree(self.adapter_src, dest)
        return dest

    def truncated_adapter(self, name: str = "adapter") -> Path:
        dest = self.adapter(name)
        weights = dest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return dest


@dataclass
class Case:
    name: str
    setup: Callable[[Ctx], list]   # builds the user's files, returns argv
    culprit: str                   # text the message must contain (key, file, flag, line)
    code: int = 2


# --------------------------------------------------------------------------- recipes

def _set_key(section: str, key: str, value):
    return lambda ctx: ["check", ctx.recipe(**{section: {key: value}})]


def _yaml_value(section: str, key: str, yaml_text: str):
    """A recipe where section.key is written as raw YAML (e.g. .nan, which safe_dump would quote)."""
    def setup(ctx):
        path = ctx.recipe()
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw[section].pop(key, None)
        text = yaml.safe_dump(raw).replace(f"{section}:\n", f"{section}:\n  {key}: {yaml_text}\n", 1)
        path.write_text(text, encoding="utf-8")
        return ["check", path]
    return setup


def _billion_laughs(ctx):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return ["check", ctx.raw_recipe("\n".join(lines) + "\n")]


def _oversized_recipe(ctx):
    return ["check", ctx.raw_recipe("model:\n  name_or_path: " + "x" * (2 << 20) + "\n")]


def _long_value(ctx):
    """A 500 KB value where a number belongs: the message quotes it shortened."""
    return ["check", ctx.recipe(train={"epochs": "9" * 10 + "x" * 500_000})]


def _deep_nesting(ctx):
    return ["check", ctx.raw_recipe("model: " + "[" * 50_000 + "]" * 50_000 + "\n")]


def _recipe_is_list(ctx):
    return ["check", ctx.raw_recipe("- model\n- lora\n")]


def _binary_recipe(ctx):
    return ["check", ctx.raw_recipe(b"model:\n  name_or_path: x\n" + bytes(range(128, 256)) * 4)]


def _recipe_is_folder(ctx):
    (ctx.root / "recipe.yaml").mkdir()
    return ["check", ctx.root / "recipe.yaml"]


def _recipe_unreadable(ctx):
    path = ctx.recipe()
    path.chmod(0)
    return ["check", path]


def _permission_denied(ctx, path: Path):
    """Reading `path` fails as a file without read permission does (also when tests run as root)."""
    real_open = Path.open

    def denied_open(self, *args, **kwargs):
        if Path(self) == path:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_open(self, *args, **kwargs)
    ctx.monkeypatch.setattr(Path, "open", denied_open)


def _recipe_permission_denied(ctx):
    path = ctx.recipe()
    _permission_denied(ctx, path)
    return ["check", path]


def _data_permission_denied(ctx):
    recipe = ctx.recipe()
    _permission_denied(ctx, ctx.root / "data.jsonl")
    return ["data", "preview", recipe]


def _recipe_symlink_loop(ctx):
    (ctx.root / "loop.yaml").symlink_to(ctx.root / "loop.yaml")
    return ["check", ctx.root / "loop.yaml"]


def _data_path_too_long(ctx):
    return ["check", ctx.recipe(data={"path": "d" * 5000 + ".jsonl"})]


def _set_alias_bomb(ctx):
    bomb = "{a0: &a0 [l, l, l, l, l, l, l, l, l], " + ", ".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)) + "}"
    return ["check", ctx.recipe(), "--set", f"data.columns={bomb}"]


def _set_override(text: str):
    return lambda ctx: ["check", ctx.recipe(), "--set", text]


def _duplicate_key(ctx):
    """train.learning_rate written twice (a merge of two edits): YAML keeps the last silently."""
    text = ctx.recipe().read_text(encoding="utf-8").replace("train:\n", "train:\n  learning_rate: 0.5\n", 1)
    return ["check", ctx.raw_recipe(text)]


def _duplicate_section(ctx):
    text = ctx.recipe().read_text(encoding="utf-8") + "lora:\n  r: 64\n"
    return ["check", ctx.raw_recipe(text)]


def _recipe_lone_surrogate(ctx):
    text = ctx.recipe().read_text(encoding="utf-8").replace("data:\n", 'data:\n  system_prompt: "caf\\ud800"\n', 1)
    return ["check", ctx.raw_recipe(text)]


def _fifo(ctx, name: str) -> Path:
    path = ctx.root / name
    os.mkfifo(path)
    return path


# --------------------------------------------------------------------------- data and prompt files

def _gbk_jsonl(ctx):
    rows = [json.dumps(r, ensure_ascii=False) + "\n" for r in demo_rows(4)]
    data = ctx.root / "data.jsonl"
    data.write_bytes("".join(rows[:2]).encode("utf-8") + b'{"instruction": "' + GBK + b'", "output": "x"}\n')
    return ["data", "preview", ctx.recipe(data={"path": str(data)})]


def _gbk_csv(ctx):
    data = ctx.root / "data.csv"
    data.write_bytes(b"instruction,output\nhello,world\n" + GBK + b",x\n")
    return ["data", "preview", ctx.recipe(data={"path": str(data)})]


def _gbk_json(ctx):
    data = ctx.root / "data.json"
    data.write_bytes(b'[{"instruction": "' + GBK + b'", "output": "x"}]')
    return ["data", "preview", ctx.recipe(data={"path": str(data)})]


def _empty_data(ctx):
    (ctx.root / "data.jsonl").write_text("\n\n", encoding="utf-8")
    return ["data", "preview", ctx.recipe(data={"path": str(ctx.root / "data.jsonl")})]


def _data_file_is_folder(ctx):
    (ctx.root / "rows.jsonl").mkdir()
    return ["data", "preview", ctx.recipe(data={"path": str(ctx.root / "rows.jsonl")})]


def _data_fifo(ctx):
    return ["data", "preview", ctx.recipe(data={"path": str(_fifo(ctx, "rows.jsonl"))})]


def _data_fifo_no_suffix(ctx):
    """A FIFO named like 'org/name' was taken for a hub dataset id."""
    (ctx.root / "exports").mkdir()
    _fifo(ctx, "exports/latest")
    recipe = ctx.recipe()
    text = recipe.read_text(encoding="utf-8").replace(str(ctx.root / "data.jsonl"), "exports/latest")
    return ["data", "preview", ctx.raw_recipe(text)]


def _data_device(ctx):
    return ["data", "preview", ctx.recipe(data={"path": "/dev/zero"})]


def _data_lone_surrogate(suffix: str):
    def setup(ctx):
        rows = [json.dumps(r) for r in demo_rows(3)]
        rows.insert(1, '{"instruction": "caf\\ud800", "output": "x"}')
        data = ctx.root / f"rows{suffix}"
        data.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ", ".join(rows) + "]", encoding="utf-8")
        return ["data", "preview", ctx.recipe(data={"path": str(data)})]
    return setup


def _enormous_row(ctx):
    """One 10 MB row among ordinary ones: kept, truncated, and never tokenised whole."""
    rows = [json.dumps(r) for r in demo_rows(3)] + [json.dumps({"instruction": "ab" * 5_000_000, "output": "x"})]
    (ctx.root / "data.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ["data", "preview", ctx.recipe(data={"path": str(ctx.root / "data.jsonl")})]


def _output_dir(value: str):
    return lambda ctx: ["check", ctx.recipe(output_dir=value)]


def _prompts_lone_surrogate(ctx):
    (ctx.root / "prompts.jsonl").write_text('{"instruction": "fine"}\n{"instruction": "\\udfff"}\n', encoding="utf-8")
    return ["generate", "--adapter", ctx.adapter(), "--file", ctx.root / "prompts.jsonl"]


def _prompts_fifo(ctx):
    """A FIFO no one writes to: read as empty at once (no hang)."""
    return ["generate", "--adapter", ctx.adapter(), "--file", _fifo(ctx, "prompts.txt")]


def _prompts_dev_zero(ctx):
    return ["generate", "--adapter", ctx.adapter(), "--file", "/dev/zero"]


def _prompt_over_context(words: int):
    def setup(ctx):
        (ctx.root / "prompts.txt").write_text("short one\n" + "word " * words + "\n", encoding="utf-8")
        return ["generate", "--adapter", ctx.adapter(), "--file", ctx.root / "prompts.txt"]
    return setup


def _gbk_prompts(ctx):
    (ctx.root / "prompts.txt").write_bytes(b"first prompt\n" + GBK + b"\n")
    return ["generate", "--adapter", ctx.adapter(), "--file", ctx.root / "prompts.txt"]


def _prompts_folder(ctx):
    (ctx.root / "prompts.txt").mkdir()
    return ["generate", "--adapter", ctx.adapter(), "--file", ctx.root / "prompts.txt"]


def _gbk_readme(ctx):
    (ctx.root / "README.md").write_bytes(b"# notes\n" + GBK + b"\n")
    return ["recipe-keys", "--update", ctx.root / "README.md"]


# --------------------------------------------------------------------------- flags and adapter names

def _generate_flag(*flags):
    return lambda ctx: ["generate", "--adapter", ctx.adapter(), *flags, "hello"]


def _named_adapter(spec: str):
    def setup(ctx):
        folder = ctx.adapter("v1.2")
        return ["generate", "--adapter", spec.format(dir=folder), "hello"]
    return setup


# --------------------------------------------------------------------------- adapters and models

def _with_adapter(command: Callable[[Path, Ctx], list], damage: Callable[[Ctx], Path]):
    return lambda ctx: command(damage(ctx), ctx)


def _generate(a, ctx):
    return ["generate", "--adapter", a, "hello"]


def _chat(a, ctx):
    return ["chat", "--adapter", a]


def _merge(a, ctx):
    return ["merge", "--adapter", a, "--out", ctx.root / "merged"]


def _save(a, ctx):
    return ["save", a, "--out", ctx.root / "exported"]


def _serve(a, ctx):
    return ["serve", "--adapter", a, "--port", "8765"]


def _serve_vllm(a, ctx):
    return ["serve", "--engine", "vllm", "--adapter", a]


def _analyze(a, ctx):
    return ["analyze", a, "--no-base"]


def _truncated(ctx):
    return ctx.truncated_adapter()


def _pickle_adapter(ctx):
    a = ctx.adapter()
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    return a


def _rank_edited(ctx):
    a = ctx.adapter()
    cfg = json.loads((a / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["r"] = 16
    (a / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return a


def _targets_edited(ctx):
    a = ctx.adapter()
    cfg = json.loads((a / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["target_modules"] = ["k_proj"]
    (a / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return a


def _config_not_utf8(ctx):
    a = ctx.adapter()
    (a / "adapter_config.json").write_bytes(b'{"base_model_name_or_path": "' + GBK + b'"}')
    return a


def _empty_weights(ctx):
    a = ctx.adapter()
    (a / "adapter_model.safetensors").write_bytes(b"")
    return a


def _resume_truncated_checkpoint(ctx):
    """A run folder whose newest checkpoint's adapter was cut off (copied from a full disk)."""
    from lora_cli.train import checkpoint as ckpt
    from lora_cli.recipe.schema import dump_recipe, load_recipe

    recipe = ctx.recipe()
    run = Path(load_recipe(recipe).output_dir)
    run.mkdir()
    (run / "lora_recipe.yaml").write_text(dump_recipe(load_recipe(recipe)), encoding="utf-8")
    checkpoint = run / f"{ckpt.PREFIX}-1"
    shutil.copytree(ctx.truncated_adapter("damaged"), checkpoint)
    shutil.rmtree(ctx.root / "damaged")
    (checkpoint / ckpt.MARKER).write_text("{}", encoding="utf-8")
    return ["train", recipe, "--resume-from", checkpoint]


def _config_value(**values):
    def damage(ctx):
        a = ctx.adapter()
        cfg = json.loads((a / "adapter_config.json").read_text(encoding="utf-8"))
        cfg.update(values)
        (a / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        return a
    return damage


def _chat_stdin_not_utf8(ctx):
    """A terminal in another encoding: the line is refused and the session goes on (exit 0)."""
    import io

    ctx.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(GBK + b"\n/exit\n"), encoding="utf-8"))
    return ["chat", "--adapter", ctx.adapter()]


def _chat_message_over_context(ctx):
    """A 1 MB line pasted into chat: refused before tokenising, the session goes on (exit 0)."""
    import io

    lines = ("word " * 200_000).encode() + b"\nhi\n/exit\n"
    ctx.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    return ["chat", "--adapter", ctx.adapter(), "--max-new-tokens", "4"]


def _generate_out_folder(ctx):
    (ctx.root / "answers").mkdir()
    (ctx.root / "answers" / "mine.txt").write_text("keep me", encoding="utf-8")
    return ["generate", "--adapter", ctx.adapter(), "--out", ctx.root / "answers", "--force", "hello"]


def _truncated_base(ctx):
    base = _base_copy(ctx)
    for f in base.glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:1000])
    return ["generate", "--base", base, "hello"]


def _sweep_record_damaged(ctx):
    """A rank folder whose sweep record was cut off: the rerun refuses instead of crashing."""
    from lora_cli.train.checkpoint import FINAL_ADAPTER
    from lora_cli.train.sweep import RESULT_FILE

    rank_dir = ctx.root / "sweep" / "r2"
    rank_dir.mkdir(parents=True)
    (rank_dir / FINAL_ADAPTER).write_text("{}", encoding="utf-8")  # the run-finished marker
    (rank_dir / RESULT_FILE).write_text('{"rank": 2, "loss', encoding="utf-8")
    return ["sweep", ctx.recipe(output_dir=str(ctx.root / "sweep")), "--ranks", "2"]


def _base_copy(ctx) -> Path:
    base = ctx.root / "base"
    shutil.copytree(ctx.base, base)
    return base


class _RunsCode:
    """Unpickling this creates a file: code from a pickle ran (the tree snapshot would show it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_base(ctx):
    """A base whose pytorch_model.bin carries code: refused (weights_only), exit 2, nothing ran."""
    import torch
    from safetensors.torch import load_file

    base = _base_copy(ctx)
    state = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    torch.save({**state, "payload": _RunsCode(ctx.root / "code-ran")}, base / "pytorch_model.bin")
    return ["generate", "--base", base, "hello"]


def _base_without_config(ctx):
    base = _base_copy(ctx)
    (base / "config.json").unlink()
    return ["generate", "--base", base, "hello"]


def _base_without_tokenizer(ctx):
    base = _base_copy(ctx)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    return ["generate", "--base", base, "hello"]


def _estimate_without_config(ctx):
    base = _base_copy(ctx)
    (base / "config.json").unlink()
    return ["estimate", make_recipe(ctx.root, base)]


# --------------------------------------------------------------------------- runtime faults

def _disk_full_after(nbytes: int):
    """A writer that puts nbytes of a file on disk, then fails as a full disk does."""
    def fail(path):
        Path(path).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return fail


def _merge_disk_full(ctx):
    from transformers import PreTrainedModel

    fail = _disk_full_after(4096)
    ctx.monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                            lambda self, folder, **kw: fail(Path(folder) / "model.safetensors"))
    return ["merge", "--adapter", ctx.adapter(), "--out", ctx.root / "merged"]


def _save_disk_full(ctx):
    import lora_cli.export.merge

    fail = _disk_full_after(1024)
    ctx.monkeypatch.setattr(lora_cli.export.merge.shutil, "copy2", lambda src, dst, **kw: fail(dst))
    return ["save", ctx.adapter(), "--out", ctx.root / "exported"]


CASES = [
    # recipes: numbers
    Case("epochs-infinite", _yaml_value("train", "epochs", ".inf"), "train.epochs"),
    Case("learning-rate-nan", _yaml_value("train", "learning_rate", ".nan"), "train.learning_rate"),
    Case("dropout-nan", _yaml_value("lora", "dropout", ".nan"), "lora.dropout"),
    Case("dropout-one", _set_key("lora", "dropout", 1.0), "lora.dropout: must be below 1"),
    Case("seed-above-numpy-range", _set_key("train", "seed", 2**32), "train.seed: must be at most"),
    Case("seed-negative", _set_key("train", "seed", -1), "train.seed: must be at least 0"),
    Case("data-seed-huge", _set_key("data", "seed", 10**30), "data.seed"),
    Case("batch-size-negative", _set_key("train", "batch_size", -2), "train.batch_size"),
    Case("max-steps-below-minus-one", _set_key("train", "max_steps", -5), "train.max_steps"),
    Case("weights-nan", _yaml_value("data", "weights", "[.nan]"), "data.weights"),
    Case("alpha-too-big-for-a-float", _yaml_value("lora", "alpha", "1" + "0" * 400), "lora.alpha"),
    # recipes: the YAML file itself
    Case("yaml-alias-bomb", _billion_laughs, "aliases"),
    Case("yaml-over-size-limit", _oversized_recipe, "bytes, over the 1,048,576"),
    Case("yaml-deep-nesting", _deep_nesting, "nested too deeply"),
    Case("long-value-quoted-short", _long_value, "500,010 characters"),
    Case("long-invalid-regex-quoted-short", _set_key("lora", "target_modules", "(" + "q" * 300_000),
         "is not a valid regex"),
    Case("recipe-is-a-list", _recipe_is_list, "expected a mapping of sections"),
    Case("recipe-binary-garbage", _binary_recipe, "line 3"),
    Case("recipe-is-a-folder", _recipe_is_folder, "a folder, not a file"),
    Case("recipe-permission-denied", _recipe_permission_denied, "Permission denied"),
    Case("recipe-symlink-loop", _recipe_symlink_loop, "loop.yaml"),
    Case("recipe-is-a-fifo", lambda ctx: ["check", _fifo(ctx, "recipe.yaml")], "is a FIFO (named pipe), not a file"),
    Case("section-is-a-list", lambda ctx: ["check", ctx.recipe(train=[1, 2])], "train: expected a section"),
    Case("key-wrong-type", _set_key("lora", "r", "eight"), "lora.r: expected integer"),
    Case("data-path-too-long", _data_path_too_long, "data.path"),
    Case("set-empty-key-part", _set_override("train..epochs=1"), "--set"),
    Case("set-without-equals", _set_override("train.epochs"), "expected KEY=VALUE"),
    Case("set-nan", _set_override("train.learning_rate=.nan"), "train.learning_rate"),
    Case("set-alias-bomb", _set_alias_bomb, "--set columns: its aliases"),
    Case("yaml-duplicate-key", _duplicate_key, "train.learning_rate is written twice (line 15 and line 19)"),
    Case("yaml-duplicate-section", _duplicate_section, "lora is written twice (line 4 and line 23)"),
    Case("set-duplicate-key", _set_override("data.columns={a: x, a: y}"), "--set columns: a is written twice"),
    Case("recipe-lone-surrogate", _recipe_lone_surrogate, "data.system_prompt (line 2): holds a lone UTF-16 surrogate"),
    Case("output-dir-empty", _output_dir(""), "output_dir: empty"),
    Case("output-dir-blank-set", lambda ctx: ["check", ctx.recipe(), "--set", "output_dir= "], "output_dir: empty"),
    # data and prompt files
    Case("data-jsonl-not-utf8", _gbk_jsonl, "data.jsonl, line 3"),
    Case("data-csv-not-utf8", _gbk_csv, "data.csv, line 3"),
    Case("data-json-not-utf8", _gbk_json, "data.json, line 1"),
    Case("data-permission-denied", _data_permission_denied, "data.jsonl: cannot be read (Permission denied)"),
    Case("data-file-empty", _empty_data, "no rows"),
    Case("data-file-is-a-folder", _data_file_is_folder, "rows.jsonl"),
    Case("data-file-is-a-fifo", _data_fifo, "rows.jsonl: is a FIFO (named pipe), not a file"),
    Case("data-fifo-named-like-a-hub-id", _data_fifo_no_suffix, "exports/latest: is a FIFO (named pipe), not a file"),
    Case("data-file-is-a-device", _data_device, "/dev/zero: is a character device, not a file"),
    Case("data-jsonl-lone-surrogate", _data_lone_surrogate(".jsonl"), "rows.jsonl, row 2: holds a lone UTF-16 surrogate (in instruction)"),
    Case("data-json-lone-surrogate", _data_lone_surrogate(".json"), "rows.json, row 2: holds a lone UTF-16 surrogate (in instruction)"),
    Case("data-row-10mb", _enormous_row, "truncated (prompt): 1", code=0),
    Case("prompts-lone-surrogate", _prompts_lone_surrogate, "prompts.jsonl, line 2: holds a lone UTF-16 surrogate"),
    Case("prompts-file-is-a-fifo", _prompts_fifo, "prompts.txt: no prompts"),
    Case("prompts-file-is-dev-zero", _prompts_dev_zero, "/dev/zero: is a character device, not a file"),
    Case("prompt-over-context", _prompt_over_context(1100), "prompts.txt, line 2: 1,1"),
    Case("prompt-over-context-by-its-length", _prompt_over_context(200_000), "prompts.txt, line 2: 999,999 characters, more than this model's context"),
    Case("prompts-not-utf8", _gbk_prompts, "prompts.txt, line 2"),
    Case("prompts-file-is-a-folder", _prompts_folder, "is a folder"),
    Case("readme-not-utf8", _gbk_readme, "README.md, line 2"),
    Case("chat-input-not-utf8", _chat_stdin_not_utf8, "that line is not UTF-8", code=0),
    Case("chat-message-over-context", _chat_message_over_context,
         "error: that message: 999,999 characters, more than this model's context", code=0),
    # flags and adapter names
    Case("max-new-tokens-zero", _generate_flag("--max-new-tokens", "0"), "--max-new-tokens"),
    Case("max-new-tokens-negative", _generate_flag("--max-new-tokens", "-1"), "--max-new-tokens"),
    Case("sampling-seed-too-big", _generate_flag("--seed", str(2**64)), "--seed"),
    Case("top-p-nan", _generate_flag("--top-p", "nan"), "--top-p must be a finite number"),
    Case("generate-out-is-a-folder", _generate_out_folder, "is a folder"),
    Case("adapter-name-with-dot", _named_adapter("v1.2={dir}"), "'v1.2'"),
    Case("adapter-folder-name-with-dot", _named_adapter("{dir}"), "'v1.2'"),
    Case("adapter-name-empty", _named_adapter("={dir}"), "adapter name ''"),
    # adapters: every command that reads one verifies it first
    Case("truncated-adapter-generate", _with_adapter(_generate, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-chat", _with_adapter(_chat, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-merge", _with_adapter(_merge, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-save", _with_adapter(_save, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-serve", _with_adapter(_serve, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-serve-vllm", _with_adapter(_serve_vllm, _truncated), "not a complete safetensors file"),
    Case("truncated-adapter-analyze", _with_adapter(_analyze, _truncated), "not a complete safetensors file"),
    Case("truncated-checkpoint-resume", _resume_truncated_checkpoint, "not a complete safetensors file"),
    Case("empty-adapter-weights", _with_adapter(_generate, _empty_weights), "adapter_model.safetensors"),
    Case("pickle-adapter-merge", _with_adapter(_merge, _pickle_adapter), "adapter_model.bin"),
    Case("pickle-adapter-save", _with_adapter(_save, _pickle_adapter), "pickle"),
    Case("adapter-rank-mismatch", _with_adapter(_generate, _rank_edited), "do not have rank r=16"),
    Case("adapter-targets-mismatch", _with_adapter(_merge, _targets_edited), "is not among target_modules"),
    Case("adapter-config-not-utf8", _with_adapter(_analyze, _config_not_utf8), "adapter_config.json, line 1"),
    Case("adapter-config-r-not-a-number", _with_adapter(_generate, _config_value(r="x")), "r 'x' is not a positive integer"),
    Case("adapter-config-unknown-kind", _with_adapter(_generate, _config_value(peft_type="FOO")), "peft_type 'FOO'"),
    Case("adapter-config-targets-not-names", _with_adapter(_merge, _config_value(target_modules=5)), "target_modules 5"),
    Case("pickle-base-with-code", _pickle_base, "never runs code from a pickle"),
    Case("truncated-base-weights", _truncated_base, "model.safetensors: not a complete safetensors file"),
    Case("base-without-config", _base_without_config, "no config.json, so this is not a model folder"),
    Case("base-without-tokenizer", _base_without_tokenizer, "no tokenizer files"),
    Case("estimate-base-without-config", _estimate_without_config, "config.json"),
    Case("sweep-record-damaged", _sweep_record_damaged, "sweep_result.json: not valid JSON"),
    # runtime faults
    Case("merge-disk-full", _merge_disk_full, "No space left on device"),
    Case("save-disk-full", _save_disk_full, "No space left on device"),
]


@pytest.fixture(scope="module")
def adapter_src(tiny_random, tmp_path_factory) -> Path:
    return random_adapter(tiny_random, tmp_path_factory.mktemp("adapters") / "valid", seed=3)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_cleanly_and_nothing_changed(case, cli, tmp_path, tiny_random, adapter_src, monkeypatch):
    root = tmp_path / "user"
    root.mkdir()
    ctx = Ctx(root, tiny_random, adapter_src, monkeypatch)
    argv = case.setup(ctx)
    before = snapshot_tree(root)
    try:
        result = cli(*argv)
    except BaseException as e:  # in-process, a traceback is an exception escaping cli.run
        pytest.fail(f"{case.name}: traceback ({type(e).__name__}: {str(e)[:500]})")
    assert_clean_refusal(result, case.culprit, case.code)
    assert_tree_unchanged(before, snapshot_tree(root))
    assert len(result.err) < 5000, "the message echoes a long value whole"


def test_alias_bomb_is_refused_quickly(tmp_path):
    """Billion laughs: refused after composing the document, before anything expands it."""
    from lora_cli.errors import LoraError
    from lora_cli.recipe.schema import load_recipe

    ctx = Ctx(tmp_path, Path("."), Path("."), None)
    _, path = _billion_laughs(ctx)
    start = time.perf_counter()
    with pytest.raises(LoraError, match="aliases"):
        load_recipe(path)
    assert time.perf_counter() - start < 2.0


def test_recipe_with_moderate_aliases_still_loads(tmp_path, tiny_random):
    """The alias bound leaves ordinary anchors alone."""
    from lora_cli.recipe.schema import load_recipe

    path = make_recipe(tmp_path, tiny_random)
    text = path.read_text(encoding="utf-8").replace("target_modules:", "target_modules: &targets")
    path.write_text(text + "# reuse\n", encoding="utf-8")
    assert load_recipe(path).lora.target_modules == ["q_proj", "v_proj"]


def test_unreadable_recipe_is_refused(cli, tmp_path, tiny_random):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    ctx = Ctx(tmp_path, tiny_random, Path("."), None)
    argv = _recipe_unreadable(ctx)
    result = cli(*argv)
    argv[1].chmod(0o644)
    assert_clean_refusal(result, "cannot be read")


def test_valid_adapter_passes_verification(adapter_src):
    """verify_adapter must accept what peft writes, or every refusal above proves nothing."""
    from lora_cli.model.adapter_folder import verify_adapter

    assert verify_adapter(adapter_src).peft_type == "LORA"


def test_docs_list_every_case():
    doc = (REPO / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.name for c in CASES if f"`{c.name}`" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"
    assert len(CASES) >= 30


def test_printed_resume_command_works_when_pasted(tmp_path):
    """A run folder with a space, a quote and a $ in its path: bash reads the printed command
    back into exactly lora's arguments."""
    import subprocess

    from lora_cli.train.run import saved_recipe_resume_command

    run = tmp_path / "my runs" / "it's $HOME"
    command = saved_recipe_resume_command(run)
    assert command.startswith("lora train ")
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + command[len("lora "):]], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert words == ["train", str(run / "lora_recipe.yaml"), "--resume"]


def test_enormous_row_is_never_tokenised_whole(tmp_path, tiny_random, monkeypatch):
    """An enormous row is cut to the ends truncation can keep before the tokenizer sees it, and
    the example built from it equals the one built from the whole text. (A 9 MB row made the
    oracle, the whole text tokenised, cost 10 s; 900 KB is still 150 times the cut. The 10 MB
    rows of every task and objective: test_adversarial_rows.py.)"""
    from lora_cli.data import examples as data
    from lora_cli.data.template import tokenize_texts
    from lora_cli.data.token_budget import chars_for
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_random)
    longest = []

    def spy(tok, texts):
        longest.append(max(len(t) for t in texts))
        return tokenize_texts(tok, texts)
    monkeypatch.setattr(data, "tokenize_texts", spy)
    rows = [[{"role": "user", "content": "ab " * 300_000}, {"role": "assistant", "content": "fine " * 40}]]
    clipped, _ = data.tokenize_conversations(rows, tokenizer, "human_assistant", 64)
    assert longest == [2 * chars_for(tokenizer, 64)] and longest[0] < 100_000
    monkeypatch.setattr(data, "clip_for_tokens", lambda text, tok, n: text)  # the whole text, as before
    whole, _ = data.tokenize_conversations(rows, tokenizer, "human_assistant", 64)
    assert clipped == whole
