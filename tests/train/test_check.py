"""`lora check`: validation without torch, and every red-flag rule through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, demo_rows, make_recipe, write_jsonl

CLEAN = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "train": {"learning_rate": 2e-4, "max_steps": 4, "batch_size": 2, "gradient_accumulation": 1,
              "warmup_steps": 1},
}


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """`check` reads only config.json; a Llama-7B-shaped one makes the embedding large."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32}))
    return folder


def flat(text: str) -> str:
    """Output with line wrapping undone: the console may wrap long lines at any width."""
    return " ".join(text.split())


def recipe_with(tmp_path, model_dir, **changes) -> Path:
    sections = {name: dict(values) for name, values in CLEAN.items()}
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    model_section = sections.pop("model", {})
    path = make_recipe(tmp_path, model_dir, **sections)
    if model_section:  # make_recipe's own `model` argument is the path; patch the section after
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw["model"].update(model_section)
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_clean_recipe_has_no_warnings(cli, tmp_path, model_dir):
    res = cli("check", recipe_with(tmp_path, model_dir), "--strict")
    assert res.code == 0, res
    assert "warning" not in res.out
    assert flat(res.out).endswith(": ok")


# (recipe changes, key the warning names, words of the reason, suggested setting)
RULES = {
    "rank_with_heavy_dropout": ({"lora__r": 512, "lora__alpha": 1024, "lora__dropout": 0.3},
                                "lora.dropout", "over-regularised", "lora.dropout: 0.05"),
    "alpha_below_rank": ({"lora__r": 16, "lora__alpha": 8}, "lora.alpha", "capacity unused", "lora.alpha: 32"),
    "scaling_far_from_one_to_two": ({"lora__r": 4, "lora__alpha": 64}, "lora.alpha", "alpha / r = 64 / 4 = 16",
                                    "lora.alpha: 8"),
    "all_modules_low_rank": ({"lora__r": 4, "lora__alpha": 8, "lora__target_modules": "all-linear"},
                             "lora.r", "too thin", "lora.r: 16"),
    "all_modules_listed_low_rank": ({"lora__r": 4, "lora__alpha": 8, "lora__target_modules":
                                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
                                    "lora.r", "too thin", "lora.r: 16"),
    "high_lr_with_4bit": ({"model__quantization": "4bit", "train__learning_rate": 1e-3},
                          "train.learning_rate", "unstable", "train.learning_rate: 2e-4"),
    "qlora_lr_above_range": ({"model__quantization": "4bit", "train__learning_rate": 4e-4},
                             "train.learning_rate", "above the usual QLoRA range 5e-5 to 2e-4",
                             "train.learning_rate: 2e-4"),
    "lora_lr_below_range": ({"train__learning_rate": 1e-5}, "train.learning_rate",
                            "below the usual LoRA range 1e-4 to 5e-4", "train.learning_rate: 1e-4"),
    "lora_lr_above_range": ({"train__learning_rate": 1e-3}, "train.learning_rate",
                            "above the usual LoRA range", "train.learning_rate: 5e-4"),
    "embedding_in_modules_to_save": ({"lora__modules_to_save": ["embed_tokens"]}, "lora.modules_to_save",
                                     "32,000 x 4,096 matrix (131.1M parameters, 262 MB at 16-bit",
                                     "lora.modules_to_save: []"),
    "more_steps_than_data": ({"train__max_steps": 100}, "train.max_steps",
                             "100 optimizer steps x 2 examples = 12 passes over 16 rows", "train.max_steps: 24"),
    "more_epochs_than_data": ({"train__max_steps": -1, "train__epochs": 20}, "train.epochs",
                              "160 optimizer steps x 2 examples = 20 passes over 16 rows", "train.epochs: 3"),
    "batch_larger_than_data": ({"train__batch_size": 4, "train__gradient_accumulation": 8},
                               "train.gradient_accumulation", "needs 32 examples", "train.gradient_accumulation: 4"),
    "warmup_longer_than_run": ({"train__max_steps": 4, "train__warmup_steps": 10}, "train.warmup_steps",
                               "warm-up of 10 steps in a run of 4", "train.warmup_steps: 1"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_each_rule_warns_with_reason_and_fix(cli, tmp_path, model_dir, name):
    changes, key, words, fix = RULES[name]
    recipe = recipe_with(tmp_path, model_dir, **changes)

    res = cli("check", recipe)
    assert res.code == 0, res  # warnings never block
    out = flat(res.out)
    warnings = out.split("warning ")[1:]
    assert len(warnings) == 1, res.out  # exactly this rule fires
    assert warnings[0].startswith(key + ":"), res.out
    assert words in warnings[0], res.out
    assert f"try: {fix}" in warnings[0], res.out
    assert out.endswith("ok (1 warning)")

    strict = cli("check", recipe, "--strict")
    assert strict.code == 2
    assert "1 warning (--strict)" in flat(strict.err)


def test_suggestions_clear_the_warnings(cli, tmp_path, model_dir):
    """Applying what `check` suggests gives a recipe `check --strict` accepts."""
    recipe = recipe_with(tmp_path, model_dir, lora__r=16, lora__alpha=8, train__warmup_steps=10)
    assert cli("check", recipe, "--strict").code == 2
    res = cli("check", recipe, "--strict", "--set", "lora.alpha=32", "--set", "train.warmup_steps=1")
    assert res.code == 0, res


def test_small_embedding_in_modules_to_save_is_fine(cli, tmp_path):
    """A tiny model's embedding costs little: only large ones are flagged."""
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 2048, "hidden_size": 128}))
    res = cli("check", recipe_with(tmp_path, folder, lora__modules_to_save=["embed_tokens"]), "--strict")
    assert res.code == 0, res


