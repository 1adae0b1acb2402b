"""The command surface: usage errors, help, and the README staying true to the schema."""

from __future__ import annotations

import pytest

from conftest import REPO
from lora_cli.cli import app
from lora_cli.recipe.schema import README_MARKERS, with_reference


@pytest.mark.parametrize("args, expected", [
    (["nosuch"], "No such command 'nosuch'"),
    (["train"], "Missing argument"),
    (["train", "recipes/demo.yaml", "--nope"], "--nope"),  # click's wording varies by release; the option is named
    (["generate", "hi", "--temperature", "-1"], "--temperature must be between 0 and 100"),
    (["merge", "--adapter", "x", "--out", "y", "--dtype", "int3"], "--dtype"),
])
def test_usage_errors_exit_2_without_traceback(cli, args, expected):
    res = cli(*args)
    assert res.code == 2, res
    assert expected in res.err + res.out
    assert "No such" in res.err or args[-1] != "--nope"
    assert "Traceback" not in res.err + res.out


def test_every_command_has_help(cli):
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert "data" in [g.name for g in app.registered_groups]
    assert cli("data", "preview", "--help").code == 0
    assert {"train", "generate", "chat", "merge", "save", "check", "estimate", "sweep", "analyze"} <= set(names)
    for name in names:
        res = cli(name, "--help")
        assert res.code == 0 and "Usage" in res.out, name


def test_readme_documents_every_command_and_the_current_schema():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(m in readme for m in README_MARKERS)
    assert with_reference(readme) == readme, "README recipe reference is stale: run `lora recipe-keys --update README.md`"
    for c in app.registered_commands:
        assert f"lora {c.name or c.callback.__name__}" in readme
    for group in app.registered_groups:
        for c in group.typer_instance.registered_commands:
            assert f"lora {group.name} {c.name}" in readme


def has_code(path) -> bool:
    """More than a docstring: an __init__.py that holds code (a registry) is listed like a module."""
    import ast

    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def test_readme_layout_lists_every_module_once():
    """docs/architecture.md's layout block names each module of the package on a line of its own."""
    readme = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = readme.split("<!-- layout:start -->")[1].split("<!-- layout:end -->")[0]
    listed = [line.split("`")[1] for line in block.splitlines() if line.startswith("- `")]
    modules = sorted(p.relative_to(REPO / "lora_cli").as_posix() for p in (REPO / "lora_cli").rglob("*.py")
                     if p.name != "__init__.py" or p.parent.name != "lora_cli" and has_code(p))  # a room's registry
    assert sorted(listed) == modules, "list each lora_cli module once in docs/architecture.md's layout block"


def test_resume_with_a_folder_means_resume_from(tmp_path, monkeypatch):
    """The train command reads `--resume DIR` itself, so click's own CliRunner (which never
    goes through cli.run) sees the same meaning as `lora`."""
    from typer.testing import CliRunner

    import lora_cli.recipe.schema
    import lora_cli.train.output_dir
    import lora_cli.train.run
    from lora_cli.train.checkpoint import Resume
    from lora_cli.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}")
    (tmp_path / "checkpoint-4").mkdir()
    asked = []
    monkeypatch.setattr(lora_cli.recipe.schema, "load_recipe", lambda path, overrides: path)
    monkeypatch.setattr(lora_cli.train.run, "run_training", lambda r, **kwargs: asked.append((r, kwargs["resume"])))
    monkeypatch.setattr(lora_cli.train.output_dir, "refuse_output_dir", lambda r, **kwargs: None)  # r is a path here

    for args in (["train", str(recipe), "--resume", str(tmp_path / "checkpoint-4")],
                 ["train", "--resume", str(recipe)],  # a recipe file after --resume is the recipe
                 ["train", str(recipe), "--resume"],   # and a trailing --resume stays a flag
                 ["train", str(recipe)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert asked == [(recipe, Resume(tmp_path / "checkpoint-4")), (recipe, Resume()), (recipe, Resume()), (recipe, None)]
