"""`lora chat` driven as a user would: typed lines on stdin, through the real command.
Two adapters switched in one session answer exactly as each does loaded alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from inference_helpers import two_random_adapters

Q1, Q2 = "What is LoRA?", "And QLoRA?"
MAX_NEW = 10


@pytest.fixture(scope="module")
def adapters(tiny_random, tmp_path_factory):
    return two_random_adapters(tiny_random, tmp_path_factory.mktemp("chat-adapters"), seeds=(21, 22))


def _alone(adapter, question, history=(), system="", base=None, max_new_tokens=MAX_NEW):
    """The answer with only this adapter loaded (or the base alone)."""
    from lora_cli.infer.generate import generate_response
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference

    model, tok, infos = load_for_inference({"x": adapter} if adapter else {}, base=base)
    template = infos["x"].template if adapter else "human_assistant"
    return generate_response(model, tok, template, question, history=history, system=system,
                             settings=GenerationSettings(max_new_tokens=max_new_tokens))


def _answers(transcript, role="assistant"):
    return [(m["conversation"], m["adapter"], m["content"]) for m in transcript["messages"] if m["role"] == role]


def test_switching_adapters_in_one_session_matches_each_alone(adapters, tiny_random, tmp_path, cli, monkeypatch):
    one, two = adapters
    saved = tmp_path / "chat.json"
    script = [Q1, Q2, "/reset", "/adapter two", Q1, "/adapter off", Q1, f"/save {saved}", "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(script) + "\n"))
    res = cli("chat", "-a", f"one={one}", "-a", f"two={two}", "--max-new-tokens", MAX_NEW)
    assert res.code == 0, res
    assert "(history cleared)" in res.out and "talking to the base model" in res.out

    answers = _answers(json.loads(saved.read_text(encoding="utf-8")))
    assert [a[:2] for a in answers] == [(1, "one"), (1, "one"), (2, "two"), (2, "base")]
    one_q1, one_q2, two_q1, base_q1 = (a[2] for a in answers)
    assert len({one_q1, two_q1, base_q1}) == 3  # three different models really answered
    assert one_q1 == _alone(one, Q1)
    assert one_q2 == _alone(one, Q2, history=[(Q1, one_q1)])  # multi-turn history carried
    assert two_q1 == _alone(two, Q1)  # /reset: no history from adapter one
    assert base_q1 == _alone(None, Q1, history=[(Q1, two_q1)], base=tiny_random)
    for text in (one_q1, two_q1, base_q1):  # streamed to the terminal as it was generated
        assert text in res.out


def test_quiet_chat_keeps_the_conversation(adapters, cli, monkeypatch):
    """-q silences the model-loading spinner only: the greeting, the commands' answers and the answers stay."""
    one, _ = adapters
    monkeypatch.setattr("sys.stdin", io.StringIO("/adapter\nhello there\n/exit\n"))
    res = cli("-q", "chat", "-a", f"one={one}", "--max-new-tokens", 4)
    assert res.code == 0 and res.err == "", res
    assert res.out.startswith("chatting with one; /help lists commands\n") and "adapters: one (active); base" in res.out
    assert _alone(one, "hello there", max_new_tokens=4) in res.out


def test_real_command_with_scripted_stdin(adapters, tmp_path):
    """A subprocess of the installed `lora` entry point: commands, errors that keep the chat
    alive, the system prompt, and the transcript."""
    one, two = adapters
    saved = tmp_path / "t.json"
    script = ["/help", "/params temperature=0 max_new_tokens=6", "/params top_p=5", "/params nonsense",
              "/adapter nope", "/adapter", "/adapter two", "hello there", "/bogus",
              f"/save {saved}", f"/save {saved}", "/exit"]
    proc = subprocess.run([str(Path(sys.executable).with_name("lora")), "chat", "-a", f"one={one}", "-a", f"two={two}",
                           "--system", "Be brief."], input="\n".join(script) + "\n",
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    out = proc.stdout
    assert "/adapter [NAME|off]" in out and "/params [KEY=VALUE..]" in out  # /help
    assert "max_new_tokens=6 temperature=0.0 top_p=1.0" in out
    assert "error: /params: top_p must be in (0, 1], got 5.0" in out
    assert "error: /params: 'nonsense' is not KEY=VALUE" in out
    assert "error: no adapter 'nope'" in out and "loaded: one, two" in out
    assert "adapters: one (active), two; base" in out
    assert "unknown command /bogus" in out
    assert f"transcript written to {saved}" in out and f"error: /save {saved} already exists" in out

    transcript = json.loads(saved.read_text(encoding="utf-8"))
    assert transcript["system"] == "Be brief." and transcript["settings"]["max_new_tokens"] == 6
    assert transcript["messages"][0] == {"conversation": 1, "role": "system", "content": "Be brief."}
    (_, adapter, answer), = _answers(transcript)
    assert adapter == "two" and answer and answer in out
    assert answer == _alone(two, "hello there", system="Be brief.", max_new_tokens=6)
    assert answer != _alone(two, "hello there", max_new_tokens=6)  # the system prompt reached the model


def test_system_prompt_is_rendered_by_the_template(tiny_random):
    from lora_cli.infer.generate import build_prompt_ids
    from lora_cli.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_random))
    text = tok.decode(build_prompt_ids(tok, "human_assistant", Q1, history=[("hi", "hello")], system="Be brief."))
    assert text == f"<s>System: Be brief.\n\nHuman: hi\n\nAssistant: hello</s>Human: {Q1}\n\nAssistant: "


def test_ctrl_c_stops_the_answer_not_the_chat(adapters):
    from lora_cli.infer.engines import TransformersBackend
    from lora_cli.infer.generate import ChatSession, chat_loop
    from lora_cli.infer.settings import GenerationSettings
    from lora_cli.model.load import load_for_inference

    model, tok, infos = load_for_inference({"one": adapters[0]})
    session = ChatSession(TransformersBackend(model, tok), {"one": infos["one"].template}, GenerationSettings(max_new_tokens=MAX_NEW),
                          adapter="one")
    lines = iter([Q1, Q1, "/exit"])
    shown, streamed, interrupts = [], [], [1]

    def emit(text):
        if interrupts:  # the user presses Ctrl-C while the first answer streams
            interrupts.pop()
            raise KeyboardInterrupt
        streamed.append(text)

    chat_loop(session, read=lambda _: next(lines), write=shown.append, emit=emit)
    assert "\n(stopped)" in shown
    assert len(session.history) == 1  # the stopped answer is not part of the conversation
    assert session.history[0] == (Q1, _alone(adapters[0], Q1))
    assert "".join(streamed).strip() == session.history[0][1]
