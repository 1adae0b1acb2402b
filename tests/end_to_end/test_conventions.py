"""The conventions of command-line tools (docs/cli.md): --version, env, completion, schema,
--json, plain output when piped or NO_COLOR, choices in --help, exit codes, portability."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BOX_DRAWING = set(chr(c) for c in range(0x2500, 0x2580))


def _python(code: str, env: dict | None = None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, **(env or {})})


def test_version(cli):
    from lora_cli.env_report import lora_version

    res = cli("--version")
    assert res.code == 0 and res.out.strip() == f"lora {lora_version()}", res


def test_env_reports_the_versions_a_bug_report_needs(cli):
    res = cli("env", "--json")
    assert res.code == 0, res
    report = json.loads(res.out)
    assert report["kind"] == "env" and report["lora_json"] == 1
    for name in ("python", "torch", "transformers", "peft", "bitsandbytes", "device"):
        assert report[name], name
    import torch

    assert report["torch"] == torch.__version__ and report["device"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    text = cli("env")
    assert text.code == 0 and "transformers" in text.out and report["peft"] in text.out


def test_help_and_completion_never_import_torch():
    """Typer's completion is switched on, and completing a word (as bash does, through the
    _LORA_COMPLETE variable) answers from the CLI layer alone."""
    probe = ("import sys\nfrom lora_cli.cli import run\ntry:\n    run(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY' if {'torch', 'transformers', 'peft'} & set(sys.modules) else 'LIGHT')\n")
    help_ = subprocess.run([sys.executable, "-c", probe, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "--install-completion" in help_.stdout and "--show-completion" in help_.stdout
    assert help_.stdout.strip().endswith("LIGHT"), help_.stdout
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "_LORA_COMPLETE": "complete_bash", "COMP_WORDS": "lora tr",
                               "COMP_CWORD": "1"})
    assert "train" in done.stdout.split() and done.stdout.strip().endswith("LIGHT"), (done.stdout, done.stderr)


def test_the_command_line_freezes_the_collector_before_exiting_and_exit_handlers_still_run(tmp_path):
    """`lora` (main) freezes the garbage collector once its command is done, so interpreter
    teardown does not trace every library object again (the time it saves is a benchmark
    figure, not checked here); exit handlers, which flush and close what libraries opened,
    still run after it, and the exit code is the command's."""
    probe = ("import atexit, gc, sys\nmarker = sys.argv.pop(1)\n"
             "atexit.register(lambda: open(marker, 'w').write(str(gc.get_freeze_count() > 0)))\n"
             "from lora_cli.cli import main\nmain()\n")
    for args, code in ((["--version"], 0), (["check", str(tmp_path / "missing.yaml")], 2)):
        marker = tmp_path / "frozen"
        done = subprocess.run([sys.executable, "-c", probe, str(marker), *args], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        assert done.returncode == code, done.stderr
        assert marker.read_text() == "True", args
        marker.unlink()


def test_schema_is_generated_from_the_one_recipe_schema(cli):
    from lora_cli.recipe.schema import iter_keys
    from lora_cli.recipe.json_schema import SCHEMA_FILE, SCHEMA_LINE

    res = cli("schema")
    assert res.code == 0, res
    schema = json.loads(res.out)
    for dotted, _, f in iter_keys():
        node = schema
        for part in dotted.split("."):
            node = node["properties"][part]
        assert node["description"] == f.metadata["doc"], dotted
    assert schema["properties"]["lora"]["properties"]["method"]["enum"][0] == "lora"
    assert schema["properties"]["lora"]["additionalProperties"] is False  # misspelt keys are flagged
    assert set(schema["required"]) == {"model", "data", "output_dir"}
    assert SCHEMA_FILE.read_text(encoding="utf-8") == res.out, "docs/recipe.schema.json is stale: lora schema > docs/recipe.schema.json"
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):  # accelerate/ holds accelerate's files, not recipes
        first = recipe.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(SCHEMA_LINE), recipe
        assert (recipe.parent / first.removeprefix(SCHEMA_LINE)).resolve() == SCHEMA_FILE, recipe


def test_bundled_recipes_satisfy_the_json_schema():
    """A small structural check of each bundled recipe against the schema (keys exist, enums
    hold), so the schema cannot refuse what the loader accepts."""
    from lora_cli.recipe.json_schema import recipe_json_schema

    schema = recipe_json_schema()

    def check(node, value, where):
        if "enum" in node:
            assert value in node["enum"], where
        if node.get("type") == "object" and isinstance(value, dict) and "properties" in node:
            for k, v in value.items():
                assert k in node["properties"], f"{where}.{k}"
                check(node["properties"][k], v, f"{where}.{k}")

    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        check(schema, yaml.safe_load(recipe.read_text(encoding="utf-8")), recipe.name)


def test_check_json_layout(cli):
    res = cli("check", REPO / "recipes" / "demo.yaml", "--json")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["kind"] == "check" and doc["ok"] is True and doc["strict"] is False
    assert {"key", "problem", "why", "try"} == set(doc["warnings"][0])
    strict = cli("check", REPO / "recipes" / "demo.yaml", "--json", "--strict")
    assert strict.code == 2 and json.loads(strict.out)["ok"] is False


