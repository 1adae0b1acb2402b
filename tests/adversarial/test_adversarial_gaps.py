"""Issue 26, the gaps left after the first rounds: `/save` inside `lora chat` goes through the
one output check (class 5), and the ownership marker survives two writers at once (classes 3
and 5: a lost entry made lora's own file look like the user's, or the reverse)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from inference_helpers import random_adapter
from safety_helpers import assert_tree_unchanged, snapshot_tree

# --------------------------------------------------------------------------- /save in lora chat


@pytest.fixture(scope="module")
def chat_adapter(tiny_random, tmp_path_factory) -> Path:
    return random_adapter(tiny_random, tmp_path_factory.mktemp("chat-save") / "adapter", seed=5)


@pytest.fixture
def chat_user(tmp_path, tiny_random, chat_adapter) -> Path:
    """A user's folder: a base, an adapter trained on it, a tools file and notes."""
    root = tmp_path / "user"
    root.mkdir()
    shutil.copytree(tiny_random, root / "base")
    shutil.copytree(chat_adapter, root / "adapter")
    (root / "tools.json").write_text('[{"type": "function", "function": {"name": "f", "parameters": {}}}]',
                                     encoding="utf-8")
    (root / "notes.txt").write_text("the user's own notes\n", encoding="utf-8")
    return root


def _chat(cli, monkeypatch, root: Path, lines: list[str], *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines + ["/exit"]) + "\n"))
    return cli("chat", "-a", root / "adapter", "--max-new-tokens", "2", "--tools", root / "tools.json", *extra)


# (what /save is given, the words of the refusal); each keeps the chat going and the folder as it was
SAVE_CASES = {
    "save-new-file-inside-adapter": ("adapter/chat.json", "is inside the adapter"),  # was written
    "save-new-file-inside-base": ("base/chat.json", "is inside the base model (--base)"),  # was written
    "save-over-adapter-weights": ("adapter/adapter_model.safetensors", "is inside the adapter"),
    "save-force-over-adapter-weights": ("--force adapter/adapter_model.safetensors", "is inside the adapter"),
    "save-force-is-the-adapter": ("--force adapter", "is the adapter"),
    "save-force-over-tools-file": ("--force tools.json", "is the tools file (--tools)"),
    "save-force-over-base-config": ("--force base/config.json", "is inside the base model (--base)"),
    "save-over-user-file": ("notes.txt", "/save {root}/notes.txt already exists"),
    "save-force-over-user-file": ("--force notes.txt", "was not written by `lora chat`"),
    "save-force-is-a-folder": ("--force base", "is the base model"),
}


@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_chat_save_goes_through_the_one_output_check(case, chat_user, cli, monkeypatch):
    arg, culprit = SAVE_CASES[case]
    words = arg.split(" ")
    words[-1] = str(chat_user / words[-1])
    before = snapshot_tree(chat_user)
    result = _chat(cli, monkeypatch, chat_user, ["/save " + " ".join(words), "/save"],
                   "--base", chat_user / "base")
    assert result.code == 0, result  # a refused /save keeps the chat going
    assert "Traceback" not in result.out + result.err
    assert "error: " in result.out and culprit.format(root=chat_user) in result.out, result.out
    assert "error: /save needs a file name" in result.out
    assert_tree_unchanged(before, snapshot_tree(chat_user))


def test_chat_save_force_replaces_only_its_own_transcript(chat_user, cli, monkeypatch):
    saved = chat_user / "talks" / "t.json"
    result = _chat(cli, monkeypatch, chat_user, ["hello", f"/save {saved}", f"/save {saved}"])
    assert result.code == 0, result
    assert f"transcript written to {saved}" in result.out and f"/save {saved} already exists" in result.out
    first = saved.stat().st_ino
    assert len(json.loads(saved.read_text(encoding="utf-8"))["messages"]) == 2
    result = _chat(cli, monkeypatch, chat_user, ["again", f"/save --force {saved}"])
    assert f"transcript written to {saved}" in result.out, result.out
    assert saved.stat().st_ino != first and json.loads(saved.read_text(encoding="utf-8"))["messages"][0]["content"] == "again"
    saved.write_text(saved.read_text(encoding="utf-8") + "\n", encoding="utf-8")  # the user edits it: theirs now
    edited = saved.read_bytes()
    result = _chat(cli, monkeypatch, chat_user, [f"/save --force {saved}"])
    assert "was not written by `lora chat` (or was changed since)" in result.out, result.out
    assert saved.read_bytes() == edited


