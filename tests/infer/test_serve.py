"""`lora serve`: a real server (uvicorn on a free localhost port, in a thread) driven with the
official openai client. Answers equal `lora generate`'s; errors come in OpenAI's shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib.error
import urllib.request

import pytest
from conftest import write_jsonl
from inference_helpers import two_random_adapters

openai = pytest.importorskip("openai")  # the `serve` extra; the test extra installs it

PROMPTS = ["What is LoRA?", "Explain the rank of an adapter.", "写一首关于秋天的短诗", "hi"]
MODELS = ("one", "two", "base")
NEW = 8


@pytest.fixture(scope="module")
def adapters(tiny_random, tmp_path_factory):
    return two_random_adapters(tiny_random, tmp_path_factory.mktemp("serve-adapters"), seeds=(41, 42))


@pytest.fixture(scope="module")
def generated(adapters, tmp_path_factory):
    """What `lora generate` answers (greedy, NEW tokens): {model id: [answer per prompt]}."""
    from lora_cli.cli import run

    work = tmp_path_factory.mktemp("generated")
    prompts = write_jsonl(work / "prompts.jsonl", [{"instruction": p} for p in PROMPTS])
    one, two = adapters
    common = ["generate", "-a", f"one={one}", "-a", f"two={two}", "--file", str(prompts), "--max-new-tokens", str(NEW)]
    assert run(common + ["--out", str(work / "side.jsonl")]) == 0
    assert run(common + ["--base-only", "--out", str(work / "base.jsonl")]) == 0
    answers = {m: [] for m in MODELS}
    for name in ("side", "base"):
        for line in (work / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            answers[row["adapter"]].append(row["response"])
    return answers


@pytest.fixture(scope="module")
def server(adapters):
    from lora_cli.infer.serve import build_server

    one, two = adapters
    built = build_server({"one": one, "two": two}, max_batch=16, max_queue=64)
    yield built
    built.scheduler.close()


@pytest.fixture(scope="module")
def running(server):
    from lora_cli.infer.serve import ServerThread

    with ServerThread(server) as thread:
        yield thread


def _http(url: str, body: bytes | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a plain HTTP call: for what the openai client cannot send."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def _health(running) -> dict:
    return _http(running.url + "/health")[1]


def _client(running, **kwargs):
    return openai.OpenAI(base_url=running.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def _chat(client, model, prompt, **kwargs):
    settings = {"temperature": 0, "max_tokens": NEW, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **settings)


def test_models_are_listed(running):
    ids = [m.id for m in _client(running).models.list().data]
    assert ids == ["one", "two", "base"]


def test_greedy_chat_and_completion_equal_lora_generate(running, generated):
    client = _client(running)
    for model in MODELS:
        chat = [_chat(client, model, p).choices[0].message.content for p in PROMPTS]
        text = [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=NEW).choices[0].text
                for p in PROMPTS]
        assert chat == generated[model], model
        assert text == generated[model], model
    # each adapter answers with its own behaviour, the base with the base's
    assert len({tuple(generated[m]) for m in MODELS}) == 3


def test_streamed_text_equals_whole_answer_and_usage_counts(running, server):
    from lora_cli.infer.generate import build_prompt_ids

    client = _client(running)
    prompt = PROMPTS[1]
    whole = _chat(client, "two", prompt)
    chunks = list(_chat(client, "two", prompt, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    ids = build_prompt_ids(server.backend.tokenizer, server.models["two"].template, prompt)
    assert whole.usage.prompt_tokens == len(ids)
    assert whole.usage.completion_tokens == NEW and whole.choices[0].finish_reason == "length"

    text = client.completions.create(model="one", prompt=prompt, temperature=0, max_tokens=NEW).choices[0].text
    streamed = client.completions.create(model="one", prompt=prompt, temperature=0, max_tokens=NEW, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_settings_stop_n_seed_and_system(running, generated):
    client = _client(running)
    answer = generated["one"][0]
    stop = answer[len(answer) // 2:][:2]
    cut = _chat(client, "one", PROMPTS[0], stop=[stop])
    assert cut.choices[0].message.content == answer[:answer.find(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"

    two = _chat(client, "one", PROMPTS[0], n=2)
    assert [c.message.content for c in two.choices] == [answer, answer] and [c.index for c in two.choices] == [0, 1]

    def sampled():
        return _chat(client, "one", PROMPTS[0], temperature=1.5, seed=7, n=3)

    first, again = sampled(), sampled()
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices} | {answer}) > 1  # sampling really sampled

    system = client.chat.completions.create(
        model="one", temperature=0, max_tokens=NEW,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}])
    from lora_cli.infer.generate import build_prompt_ids

    assert system.usage.prompt_tokens > _chat(client, "one", PROMPTS[0]).usage.prompt_tokens
    assert system.usage.prompt_tokens == len(build_prompt_ids(
        running.server.backend.tokenizer, running.server.models["one"].template, PROMPTS[0], system="Be brief."))


WEATHER = {"type": "function", "function": {"name": "weather", "description": "today's weather",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def test_tools_and_tool_turns_are_rendered_as_training_rendered_them(running):
    """A request's `tools`, an assistant's `tool_calls` and `tool` results go through the data
    reader and the training template: the prompt is exactly the ids training built there."""
    from lora_cli.data.template import prompt_ids

    client = _client(running)
    tokenizer, template = running.server.backend.tokenizer, running.server.models["one"].template
    asked = _chat(client, "one", PROMPTS[0], tools=[WEATHER])
    plain = _chat(client, "one", PROMPTS[0])
    question = [{"role": "user", "content": PROMPTS[0]}]
    assert asked.usage.prompt_tokens == len(prompt_ids(tokenizer, template, question, [WEATHER]))
    assert asked.usage.prompt_tokens > plain.usage.prompt_tokens  # the schema really is in the prompt

    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    turns = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"}]
    answer = client.chat.completions.create(model="one", messages=turns, tools=[WEATHER], temperature=0, max_tokens=NEW)
    expected = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
                {"role": "tool", "content": "sunny, 21C"}]
    assert answer.usage.prompt_tokens == len(prompt_ids(tokenizer, template, expected, [WEATHER]))
    assert answer.choices[0].finish_reason == "length"

    nameless = dict(call, function={"arguments": "{}"})
    e = _error(lambda: client.chat.completions.create(
        model="one", tools=[WEATHER], messages=[turns[0], dict(turns[1], tool_calls=[nameless]), turns[2]]))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "messages.1" and "'name'" in e.message
    e = _error(lambda: _chat(client, "one", "hi", tools=[{"type": "function", "function": {"description": "no name"}}]))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "tools"


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return info.value


def test_errors_come_in_openai_shape_with_the_right_status(running):
    client = _client(running)
    e = _error(lambda: _chat(client, "nope", "hi"))
    assert e.status_code == 404 and e.response.json()["error"]["code"] == "model_not_found"
    e = _error(lambda: _chat(client, "one", "hi", temperature=5))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "temperature"
    e = _error(lambda: client.chat.completions.create(model="one", messages=[{"role": "robot", "content": "x"}]))
    assert e.status_code == 400 and e.response.json()["error"]["param"].startswith("messages.0")
    e = _error(lambda: client.chat.completions.create(model="one", messages=[]))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "messages"
    e = _error(lambda: client.chat.completions.create(
        model="one", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]))
    assert e.status_code == 400 and "last message" in e.message
    e = _error(lambda: _chat(client, "one", "hi", max_tokens=None, extra_body={"max_tokens": 5000}))
    assert e.status_code == 400 and e.response.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 1024" in e.message
    e = _error(lambda: client.completions.create(model="one", prompt="word " * 2000, max_tokens=4))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "prompt"
    status, body, _ = _http(running.url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json" and "not valid JSON" in body["error"]["message"]
    assert _http(running.url + "/v1/nothing")[0] == 404
    assert _chat(client, "one", "still up?").choices[0].message.content  # none of that hurt the server


def test_api_key_is_required_when_set(server):
    from lora_cli.infer.serve import Scheduler, Server, ServerThread

    keyed = Server(server.backend, server.models, Scheduler(server.backend), api_key="s3cret")
    try:
        with ServerThread(keyed) as running:
            for key in ("wrong", "s3cre"):
                e = _error(lambda: _client(running, api_key=key).models.list())
                assert e.status_code == 401 and e.response.json()["error"]["code"] == "invalid_api_key"
            assert _http(running.url + "/v1/models")[0] == 401
            assert [m.id for m in _client(running, api_key="s3cret").models.list().data] == list(MODELS)
            assert _health(running)["status"] == "ok"
    finally:
        keyed.scheduler.close()


def test_sixteen_concurrent_clients_are_batched_and_answered_correctly(running, generated):
    client = _client(running)
    jobs = [(MODELS[i % 3], i % len(PROMPTS)) for i in range(16)]
    before = _health(running)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: _chat(client, job[0], PROMPTS[job[1]]).choices[0].message.content, jobs))
    assert answers == [generated[model][i] for model, i in jobs]
    after = _health(running)
    assert after["served"] - before["served"] == 16
    assert after["batches"] - before["batches"] < 16  # requests shared generate calls
    assert after["largest_batch"] > 1


def test_full_queue_answers_429_and_a_disconnect_frees_its_slot(server):
    from lora_cli.infer.serve import Scheduler, Server, ServerThread

    small = Server(server.backend, server.models, Scheduler(server.backend, max_queue=1))
    try:
        with ServerThread(small) as running:
            client = _client(running)
            stream = _chat(client, "one", PROMPTS[0], stream=True, max_tokens=900)
            next(iter(stream))  # generation has started and holds the only slot
            e = _error(lambda: _chat(client, "two", PROMPTS[1]))
            assert e.status_code == 429 and e.response.headers["Retry-After"] == "1"
            stream.close()  # the client goes away mid-stream
            deadline = time.monotonic() + 30
            while (health := _health(running))["running"] + health["queued"]:
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            assert health["cancelled"] == 1  # stopped before its 900 tokens, not run out
            assert _chat(client, "two", PROMPTS[1]).choices[0].message.content  # the slot is free again
    finally:
        small.scheduler.close()


def test_a_client_leaving_a_plain_request_cancels_it(running):
    """No stream: the server notices the closed connection while it waits and stops the rows."""
    import socket
    from urllib.parse import urlparse

    before = _health(running)["cancelled"]
    body = json.dumps({"model": "one", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 900})
    url = urlparse(running.url)
    with socket.create_connection((url.hostname, url.port)) as conn:
        conn.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode())
        deadline = time.monotonic() + 30
        while not _health(running)["running"]:  # wait until it is being generated
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while (health := _health(running))["cancelled"] == before or health["running"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    assert health["cancelled"] == before + 1


def test_a_failing_generation_gets_a_500_and_the_server_goes_on(server):
    from lora_cli.infer.serve import Scheduler, Server, ServerThread

    class Flaky:
        """The real backend, except that it breaks on prompts containing 'boom'."""
        tokenizer, context_length = server.backend.tokenizer, server.backend.context_length

        def generate(self, requests):
            if any("boom" in server.backend.tokenizer.decode(r.prompt_ids) for r in requests):
                raise RuntimeError("CUDA out of memory (simulated)")
            return server.backend.generate(requests)

    flaky = Flaky()
    broken = Server(flaky, server.models, Scheduler(flaky))
    try:
        with ServerThread(broken) as running:
            client = _client(running)
            e = _error(lambda: _chat(client, "one", "boom"))
            assert e.status_code == 500 and "out of memory" in e.message
            assert _chat(client, "one", PROMPTS[0]).choices[0].message.content
            assert _health(running)["failed"] == 1
    finally:
        broken.scheduler.close()


def test_lora_serve_command_binds_localhost_and_prints_the_curl_line(adapters, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lora")), "serve", "-a", f"one={adapters[0]}", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "300"})
    try:
        lines = []
        timer = threading.Timer(240, proc.kill)
        timer.start()
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("try:"):
                break
        out = "".join(lines)
        assert f"serving one, base at http://127.0.0.1:{port}/v1 (local connections only" in out, out
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in out and '"model": "one"' in out
        deadline = time.monotonic() + 60
        while True:
            try:
                assert _http(f"http://127.0.0.1:{port}/health")[1]["status"] == "ok"
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        timer.cancel()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_unknown_engine_and_reserved_name_are_refused(adapters, cli):
    res = cli("serve", "-a", f"one={adapters[0]}", "--engine", "tgi")
    assert res.code == 2 and "--engine" in res.err and "'tgi' is not one of 'transformers', 'vllm'" in res.err
    res = cli("serve", "-a", f"base={adapters[0]}", "--engine", "vllm")
    assert res.code == 2 and "the name 'base' is taken by the base model" in res.err


# --------------------------------------------------------------------------- on an open network

def _raw(running, request: bytes, *, wait: float = 10.0) -> bytes:
    """What the server answers to raw bytes, read until it closes or `wait` seconds pass."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(running.url)
    with socket.create_connection((url.hostname, url.port), timeout=wait) as conn:
        conn.sendall(request)
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b'"error"' in answer:
                    break
        except TimeoutError:
            pass
    return answer