def test_estimate_json_layout(cli, tiny_random, tmp_path):
    from conftest import make_recipe

    res = cli("estimate", make_recipe(tmp_path, tiny_random), "--json", "--budget", "20k")
    assert res.code == 0, res
    doc = json.loads(res.out)
    assert doc["kind"] == "estimate" and doc["params"]["trainable"] > 0
    assert doc["params"]["trainable"] == doc["params"]["lora"] + doc["params"]["trained_in_full"]
    assert doc["memory"]["total_bytes"] == sum(c["bytes"] for c in doc["memory"]["components"]) + doc["memory"]["activations_bytes"]
    assert doc["budget"]["largest_rank"] >= 1


def test_quiet_keeps_what_a_command_answers(cli, tiny_random, tmp_path):
    """-q silences lora's status lines and progress, never the answer itself: the warnings and
    verdict of check, the estimate, the previewed rows, a dry run's plan."""
    from conftest import make_recipe

    recipe = make_recipe(tmp_path, tiny_random)
    fresh = ["--set", "data.cache=false"]  # a second run would say it reused the tokenised data
    for args in (["check", REPO / "recipes" / "demo.yaml"], ["estimate", recipe],
                 ["data", "preview", recipe, "--rows", "1", *fresh], ["train", recipe, "--dry-run", *fresh]):
        loud, quiet = cli(*args), cli("-q", *args)
        assert loud.code == quiet.code == 0 and loud.out.strip(), loud
        assert quiet.out == loud.out, (args, quiet)


def test_piped_or_no_color_output_has_no_colour_or_boxes():
    for env in ({}, {"NO_COLOR": "1"}):
        for args in (["--help"], ["train", "--help"], ["check", "recipes/demo.yaml"]):
            proc = subprocess.run([sys.executable, "-m", "lora_cli.cli", *args], capture_output=True, text=True,
                                  cwd=REPO, timeout=120, env={**os.environ, **env})
            text = proc.stdout + proc.stderr
            assert proc.returncode == 0, text
            assert "\x1b[" not in text and not (BOX_DRAWING & set(text)), (args, env, text)


def test_closed_choices_are_listed_in_help(cli):
    for args, shown in ((["build-tiny", "--help"], "llama|bert|t5|bart"),
                        (["export", "--help"], "gguf|gguf-adapter|ollama"),
                        (["merge", "--help"], "float32|bfloat16|float16"),
                        (["serve", "--help"], "transformers|vllm")):
        res = cli(*args)
        assert res.code == 0 and shown in res.out, (args, res.out)
    bad = cli("build-tiny", "--arch", "gpt9")
    assert bad.code == 2 and "gpt9" in bad.err + bad.out