def test_rows_counted_in_json_and_saved_dataset(tmp_path):
    from datasets import Dataset

    from lora_cli.train.lint import count_rows

    rows = demo_rows(7)
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert count_rows(write_jsonl(tmp_path / "d.jsonl", rows)) == 7
    assert count_rows(tmp_path / "d.json") == 7
    assert count_rows(tmp_path / "saved") == 7


def test_invalid_recipe_is_an_error_not_a_warning(cli, tmp_path, model_dir):
    recipe = recipe_with(tmp_path, model_dir, lora__dropuot=0.1)
    res = cli("check", recipe)
    assert res.code == 2
    assert "lora.dropuot: unknown key (did you mean 'dropout'?)" in flat(res.err)


def test_check_never_imports_torch(tmp_path, model_dir):
    """Validation and lint answer instantly: no torch, transformers or peft."""
    recipe = recipe_with(tmp_path, model_dir, lora__modules_to_save=["embed_tokens"], train__warmup_steps=10)
    code = (
        "import sys\n"
        "from lora_cli.cli import run\n"
        f"code = run(['check', {str(recipe)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)\n"
        "print('exit', code, 'heavy', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "exit 0 heavy []" in out.stdout, out.stdout + out.stderr
    assert "ok (2 warnings)" in " ".join(out.stdout.split())


def test_rank_rules_follow_the_method(cli, tmp_path, model_dir):
    """rsLoRA scales by alpha / sqrt(r), so alpha < r is its normal setting there."""
    recipe = recipe_with(tmp_path, model_dir, lora__r=64, lora__alpha=16)
    assert "lora.alpha: alpha 16 is below rank 64" in flat(cli("check", recipe).out)
    assert cli("check", recipe, "--strict", "--set", "lora.method=rslora").code == 0


def test_rows_add_up_over_mixed_sources_and_held_out_share(tmp_path, model_dir):
    from lora_cli.train.lint import training_rows
    from lora_cli.recipe.schema import load_recipe

    a = write_jsonl(tmp_path / "a.jsonl", demo_rows(10))
    b = write_jsonl(tmp_path / "b.jsonl", demo_rows(30))
    path = recipe_with(tmp_path, model_dir)
    recipe = load_recipe(path, [f"data.path=[{a}, {b}]", "data.weights=[2, 0.5]", "data.val_fraction=0.2"])
    assert training_rows(recipe) == int((10 * 2 + 30 * 0.5) * 0.8)  # 28


# --------------------------------------------------------------------------- rules follow the schema

SECTIONS = ("model", "lora", "data", "train")


def recipe_keys_read(source: str) -> set[str]:
    """Every dotted recipe key a module reads or names: `r.lora.alpha`, `t.max_steps` after
    `t = r.train`, and keys written in its messages ("train.learning_rate: 2e-4")."""
    import ast
    import re

    tree = ast.parse(source)
    found = set()
    for scope in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]:
        aliases = {}  # local name -> section, from `t = recipe.train`
        for node in ast.walk(scope):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Attribute) and node.value.attr in SECTIONS):
                aliases[node.targets[0].id] = node.value.attr
        called = {id(n.func) for n in ast.walk(scope) if isinstance(n, ast.Call)}  # p.data.float(): not a key
        for node in ast.walk(scope):
            if not isinstance(node, ast.Attribute) or id(node) in called:
                continue
            if isinstance(node.value, ast.Attribute) and node.value.attr in SECTIONS \
                    and isinstance(node.value.value, ast.Name):
                found.add(f"{node.value.attr}.{node.attr}")
            elif isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.add(f"{aliases[node.value.id]}.{node.attr}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= {f"{s}.{k}" for s, k in re.findall(rf"(?<![.\w])({'|'.join(SECTIONS)})\.([a-z_]+)\b", node.value)}
    return found


@pytest.mark.parametrize("module", ["train.lint", "train.sweep", "train.estimate", "train.preflight"])
def test_rules_read_only_keys_the_schema_has(module):
    """Rename or drop a recipe key and this fails, instead of a rule silently never firing
    (as one did, reading lora.use_rslora, which never existed)."""
    import importlib

    from lora_cli.recipe.schema import iter_keys

    source = Path(importlib.import_module(f"lora_cli.{module}").__file__).read_text(encoding="utf-8")
    schema = {dotted for dotted, _, _ in iter_keys()}
    read = recipe_keys_read(source)
    assert read, f"{module}.py reads no recipe key: the scan is broken"
    assert read <= schema, f"{module}.py reads keys the schema lacks: {sorted(read - schema)}"
    assert "lora.use_rslora" in recipe_keys_read("def f(r):\n    return r.lora.use_rslora\n")
    assert "train.max_step" in recipe_keys_read("def f(r):\n    t = r.train\n    return t.max_step\n")