# --------------------------------------------------------------------------- the marker under two writers

WRITER = """
import sys, time
from pathlib import Path
from lora_cli.files import ownership
folder, prefix, start, n = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
if len(sys.argv) > 5:  # under the emulated Windows rules (tests/windows_rules.py)
    sys.path.insert(0, sys.argv[5])
    from windows_rules import WindowsRules
    WindowsRules().install()
while time.time() < start:
    pass
for i in range(n):
    ownership.write_output_text(folder / f"{prefix}{i}.jsonl", f"{i}\\n", "generate")
ownership.claim(folder / "run", "train", [f"{prefix}-{i}" for i in range(n)])
"""


def test_two_processes_writing_into_one_folder_lose_no_claim(tmp_path, file_rules):
    """Two commands writing files into one folder at the same instant: every file of each is
    still lora's afterwards (without the marker lock one rewrite dropped the other's entry),
    and no lock file stays behind."""
    from lora_cli.files import ownership

    (tmp_path / "run").mkdir()
    n = 150
    start = time.time() + 3  # both past their imports before either writes
    rules = [str(Path(__file__).resolve().parents[1])] if file_rules is not None else []
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), prefix, str(start), str(n), *rules])
             for prefix in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    lost = [f"{prefix}{i}" for prefix in "ab" for i in range(n)
            if ownership.file_written_by(tmp_path / f"{prefix}{i}.jsonl") != "generate"]
    assert not lost, f"{len(lost)} claims lost, e.g. {lost[:5]}"
    assert sorted(ownership.read_claim(tmp_path / "run")["files"]) == sorted(f"{p}-{i}" for p in "ab" for i in range(n))
    assert not list(tmp_path.rglob(ownership.MARKER_LOCK))


def test_a_marker_lock_left_by_a_killed_writer_is_taken_over(tmp_path, file_rules):
    """kill -9 while holding the lock leaves its file, held by nobody: the next writer takes it
    (and removes it), and the folder counts as empty."""
    from lora_cli.files import ownership

    (tmp_path / ownership.MARKER_LOCK).write_text("")
    assert ownership.is_empty(tmp_path)
    ownership.write_output_text(tmp_path / "a.jsonl", "x\n", "generate")
    assert ownership.file_written_by(tmp_path / "a.jsonl") == "generate"
    assert not (tmp_path / ownership.MARKER_LOCK).exists()


# --------------------------------------------------------------------------- one more hole per class (found here)

HUGE = "ab " * 3_500_000  # 10.5 MB


def _tools(root: Path, description: str) -> Path:
    path = root / "big-tools.json"
    path.write_text(json.dumps([{"type": "function", "function": {"name": "f", "description": description,
                                                                  "parameters": {}}}]), encoding="utf-8")
    return path


def test_generate_refuses_a_10mb_tools_file_before_tokenising(chat_user, cli):
    """Class 6: --tools is rendered into every prompt; the server counted its characters, generate did not."""
    result = cli("generate", "-a", chat_user / "adapter", "--tools", _tools(chat_user, HUGE), "hello")
    assert result.code == 2 and "--tools" in result.err and "characters" in result.err, result
    assert "Traceback" not in result.out + result.err


