"""The recipe schema: validation, overrides, path resolution, errors through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, make_recipe, write_jsonl
from lora_cli.errors import RecipeError
from lora_cli.recipe.schema import iter_keys, load_recipe, recipe_from_dict, reference_markdown


def minimal(tmp_path: Path, **extra) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    raw = {"model": {"name_or_path": "some-org/some-model"}, "data": {"path": str(data)},
           "output_dir": str(tmp_path / "out")}
    for k, v in extra.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return raw


def problems_of(raw: dict, base_dir=".") -> list[str]:
    with pytest.raises(RecipeError) as exc:
        recipe_from_dict(raw, base_dir=base_dir)
    return exc.value.problems


def test_defaults_fill_unset_keys(tmp_path):
    r = recipe_from_dict(minimal(tmp_path))
    assert r.lora.r == 8 and r.lora.alpha == 16 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.gradient_accumulation is None and r.train.tokens_per_batch is None  # sized on a GPU (lora_cli.model.kernels), 4096 elsewhere
    assert r.model.attn_implementation == "auto" and r.data.template == "human_assistant"
    assert r.model.name_or_path == "some-org/some-model"  # a hub id is left as it is


def test_every_problem_is_reported_at_once(tmp_path):
    raw = minimal(tmp_path, lora={"r": 0, "alpah": 32, "bias": "some"}, train={"learning_rate": "fast"})
    problems = problems_of(raw)
    text = "\n".join(problems)
    assert len(problems) == 4, problems
    assert "lora.r: must be at least 1, got 0" in text
    assert "lora.alpah: unknown key (did you mean 'alpha'?)" in text
    assert "lora.bias: expected 'none' | 'all' | 'lora_only', got 'some'" in text
    assert "train.learning_rate: expected number, got 'fast'" in text


def test_required_keys_named(tmp_path):
    problems = problems_of({"lora": {"r": 4}})
    assert {p.split(":")[0] for p in problems} == {"model.name_or_path", "data.path", "output_dir"}


def test_unknown_section_and_wrong_section_type(tmp_path):
    raw = minimal(tmp_path)
    raw["trian"] = {"epochs": 1}
    raw["lora"] = [1, 2]
    text = "\n".join(problems_of(raw))
    assert "trian: unknown key (did you mean 'train'?)" in text
    assert "lora: expected a section" in text


def test_yaml_float_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; the schema types it.
    r = recipe_from_dict(minimal(tmp_path, train={"learning_rate": "1e-4"}))
    assert r.train.learning_rate == pytest.approx(1e-4)


def test_target_modules_list_preset_or_regex(tmp_path):
    for tm in (["q_proj"], "all-linear", r".*\.1.*query_key_value"):
        assert recipe_from_dict(minimal(tmp_path, lora={"target_modules": tm})).lora.target_modules == tm
    assert "not a valid regex" in "\n".join(problems_of(minimal(tmp_path, lora={"target_modules": "(["})))


def test_relative_paths_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "recipes").mkdir()
    write_jsonl(tmp_path / "data" / "x.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "models" / "m").mkdir(parents=True)
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "../models/m"}, "data": {"path": "../data/x.jsonl"},
                                    "output_dir": "../runs/x"}))
    r = load_recipe(path)
    assert r.data.path == str(tmp_path / "data" / "x.jsonl")
    assert r.model.name_or_path == str(tmp_path / "models" / "m")
    assert r.output_dir == str(tmp_path / "runs" / "x")


def test_set_overrides_are_typed_and_validated(tmp_path, monkeypatch):
    path = make_recipe(tmp_path, tmp_path)
    r = load_recipe(path, ["train.learning_rate=3e-4", "lora.r=16", "lora.target_modules=[q_proj]"])
    assert r.train.learning_rate == pytest.approx(3e-4) and r.lora.r == 16 and r.lora.target_modules == ["q_proj"]
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["lora.r=big", "train.lerning_rate=1"])
    text = str(exc.value)
    assert "lora.r: expected integer, got 'big'" in text and "did you mean 'learning_rate'" in text
    # A path given with --set is read from the current folder, not the recipe's.
    monkeypatch.chdir(tmp_path)
    assert load_recipe(path, ["output_dir=elsewhere"]).output_dir == str(tmp_path / "elsewhere")


def test_a_path_no_file_system_can_hold_is_a_problem_of_its_key(tmp_path, cli):
    """Found by make fuzz: --set model.name_or_path=<300 characters> made `lora check`, `train
    --dry-run` and `data preview` stat the name and die of ENAMETOOLONG (a traceback)."""
    path = make_recipe(tmp_path, tmp_path)
    long = "a" * 300
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, [f"model.name_or_path={long}", f"output_dir=runs/{long}/x", f"data.path=[d.jsonl, {long}.jsonl]"])
    problems = exc.value.problems
    assert len(problems) == 3 and all("longer than the 255 bytes a file or folder name can have" in p for p in problems)
    assert [p.split(":")[0] for p in problems] == ["model.name_or_path", "data.path", "output_dir"]
    assert load_recipe(path, [f"output_dir=runs/{'a' * 255}"]).output_dir.endswith("a" * 255)  # the longest name allowed
    if os.name != "nt":  # on POSIX a backslash is part of a name: 'a'*200 + '\\' + 'a'*200 is one 401-byte name
        with pytest.raises(RecipeError, match="output_dir: the name"):
            load_recipe(path, [f"output_dir={'a' * 200}\\{'a' * 200}"])
    for command in (["check"], ["train", "--dry-run"], ["data", "preview"]):
        result = cli(*command, path, "--set", f"model.name_or_path={long}")
        assert result.code == 2 and "model.name_or_path: the name" in result.err and "Traceback" not in result.err, result
    # the second run of make fuzz: a NUL (--set model.name_or_path=\x00) was "embedded null byte", a traceback
    result = cli("check", path, "--set", "model.name_or_path=\x00", "--set", "data.path=a\x00b.jsonl")
    assert result.code == 2 and "Traceback" not in result.err, result
    assert "model.name_or_path: '\\x00' holds a NUL character" in result.err
    assert "data.path: 'a\\x00b.jsonl' holds a NUL character" in result.err


def test_every_schema_key_is_documented():
    keys = list(iter_keys())
    assert len(keys) > 20
    for dotted, _, f in keys:
        assert f.metadata.get("doc"), dotted
    table = reference_markdown()
    for dotted, _, _ in keys:
        assert f"`{dotted}`" in table


@pytest.mark.parametrize("recipe_file", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_validate(recipe_file):
    """No shipped recipe may rot. Missing models/ is fine (built by `make tiny`); everything else must hold."""
    try:
        load_recipe(recipe_file)
    except RecipeError as e:
        assert all("name_or_path" in p for p in e.problems), e.problems


def test_validation_does_not_import_torch(tmp_path):
    path = make_recipe(tmp_path, tmp_path)
    code = ("import sys; from lora_cli.cli import run; rc = run(['check', %r]); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "rc2 = run(['--help']); assert 'torch' not in sys.modules; sys.exit(rc)") % str(path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr + proc.stdout


# --------------------------------------------------------------------------- errors through the CLI

BAD_RECIPES = {
    "yaml syntax": ("model: {name_or_path: x\nlora: [", "YAML syntax error at line"),
    "unknown key": ("model: {name_or_path: x, quantisation: 4bit}", "model.quantisation: unknown key (did you mean 'quantization'?)"),
    "wrong type": ("lora: {r: eight}", "lora.r: expected integer, got 'eight'"),
    "rank zero": ("lora: {r: 0}", "lora.r: must be at least 1, got 0"),
    "bad quantization": ("model: {name_or_path: x, quantization: 3bit}", "model.quantization: expected 'none' | '8bit' | '4bit'"),
}


@pytest.mark.parametrize("name", BAD_RECIPES)
def test_bad_recipe_exits_2_with_key_and_no_traceback(name, tmp_path, cli):
    text, expected = BAD_RECIPES[name]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = cli("train", path)
    assert res.code == 2, res
    assert expected in res.err, res.err
    assert "Traceback" not in res.err + res.out


def test_missing_data_file_named_with_fix(tmp_path, cli):
    path = make_recipe(tmp_path, tmp_path, data=tmp_path / "nope.jsonl")
    res = cli("train", path)
    assert res.code == 2
    assert "data.path:" in res.err and "nope.jsonl does not exist" in res.err


def test_missing_recipe_file(tmp_path, cli):
    res = cli("train", tmp_path / "none.yaml")
    assert res.code == 2 and "file not found" in res.err


def test_one_hub_id_rule_for_resolving_and_checking_paths(tmp_path):
    """`org/name` stays a hub id; `folder/file.jsonl` that does not exist is a missing file, read
    against the recipe's folder (and reported with its full path), never sent to the hub."""
    from lora_cli.data.sources import looks_like_hub_id
    from lora_cli.recipe.schema import resolve_path

    assert looks_like_hub_id("some-org/some-model") and resolve_path("some-org/some-model", tmp_path) == "some-org/some-model"
    assert not looks_like_hub_id("data/train.jsonl")
    assert resolve_path("data/train.jsonl", tmp_path) == str(tmp_path / "data" / "train.jsonl")
    assert not looks_like_hub_id("./org/name") and not looks_like_hub_id("a/b/c")


def test_a_missing_data_file_is_listed_with_the_other_problems(tmp_path):
    """Key problems used to hide the missing data file until they were fixed (two runs to see
    three problems)."""
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\nlora: {alpah: 32, r: 0}\ndata: {path: trian.jsonl}\noutput_dir: out\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert len(e.value.problems) == 3, e.value.problems
    assert "trian.jsonl does not exist" in e.value.problems[2]