def test_exit_codes(cli, monkeypatch):
    """0 done, 2 bad input, 130 interrupted, and an unexpected error is not turned into 2 (the
    interpreter exits 1 with the traceback a bug report needs); all documented in --help."""
    import lora_cli.train.lint

    assert cli("check", REPO / "recipes" / "demo.yaml").code == 0
    assert cli("check", "no-such.yaml").code == 2
    monkeypatch.setattr(lora_cli.train.lint, "lint_recipe", lambda r: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli("check", REPO / "recipes" / "demo.yaml").code == 130
    proc = subprocess.run([sys.executable, "-c", "import lora_cli.cli as c, lora_cli.train.lint as l\n"
                           "l.lint_recipe = lambda r: 1 / 0\nc.main()", "check", "recipes/demo.yaml"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 1 and "ZeroDivisionError" in proc.stderr
    helped = cli("--help").out
    assert all(f"{code} " in helped for code in (0, 1, 2, 130))


def test_cli_starts_and_checks_without_fcntl(tmp_path):
    """Windows has no fcntl: block it and the CLI still starts, validates a recipe and takes
    and releases the run-folder lock (filelock's portable primitive)."""
    code = ("import sys\nsys.modules['fcntl'] = None\n"
            "from lora_cli.cli import run\n"
            "assert run(['check', 'recipes/demo.yaml']) == 0\n"
            "print('OK')\n")
    proc = _python(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr


# Modules that exist on one family of systems only; lora's locks go through filelock instead.
ONE_PLATFORM_MODULES = {"fcntl", "termios", "tty", "pty", "pwd", "grp", "resource", "posix", "msvcrt", "winreg",
                        "_winapi", "nt"}


def test_no_module_imports_a_one_platform_module():
    """Every module of the package, in every room (this walked lora_cli/*.py alone once the
    modules had moved into rooms, and so checked nothing), at any depth (inside functions
    too): no fcntl, msvcrt or other module that one family of systems lacks."""
    import ast

    modules = sorted((REPO / "lora_cli").rglob("*.py"))
    assert REPO / "lora_cli" / "files" / "atomic.py" in modules  # the writer locks' module is walked
    for module in modules:
        tree = ast.parse(module.read_text(encoding="utf-8"))
        names = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not names & ONE_PLATFORM_MODULES, (module, names & ONE_PLATFORM_MODULES)


def test_the_disk_probe_needs_no_statvfs(tmp_path, monkeypatch):
    """Windows' os has no statvfs: the probe that tells a full disk after a library's own error
    raised AttributeError there (a traceback instead of exit 2). Only that one missing
    attribute is simulated here; it says nothing else about Windows (docs/reliability.md)."""
    import shutil
    from collections import namedtuple

    from lora_cli.files import ownership

    monkeypatch.delattr(os, "statvfs", raising=False)
    usage = namedtuple("usage", "total used free")  # Windows' shutil.disk_usage asks the system, not statvfs
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 1 << 30, (1 << 40) - (1 << 30)))
    out = tmp_path / "model.safetensors"
    assert ownership.disk_fault(out, RuntimeError("a library's own error")) is None  # plenty of room
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    fault = ownership.disk_fault(out, RuntimeError("a library's own error"))
    assert fault is not None and fault.errno == errno.ENOSPC and fault.filename == str(out)
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_folder_lock_refuses_a_second_holder(tmp_path, file_rules):
    from lora_cli.errors import LoraError
    from lora_cli.files.ownership import FolderLock, check_unlocked

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom lora_cli.files.ownership import FolderLock\n"
                               f"FolderLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LoraError, match=f"PID {holder.pid}"):
            FolderLock(tmp_path).acquire()
        with pytest.raises(LoraError, match="in use"):
            check_unlocked(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path).acquire()  # free again once the holder is gone
    lock.release()
    check_unlocked(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """safetensors writes 0600 through its own temporary file; what lora publishes gets the
    mode a plain file would get under the user's umask."""
    import torch
    from safetensors.torch import save_file

    from lora_cli.files import atomic

    old = os.umask(umask)
    try:
        with atomic.staged_folder(tmp_path / "model") as staging:
            save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
        atomic.write_text(tmp_path / "notes.txt", "hi")
    finally:
        os.umask(old)
    for path in (tmp_path / "model" / "model.safetensors", tmp_path / "notes.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o777 & ~umask


def test_progress_is_plain_lines_when_piped(tmp_path):
    """build-tiny piped: periodic plain lines with the step count, no redraws, no colour."""
    proc = subprocess.run([sys.executable, "-m", "lora_cli.cli", "build-tiny", "--out", str(tmp_path / "m"),
                           "--steps", "8"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("pre-training the tiny base:")]
    assert lines[-1].startswith("pre-training the tiny base: 8/8 steps (100%)") and "done" in lines[-1], proc.stdout
    assert len(lines) >= 3 and "\r" not in proc.stdout and "\x1b[" not in proc.stdout
    # the progress's last line comes before the builder's own summary, not after "written to"
    assert proc.stdout.splitlines()[-1].startswith("tiny base model written to"), proc.stdout
    umask = os.umask(0o022)
    os.umask(umask)
    weights = tmp_path / "m" / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask  # not safetensors' 0600


def test_progress_bar_on_a_terminal_keeps_bar_and_count_at_80_columns():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from lora_cli.train.callbacks import progress_columns

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = Progress(*progress_columns(), console=console, auto_refresh=False)
    bar.add_task("train", total=300, completed=120,
                 info="loss 1.2345  lr 3.00e-03  12,345 sup tok/s  eval 1.2222 (ppl 3.40)")
    console.print(bar.get_renderable())
    first, *rest = buf.getvalue().splitlines()
    assert "━" in first and "120/300" in first, buf.getvalue()
    assert "eval 1.2222" in buf.getvalue().replace("\n", " ") or "1.2222" in " ".join(rest)
    assert all(len(line) <= 80 for line in buf.getvalue().splitlines())


def test_redirected_output_is_utf8_whatever_the_code_page(monkeypatch):
    """Windows hands a redirected Python the ANSI code page (cp1252); lora makes such a stream
    UTF-8 (seen under Windows CPython on Wine: `lora schema > s.json` was cp1252). Here a cp1252
    stream stands in for it; a user's PYTHONIOENCODING is left alone."""
    import io

    from lora_cli.cli import utf8_when_redirected

    def code_page_stream():
        return io.TextIOWrapper(io.BytesIO(), encoding="cp1252")

    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    monkeypatch.setattr(sys, "stdout", code_page_stream())
    monkeypatch.setattr(sys, "stderr", code_page_stream())
    utf8_when_redirected()
    sys.stdout.write("用一句话 ≥ …")
    sys.stdout.flush()
    assert sys.stdout.buffer.getvalue() == "用一句话 ≥ …".encode("utf-8") and sys.stderr.encoding == "utf-8"

    monkeypatch.setenv("PYTHONIOENCODING", "cp1252")
    monkeypatch.setattr(sys, "stdout", code_page_stream())
    utf8_when_redirected()
    assert sys.stdout.encoding == "cp1252"