def test_chat_refuses_a_10mb_tools_file_at_start(chat_user, cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    result = cli("chat", "-a", chat_user / "adapter", "--tools", _tools(chat_user, HUGE))
    assert result.code == 2 and "--tools" in result.err and "characters" in result.err, result


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_tools_file_that_is_a_device_or_fifo_is_named_for_what_it_is(kind, chat_user, cli):
    """Class 6: --tools /dev/zero was 'no such file'; a FIFO the same (now: named, never waited on)."""
    import os

    path = Path("/dev/zero")
    if kind == "fifo":
        path = chat_user / "tools.fifo"
        os.mkfifo(path)
    result = cli("generate", "-a", chat_user / "adapter", "--tools", path, "hello")
    expected = "is a character device" if kind == "device" else "is a FIFO"
    assert result.code == 2 and expected in result.err, result


def _eval_rows(root: Path, rows: list[dict]) -> Path:
    path = root / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_refuses_a_10mb_row_naming_it(chat_user, cli):
    """Class 6: eval's questions were tokenised whole and asked past the context; refused now
    as `lora generate` refuses a prompt, naming the row, before tokenising."""
    rows = _eval_rows(chat_user, [{"instruction": "hi", "output": "x"}, {"instruction": HUGE, "output": "x"}])
    before = snapshot_tree(chat_user)
    result = cli("eval", "--data", rows, "-a", chat_user / "adapter", "--max-new-tokens", "2")
    assert result.code == 2, result
    assert "row 2" in result.err and "characters" in result.err, result.err
    assert_tree_unchanged(before, snapshot_tree(chat_user))


def test_eval_out_inside_the_base_is_refused(chat_user, cli):
    """Class 5: eval's --out skipped the base model among its inputs (a new folder inside it was written)."""
    rows = _eval_rows(chat_user, [{"instruction": "hi", "output": "x"}])
    before = snapshot_tree(chat_user)
    result = cli("eval", "--data", rows, "-a", chat_user / "adapter", "--base-model", chat_user / "base",
                 "--out", chat_user / "base" / "evals")
    assert result.code == 2 and "is inside the base model" in result.err, result
    assert_tree_unchanged(before, snapshot_tree(chat_user))


def test_chat_save_on_a_full_disk_keeps_the_chat(chat_user, cli, monkeypatch):
    """Class 4: /save on a full disk says so (path and reason) and the chat goes on; nothing left behind."""
    import errno

    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".lora-staged-t.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full)
    before = snapshot_tree(chat_user)
    result = _chat(cli, monkeypatch, chat_user, [f"/save {chat_user / 't.json'}", "/help"])
    assert result.code == 0, result
    assert f"writing {chat_user / 't.json'} failed: No space left on device" in result.out, result.out
    assert "/exit" in result.out  # /help answered after it
    assert_tree_unchanged(before, snapshot_tree(chat_user))


@pytest.fixture(scope="module")
def served(tiny_random, chat_adapter):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lora_cli.infer.serve import build_server, create_app

    server = build_server({"one": chat_adapter}, max_batch=4, max_queue=16)
    with TestClient(create_app(server), raise_server_exceptions=False) as client:
        yield client
    server.scheduler.close()


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"})])
def test_server_refuses_a_flood_of_stop_sequences(route, body, served):
    """Class 2: 100,000 stop strings (under the body limit) made every generated token decode
    the answer 100,000 times, holding the one generation thread every client waits on."""
    flood = {"model": "one", "max_tokens": 4, "stop": [f"s{i}" for i in range(100_000)], **body}
    response = served.post(route, json=flood)
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == "stop" and "at most 16 stop sequences, got 100,000" in error["message"]
    ok = served.post(route, json={"model": "one", "max_tokens": 2, "stop": ["a", "b", "c", "d"], **body})
    assert ok.status_code == 200, ok.text[:500]


def test_stop_strings_are_searched_in_one_decode_per_token():
    from lora_cli.infer.engines import GenerationRequest, _Row
    from lora_cli.infer.settings import GenerationSettings

    decodes = []
    row = _Row(GenerationRequest([1], GenerationSettings(max_new_tokens=8), stop=tuple(f"s{i}" for i in range(50))),
               {0}, lambda ids: decodes.append(ids) or "text")
    row.add(5)
    assert len(decodes) == 1


@pytest.mark.parametrize("code", ["ENOSPC", "EROFS", "EACCES"])
def test_recipe_keys_update_on_a_failing_disk_is_exit_2(code, tmp_path, cli, monkeypatch):
    """Class 4: `recipe-keys --update` wrote the README without the disk-fault turn: a read-only
    README folder was a traceback."""
    import errno
    import os

    readme = tmp_path / "README.md"
    readme.write_text("# mine\n<!-- recipe-keys:start -->\n<!-- recipe-keys:end -->\n", encoding="utf-8")
    before = snapshot_tree(tmp_path)
    real = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == readme:
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(dst))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", failing)
    result = cli("recipe-keys", "--update", readme)
    assert result.code == 2 and f"writing {readme} failed: {os.strerror(getattr(errno, code))}" in result.err, result
    assert_tree_unchanged(before, snapshot_tree(tmp_path))