def _post_head(path: str, length: int, key: str | None = None, extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


@pytest.fixture(scope="module")
def keyed(server):
    """The module's server behind --api-key s3cret, 64 KiB bodies and 1 s deadlines."""
    from lora_cli.infer.serve import Scheduler, Server, ServerThread
    from lora_cli.infer.guard import Limits

    limits = Limits(max_body=64 << 10, body_timeout=1.0, header_timeout=1.0, max_rows=8)
    keyed = Server(server.backend, server.models, Scheduler(server.backend, max_batch=4), api_key="s3cret", limits=limits)
    with ServerThread(keyed) as running:
        yield running
    keyed.scheduler.close()


def test_every_route_but_health_needs_the_key(keyed):
    for path in ("/v1/models", "/openapi.json", "/docs", "/redoc", "/v1/nothing"):
        status, body, _ = _http(keyed.url + path)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", path
    assert _health(keyed)["status"] == "ok"
    request = urllib.request.Request(keyed.url + "/openapi.json", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert "/v1/chat/completions" in json.loads(response.read())["paths"]


def test_the_key_is_checked_before_the_body_is_read(keyed):
    """Headers announcing 30 MB and no body at all: the 401 comes at once (the server does not
    wait for, read or parse a byte of the body)."""
    start = time.monotonic()
    answer = _raw(keyed, _post_head("/v1/chat/completions", 30 << 20), wait=5)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"invalid_api_key" in answer and time.monotonic() - start < 3


def test_a_body_over_the_limit_is_refused_before_it_is_read(keyed):
    answer = _raw(keyed, _post_head("/v1/chat/completions", 1 << 20, key="s3cret"), wait=5)
    assert answer.startswith(b"HTTP/1.1 413") and b"65,536" in answer and b"--max-body" in answer, answer[:300]
    chunk = b"x" * 40_000  # no Content-Length: counted as it arrives
    chunked = _post_head("/v1/chat/completions", 0, key="s3cret").replace(b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n")
    answer = _raw(keyed, chunked + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3)), wait=5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    client = _client(keyed, api_key="s3cret")
    assert _chat(client, "one", PROMPTS[0]).choices[0].message.content  # under the limit: answered


def test_a_body_that_never_arrives_is_cut_off(keyed):
    answer = _raw(keyed, _post_head("/v1/chat/completions", 500, key="s3cret") + b'{"model": ', wait=10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]


def test_connections_that_never_finish_their_headers_are_closed(keyed):
    """Nothing sent, half the headers, headers trickled a byte at a time: each connection is
    closed once the header deadline (1 s here, 10 s by default) passes."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(keyed.url)
    for first, trickle in ((b"", b""), (b"GET /health HTTP/1.1\r\nHost: x\r\n", b""), (b"GET /hea", b"lth HTTP/1.1\r\n")):
        start = time.monotonic()
        with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
            conn.sendall(first)
            closed = False
            for byte in trickle * 10:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)
            if not closed:
                assert conn.recv(1024) == b"", first  # closed by the server, no answer
        assert time.monotonic() - start < 6, first
    assert _health(keyed)["status"] == "ok"


def test_bad_fields_are_400s_naming_them(running):
    def post(path: str, raw: bytes):
        return _http(running.url + path, raw)

    cases = [
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "seed": -1}', "seed"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "seed"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', "repetition_penalty"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": NaN}', "repetition_penalty"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
        ('{"model": "one", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
        ('{"model": "one", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "messages.0.content.0.text"),
        ('{"model": "o\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop.0"),
        ('{"model": "one", "messages": [{"role": "user", "content": "hi"}], "tools": [{"\\ud800": 1}]}', "tools.0.\\ud800"),
    ]
    for raw, param in cases:
        status, body, _ = post("/v1/chat/completions", raw.encode())
        assert status == 400 and body["error"]["param"] == param, (raw, body)
    status, body, _ = post("/v1/completions", b'{"model": "one", "prompt": ["fine", "\\ud83d"]}')
    assert status == 400 and body["error"]["param"] == "prompt.1", body
    status, body, _ = post("/v1/completions", b'{"model": "one", "prompt": "\\ud83d\\ude00 a pair is fine", "max_tokens": 2}')
    assert status == 200, body
    status, body, _ = post("/v1/chat/completions", b'{"model": "one", "messages": [{"role": "user", "content": "\xff\xfe"}]}')
    assert status == 400, body  # bytes that are not UTF-8


def test_prompts_too_long_by_their_characters_are_refused_before_tokenising(running, monkeypatch):
    """A 6 MB message is refused without tokenising it; a prompt that is tokenised is
    tokenised in the thread pool, never on the event loop's thread."""
    from lora_cli.infer import serve

    threads = []
    for name in ("chat_prompt_ids", "completion_prompt_ids"):
        real = getattr(serve, name)

        def spy(*args, real=real):
            threads.append(threading.current_thread())
            return real(*args)
        monkeypatch.setattr(serve, name, spy)
    client = _client(running)
    e = _error(lambda: _chat(client, "one", "word " * 1_200_000))
    assert e.status_code == 400 and e.response.json()["error"]["code"] == "context_length_exceeded"
    assert "6,000,004 characters hold more than" in e.message and e.response.json()["error"]["param"] == "messages"
    e = _error(lambda: client.completions.create(model="one", prompt=["hi", "x" * 3_000_000], max_tokens=2))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "prompt.1"
    assert threads == []  # refused before tokenising
    assert _chat(client, "one", PROMPTS[0]).choices[0].message.content
    assert client.completions.create(model="one", prompt=PROMPTS[0], max_tokens=2).choices[0].text is not None
    assert len(threads) == 2 and running.thread not in threads and threading.main_thread() not in threads


def test_rows_are_generated_at_most_max_batch_at_a_time(keyed, generated):
    """3 prompts x n=2 = 6 rows on a server with --max-batch 4: two generate calls (4 + 2),
    answers as lora generate's; more rows than a request may ask for is a 400."""
    client = _client(keyed, api_key="s3cret")
    before = _health(keyed)
    reply = client.completions.create(model="one", prompt=PROMPTS[:3], n=2, temperature=0, max_tokens=NEW)
    assert [c.text for c in reply.choices] == [a for a in generated["one"][:3] for _ in range(2)]
    after = _health(keyed)
    assert after["largest_batch"] <= 4 and after["batches"] - before["batches"] == 2
    e = _error(lambda: client.completions.create(model="one", prompt=PROMPTS[:3], n=3, max_tokens=2))
    assert e.status_code == 400 and e.response.json()["error"]["param"] == "prompt" and "at most 8" in e.message


@pytest.mark.parametrize("key, culprit", [("", "--api-key is empty"), ("clé", "visible ASCII"), ("two words", "visible ASCII")])
def test_an_api_key_no_client_can_send_is_refused_at_start(adapters, cli, key, culprit):
    res = cli("serve", "-a", f"one={adapters[0]}", "--api-key", key)
    assert res.code == 2 and culprit in res.err and "Traceback" not in res.err


def test_an_empty_lora_api_key_is_refused_not_taken_for_no_key(adapters, cli, monkeypatch):
    monkeypatch.setenv("LORA_API_KEY", "")
    res = cli("serve", "-a", f"one={adapters[0]}")
    assert res.code == 2 and "LORA_API_KEY is set but empty" in res.err
    monkeypatch.delenv("LORA_API_KEY")
    res = cli("serve", "-a", f"one={adapters[0]}", "--max-body", "lots")
    assert res.code == 2 and "--max-body 'lots' is not a size" in res.err


def test_sizes_parse():
    from lora_cli.infer.guard import parse_size

    assert [parse_size(s) for s in ("1048576", "512k", "8M", "8MiB", "1G")] == [1 << 20, 512 << 10, 8 << 20, 8 << 20, 1 << 30]