@pytest.mark.parametrize("module", ["antigravity", "megatron.core"])
def test_adapter_config_naming_a_module_to_import_is_refused(module, chat_user, cli):
    """Class 1: adapter_config.json's megatron_config makes peft import the module its
    megatron_core names (peft allow-lists a prefix, with a traceback for anything else); a
    folder never chooses code to import: exit 2 naming the field, before peft reads it."""
    config_file = chat_user / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(megatron_config={"tensor_model_parallel_size": 1}, megatron_core=module)
    config_file.write_text(json.dumps(config), encoding="utf-8")
    before = snapshot_tree(chat_user)
    result = cli("generate", "-a", chat_user / "adapter", "hello", "--max-new-tokens", "2")
    assert result.code == 2 and "megatron_config is set" in result.err and module in result.err, result
    assert "Traceback" not in result.out + result.err
    assert_tree_unchanged(before, snapshot_tree(chat_user))


# --------------------------------------------------------------------------- found by `make fuzz` (this round)

def test_a_turn_whose_role_is_a_list_is_named(tmp_path, tiny_random, cli):
    """make fuzz: {"messages": [{"from": []}]} was `TypeError: unhashable type: 'list'` (a traceback)."""
    from conftest import make_recipe, write_jsonl

    recipe = make_recipe(tmp_path, tiny_random, write_jsonl(tmp_path / "data.jsonl", [{"messages": [{"from": []}]}]))
    before = snapshot_tree(tmp_path)
    result = cli("data", "preview", recipe)
    assert result.code == 2 and "row 1, turn 1: unknown role []" in result.err, result
    assert "Traceback" not in result.out + result.err
    assert_tree_unchanged(before, snapshot_tree(tmp_path))


@pytest.mark.parametrize("temperature", [1.401298464324817e-45, 1e-30, 9e-6])
def test_a_denormal_temperature_decodes_greedily(temperature, served):
    """make fuzz: temperature 1.4e-45 divided the logits into inf, and sampling answered HTTP 500
    ("probability tensor contains either inf, nan or element < 0"). Below 1e-5 decoding is greedy,
    as vLLM does."""
    body = {"model": "one", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    greedy = served.post("/v1/chat/completions", json=body)
    tiny = served.post("/v1/chat/completions", json={**body, "temperature": temperature})
    assert tiny.status_code == 200, tiny.text[:500]
    assert tiny.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]


# --------------------------------------------------------------------------- round five: settings that overflow

# The repetition penalty divides a seen token's positive logit (and multiplies a negative one)
# before the temperature divides them all, in float32: 5e-324 (a subnormal), 1e-300 or 1e-30 made
# logits inf and sampling raise "probability tensor contains either inf, nan or element < 0";
# 1e39 is inf in float32 and, with a temperature as large, -inf / inf gave NaN.
PENALTIES_REFUSED = [5e-324, 1e-300, 1e-30, 0.0099, 100.5, 1e39]


@pytest.mark.parametrize("penalty", PENALTIES_REFUSED)
def test_generate_refuses_a_repetition_penalty_that_overflows(penalty, chat_user, cli):
    before = snapshot_tree(chat_user)
    result = cli("generate", "-a", chat_user / "adapter", "hello hello hello", "--max-new-tokens", "4",
                 "--temperature", "1e-4", "--repetition-penalty", repr(penalty))
    assert result.code == 2, result
    assert f"--repetition-penalty must be between 0.01 and 100, got {penalty}" in result.err, result
    assert "Traceback" not in result.out + result.err
    assert_tree_unchanged(before, snapshot_tree(chat_user))


@pytest.mark.parametrize("penalty", ["0.01", "100"])
def test_generate_samples_at_the_repetition_penalty_bounds(penalty, chat_user, cli):
    """The bounds themselves are allowed and keep the logits finite at the smallest sampling temperature."""
    result = cli("generate", "-a", chat_user / "adapter", "hello hello hello", "--max-new-tokens", "4",
                 "--temperature", "1e-5", "--repetition-penalty", penalty, "--seed", "1")
    assert result.code == 0, result


def test_chat_params_refuses_a_repetition_penalty_that_overflows(chat_user, cli, monkeypatch):
    """/params with 5e-324 set the penalty and the next answer crashed the chat with a traceback;
    now the assignment is refused, the settings stay as they were and the chat answers."""
    result = _chat(cli, monkeypatch, chat_user, ["/params temperature=1 repetition_penalty=5e-324", "hello hello"])
    assert result.code == 0, result
    assert "/params: repetition_penalty must be between 0.01 and 100, got 5e-324" in result.out + result.err, result
    assert "Traceback" not in result.out + result.err


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello hello"}]}),
    ("/v1/completions", {"prompt": "hello hello"})])
def test_server_refuses_a_repetition_penalty_that_overflows(route, body, served):
    for penalty in PENALTIES_REFUSED + [1e300]:
        answer = served.post(route, json={"model": "one", **body, "max_tokens": 3, "temperature": 1,
                                          "repetition_penalty": penalty})
        assert answer.status_code == 400, (penalty, answer.text[:500])
        error = answer.json()["error"]
        assert error["param"] == "repetition_penalty" and "between 0.01 and 100" in error["message"], error
    for penalty in (0.01, 100):
        answer = served.post(route, json={"model": "one", **body, "max_tokens": 3, "temperature": 1e-5,
                                          "repetition_penalty": penalty})
        assert answer.status_code == 200, (penalty, answer.text[:500])


@pytest.fixture(scope="module")
def min_tokens_adapter(tiny_random, tmp_path_factory) -> Path:
    """An adapter on a base whose generation_config.json sets min_new_tokens (as summarising
    models ship min_length): generate masks EOS with -inf for the first tokens."""
    base = tmp_path_factory.mktemp("min-tokens") / "base"
    shutil.copytree(tiny_random, base)
    config_file = base / "generation_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "min_new_tokens": 3}), encoding="utf-8")
    return random_adapter(base, base.parent / "adapter", seed=5)


@pytest.mark.parametrize("temperature", [1e39, 1e300, 100.5])
def test_generate_refuses_a_temperature_that_overflows(temperature, min_tokens_adapter, cli):
    """1e39 is inf in float32: the masked EOS logit became -inf / inf = NaN and sampling raised
    (a traceback). Temperatures go up to 100 (a model's logits, tens apart, then differ by well
    under one: sampling is all but uniform); the server keeps OpenAI's 2."""
    result = cli("generate", "-a", min_tokens_adapter, "hello", "--max-new-tokens", "4",
                 "--temperature", repr(temperature))
    assert result.code == 2, result
    assert f"--temperature must be between 0 and 100, got {temperature}" in result.err, result
    assert "Traceback" not in result.out + result.err


def test_generate_samples_at_the_largest_temperature(min_tokens_adapter, cli):
    result = cli("generate", "-a", min_tokens_adapter, "hello", "--max-new-tokens", "4", "--temperature", "100",
                 "--seed", "1")
    assert result.code == 0, result


def test_chat_params_refuses_a_temperature_that_overflows(min_tokens_adapter, cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("/params temperature=1e39\nhello\n/exit\n"))
    result = cli("chat", "-a", min_tokens_adapter, "--max-new-tokens", "4")
    assert result.code == 0, result
    assert "/params: temperature must be between 0 and 100, got 1e+39" in result.out + result.err, result
    assert "Traceback" not in result.out + result.err
