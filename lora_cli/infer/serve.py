"""`lora serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over an inference backend.

One base is loaded once with every adapter on it; a request's `model` names the adapter, or
`base` for the base with adapters off. Prompts are rendered by that adapter's training template
through template.prompt_ids, the path `lora generate` takes, so a greedy answer here equals
`lora generate`'s token for token.

Concurrency: requests wait in a bounded queue (full -> 429 with Retry-After). One worker thread
takes the oldest request together with every waiting request that can share its batch (same
variant, same sampling) and answers them in left-padded generate calls of at most --max-batch
rows, streaming each row's text back to its client as it grows. A client that goes away sets its request's cancel
event and the row stops at the next token; a request that fails gets a 500 and the worker goes on.

On an open network (serve_guard.py): the key and the body limits are checked in front of the
app, before the body is read; a prompt too long for the context by its characters alone is
refused before it is tokenised, and tokenising runs in the thread pool, never on the event loop.

FastAPI is the optional `serve` extra: this module is imported only by `lora serve`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_cli.infer.engines import backend_class, Completion, GenerationRequest
from lora_cli.errors import LoraError
from lora_cli.infer.generate import BASE, build_prompt_ids
from lora_cli.infer.settings import GenerationSettings, repetition_penalty_problem
from lora_cli.files.inputs import lone_surrogate_at, printable
from lora_cli.recipe.schema import SEED_MAX
from lora_cli.infer.guard import Guard, Limits, header_deadline
from lora_cli.data.template import prompt_ids
from lora_cli.data.token_budget import chars_for
from lora_cli.data.formats import chat_message, parse_tools
from lora_cli.model.adapter_folder import refuse_unless

DEFAULT_MAX_TOKENS = 128  # `lora generate`'s default; clipped to what the context leaves
MAX_STOPS = 16  # stop sequences per request (OpenAI allows 4): each is searched for after every token
RETRY_AFTER_S = 1


# --------------------------------------------------------------------------- what is served

@dataclass(frozen=True)
class ServedModel:
    id: str              # what a request's `model` says
    adapter: str | None  # None: the base, adapters off
    template: object     # the TemplateSpec (or name) its prompts are rendered with
    root: str            # the adapter folder, or the base model


def served_models(infos: dict, base_template, base_name: str) -> dict[str, ServedModel]:
    """Every adapter by its name, and the base as `base` (rendered like `lora generate --base-only`)."""
    if BASE in infos:
        raise LoraError(f"--adapter: the name {BASE!r} is taken by the base model", "give that adapter another NAME=DIR")
    models = {name: ServedModel(name, name, info.template, str(info.path)) for name, info in infos.items()}
    models[BASE] = ServedModel(BASE, None, base_template, base_name)
    return models


# --------------------------------------------------------------------------- the queue and its worker

class QueueFull(Exception):
    pass


@dataclass
class Job:
    """One HTTP request: its rows (n choices, or several prompts) answered together."""
    requests: list[GenerationRequest]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel.set()

    @property
    def cancelled(self) -> bool:
        return all(r.cancel.is_set() for r in self.requests)

    def finish(self, result) -> None:
        """Hand the outcome (completions or an exception) back to the event loop."""
        def settle():
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class Scheduler:
    """Bounded queue + one worker thread that batches compatible requests."""

    def __init__(self, backend, *, max_batch: int = 16, max_queue: int = 64):
        self.backend = backend
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.stats = {"served": 0, "cancelled": 0, "failed": 0, "batches": 0, "largest_batch": 0}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="lora-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self.pending) + len(self.running) >= self.max_queue:
                raise QueueFull
            self.pending.append(job)
            self._cond.notify()

    def load(self) -> dict:
        with self._cond:
            return {"queued": len(self.pending), "running": len(self.running), "max_queue": self.max_queue,
                    **self.stats}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and every waiting job that can share its generate call."""
        with self._cond:
            while not self.pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self.pending[0].requests[0].batch_key()
            batch, rows = [], 0
            for job in list(self.pending):
                if job.requests[0].batch_key() == key and (not batch or rows + len(job.requests) <= self.max_batch):
                    batch.append(job)
                    rows += len(job.requests)
                    self.pending.remove(job)
            self.running = batch
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [job for job in batch if not job.cancelled]  # the others left before their turn
            rows = [r for job in live for r in job.requests]
            outcome = {"cancelled": len(batch) - len(live), "served": 0, "failed": 0}
            try:
                completions = self._generate(rows)
            except Exception as e:  # one bad batch must not stop the server: its clients get a 500
                for job in live:
                    job.finish(e)
                outcome["failed"] = len(live)
            else:
                for job in live:
                    mine, completions = completions[:len(job.requests)], completions[len(job.requests):]
                    job.finish(mine)
                    stopped = any(c.finish_reason == "cancelled" for c in mine)
                    outcome["cancelled" if stopped else "served"] += 1
            self._done(outcome)

    def _generate(self, rows: list[GenerationRequest]) -> list[Completion]:
        """Every row answered in generate calls of at most max_batch rows, however many rows one
        request brought (prompts x n); rows cancelled before their call are not generated."""
        completions = []
        for start in range(0, len(rows), self.max_batch):
            call = rows[start:start + self.max_batch]
            if all(r.cancel.is_set() for r in call):
                completions += [Completion("", [], len(r.prompt_ids), "cancelled") for r in call]
                continue
            completions += self.backend.generate(call)
            with self._cond:
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(call))
        return completions

    def _done(self, outcome: dict) -> None:
        with self._cond:
            self.running = []
            for key, count in outcome.items():
                self.stats[key] += count
            self._cond.notify_all()


# --------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    # extra: clients send fields this server has no use for; allow_inf_nan: Python's JSON
    # reader takes NaN and Infinity, which no setting may be
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy, as `lora generate`")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    repetition_penalty: float = 1.0  # not OpenAI's; vLLM takes it as an extra field too

    @field_validator("repetition_penalty")
    @classmethod
    def _penalty_in_range(cls, value):
        if problem := repetition_penalty_problem(value):  # 5e-324 made sampling's logits inf: a 500
            raise ValueError(problem)
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOPS:  # 100,000 stops made every token cost seconds
            raise ValueError(f"at most {MAX_STOPS} stop sequences, got {len(value):,}")
        return value

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)

    def wants_usage_chunk(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant turn that only calls tools
    tool_calls: list[dict] | None = None         # an assistant's calls, in OpenAI's shape

    def as_turn(self) -> dict:
        """The turn as a data row holds it, for formats.chat_message to check and normalise
        (the one reader of OpenAI messages, training's and serving's)."""
        turn = {"role": self.role, "content": self.content}
        if isinstance(self.content, list):
            turn["content"] = [p.model_dump() for p in self.content]
        if self.tool_calls is not None:
            turn["tool_calls"] = self.tool_calls
        return turn


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict] | None = None  # function schemas, rendered as training rendered a row's tools
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str]


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        message, param = printable(message), None if param is None else printable(param)  # JSON out must be UTF-8
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self):
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(exc) -> ApiError:
    """FastAPI's body errors as one 400 naming the first bad field (e.g. messages.0.role)."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
                        code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first.get('msg', 'invalid value')}", param=param, code="invalid_value")


# --------------------------------------------------------------------------- the app

@dataclass
class Server:
    """What the endpoints share: the backend, what it serves, the queue, the key, the limits."""
    backend: object
    models: dict[str, ServedModel]
    scheduler: Scheduler
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    created: int = field(default_factory=lambda: int(time.time()))

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            raise ApiError(404, f"The model {name!r} does not exist; served: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def refuse_overlong(self, chars: int, param: str) -> None:
        """A prompt whose characters alone hold more tokens than the context (token_budget):
        refused before anything tokenises it."""
        limit = self.backend.context_length
        if chars > chars_for(self.backend.tokenizer, limit):
            raise ApiError(400, f"This model's maximum context length is {limit} tokens, and the prompt's "
                                f"{chars:,} characters hold more than that; shorten it", param=param,
                           code="context_length_exceeded")

    def refuse_too_many_rows(self, prompts: int, n: int) -> None:
        if prompts * n > self.limits.max_rows:
            raise ApiError(400, f"{prompts} prompts x n={n} asks for {prompts * n} answers; one request may ask "
                                f"for at most {self.limits.max_rows}", param="prompt" if prompts > 1 else "n")

    def rows(self, body: _Body, prompts: list[list[int]], served: ServedModel) -> list[GenerationRequest]:
        """n rows per prompt, with the settings and stop strings the body asks for."""
        limit = self.backend.context_length
        rows = []
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        for ids in prompts:
            room = limit - len(ids)
            if room < 1:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens, and the prompt alone "
                                    f"is {len(ids)} tokens; shorten it", param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded")
            if asked is not None and len(ids) + asked > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens; you requested "
                                    f"{len(ids) + asked} ({len(ids)} in the prompt, {asked} for the completion); "
                                    "lower max_tokens or shorten the prompt", param="max_tokens",
                               code="context_length_exceeded")
            try:
                settings = GenerationSettings(max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, room),
                                              temperature=body.temperature, top_p=body.top_p,
                                              repetition_penalty=body.repetition_penalty, seed=body.seed)
            except LoraError as e:  # the body's own bounds should have caught it: still the client's 400
                raise ApiError(400, e.message) from None
            rows += [GenerationRequest(ids, settings, served.adapter, stop=body.stops()) for _ in range(body.n)]
        return rows


def chat_prompt_ids(tokenizer, served: ServedModel, body: ChatBody) -> list[int]:
    """The request's conversation read by the data reader (tool calls, tool results, text
    parts) and rendered by the adapter's training template, tools included."""

    messages = body.messages
    if messages[-1].role not in ("user", "tool"):
        raise ApiError(400, "messages: the last message must be the user's or a tool result (the model answers it)",
                       param=f"messages.{len(messages) - 1}.role")
    turns = [_read(chat_message, m.as_turn(), f"messages.{i}") for i, m in enumerate(messages)]
    tools = _read(parse_tools, body.tools, "tools")
    try:
        return prompt_ids(tokenizer, served.template, turns, tools or None)
    except LoraError as e:
        raise ApiError(400, f"messages: {e.message}", param="messages") from None


def _read(reader, value, param: str):
    """reader(value, param) from formats (the data reader), its refusal as a 400 naming `param`."""
    try:
        return reader(value, param)
    except LoraError as e:
        raise ApiError(400, e.message + (f" ({e.hint})" if e.hint else ""), param=param) from None


def refuse_surrogates_in_body(body: BaseModel) -> None:
    """A JSON string may escape half of a UTF-16 pair (\\ud800) that no text can hold; the
    tokenizer and the JSON writer would fail on it with a 500. A 400 naming the field instead."""
    where = lone_surrogate_at(body.model_dump(exclude_unset=True))
    if where is not None:
        raise ApiError(400, f"{where}: holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                            "which is not text; send valid Unicode", param=where, code="invalid_value")


def chat_chars(body: ChatBody) -> int:
    """Characters of the text a chat request's prompt renders: every string in its messages,
    and its tools as the JSON the template writes."""
    def strings(value) -> int:
        if isinstance(value, str):
            return len(value)
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return sum(strings(v) for v in items)
    tools = len(json.dumps(body.tools, ensure_ascii=False)) if body.tools else 0
    return strings([m.as_turn() for m in body.messages]) + tools


def completion_prompt_ids(tokenizer, served: ServedModel, prompt: str) -> list[int]:
    """A completion prompt is an instruction, rendered by the template as `lora generate` does."""

    return build_prompt_ids(tokenizer, served.template, prompt)


def create_app(server: Server):
    """The FastAPI app behind its Guard (key, body size and pace: serve_guard.py)."""
    app = FastAPI(title="lora serve", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, exc):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc):
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def crash(_, exc):  # anything unforeseen: a 500 for this request, the server stays up
        return ApiError(500, f"internal error: {exc}", kind="server_error").response()

    @app.get("/health")  # the one route without the key (serve_guard.OPEN_PATHS)
    async def health():
        return {"status": "ok", **server.scheduler.load()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.id, "object": "model", "created": server.created, "owned_by": "lora", "root": m.root,
             "parent": None if m.adapter is None else BASE} for m in server.models.values()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        refuse_surrogates_in_body(body)
        served = server.model(body.model)
        server.refuse_overlong(chat_chars(body), "messages")
        ids = await run_in_threadpool(chat_prompt_ids, server.backend.tokenizer, served, body)
        return await _answer(server, request, body, served, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        refuse_surrogates_in_body(body)
        served = server.model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give at least one prompt", param="prompt")
        server.refuse_too_many_rows(len(prompts), body.n)
        for i, p in enumerate(prompts):
            server.refuse_overlong(len(p), "prompt" if isinstance(body.prompt, str) else f"prompt.{i}")
        tokenizer = server.backend.tokenizer
        ids = await run_in_threadpool(lambda: [completion_prompt_ids(tokenizer, served, p) for p in prompts])
        return await _answer(server, request, body, served, ids, chat=False)

    def refuse(status: int, message: str, **kwargs):
        return ApiError(status, message, **kwargs).response()

    return Guard(app, api_key=server.api_key, limits=server.limits, refuse=refuse)


async def _answer(server: Server, request, body: _Body, served: ServedModel, prompts: list[list[int]], *, chat: bool):
    rows = server.rows(body, prompts, served)
    loop = asyncio.get_running_loop()
    job = Job(rows, loop, loop.create_future())
    pieces: asyncio.Queue | None = None
    if body.stream:
        pieces = asyncio.Queue()
        for index, row in enumerate(rows):
            row.on_text = lambda text, i=index: loop.call_soon_threadsafe(pieces.put_nowait, (i, text))
    try:
        server.scheduler.submit(job)
    except QueueFull:
        raise ApiError(429, f"The server is busy ({server.scheduler.max_queue} requests queued or running); retry shortly",
                       kind="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    reply = Reply(body, served, prompts, chat)
    if pieces is not None:
        return StreamingResponse(_stream(job, pieces, reply, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        completions = await _wait(job, request)
    except (LoraError, ValueError) as e:  # settings the engine refused
        raise ApiError(400, str(e)) from None
    except Exception as e:  # the generation failed (out of memory, ...): this request's 500, not the server's end
        raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error") from None
    return reply.whole(completions)


async def _wait(job: Job, request):
    """The job's completions; if the client leaves first, its rows are cancelled."""
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=0.25)
            if done:
                return job.future.result()
            if await request.is_disconnected():
                job.cancel()
                return []
    except asyncio.CancelledError:
        job.cancel()
        raise


async def _stream(job: Job, pieces: asyncio.Queue, reply: "Reply", request):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Leaving the
    generator early (the client went away) cancels the job in `finally`."""
    try:
        yield reply.sse(reply.first_chunks())
        while True:
            getter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({getter, job.future}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                index, text = getter.result()
                yield reply.sse([reply.piece(index, text)])
                continue
            getter.cancel()
            if job.future in done:
                break
            if await request.is_disconnected():
                return
        while not pieces.empty():  # text produced just before the job finished
            index, text = pieces.get_nowait()
            yield reply.sse([reply.piece(index, text)])
        try:
            completions = job.future.result()
        except Exception as e:  # headers are sent: report the failure as an error event
            yield f"data: {json.dumps({'error': {'message': f'internal error: {e}', 'type': 'server_error'}})}\n\n"
            return
        yield reply.sse(reply.last_chunks(completions))
        yield "data: [DONE]\n\n"
    finally:
        if not job.future.done():
            job.cancel()


class Reply:
    """Response bodies and stream chunks in OpenAI's shapes, for chat and text completions."""

    def __init__(self, body: _Body, served: ServedModel, prompts: list[list[int]], chat: bool):
        self.body, self.served, self.prompts, self.chat = body, served, prompts, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, completions: list[Completion]) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(len(c.token_ids) for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.served.id}

    def whole(self, completions: list[Completion]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                        "logprobs": None} for i, c in enumerate(completions)]
        else:
            choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                       for i, c in enumerate(completions)]
        return {**self._head(self.object), "choices": choices, "usage": self.usage(completions)}

    def _chunk(self, choices: list[dict]) -> dict:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}

    def first_chunks(self) -> list[dict]:
        if not self.chat:
            return []
        rows = len(self.prompts) * self.body.n
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}]) for i in range(rows)]

    def piece(self, index: int, text: str) -> dict:
        if self.chat:
            return self._chunk([{"index": index, "delta": {"content": text}, "finish_reason": None, "logprobs": None}])
        return self._chunk([{"index": index, "text": text, "finish_reason": None, "logprobs": None}])

    def last_chunks(self, completions: list[Completion]) -> list[dict]:
        if self.chat:
            chunks = [self._chunk([{"index": i, "delta": {}, "finish_reason": c.finish_reason, "logprobs": None}])
                      for i, c in enumerate(completions)]
        else:
            chunks = [self._chunk([{"index": i, "text": "", "finish_reason": c.finish_reason, "logprobs": None}])
                      for i, c in enumerate(completions)]
        if self.body.wants_usage_chunk():
            chunks.append({**self._chunk([]), "usage": self.usage(completions)})
        return chunks

    @staticmethod
    def sse(chunks: list[dict]) -> str:
        return "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks)


# --------------------------------------------------------------------------- running it

def build_server(adapters: dict, *, base: str | None = None, api_key: str | None = None,
                 engine: str = "transformers", max_batch: int = 16, max_queue: int = 64,
                 limits: Limits = Limits(), trust_remote_code: bool = False) -> Server:
    """Load base + adapters once through the backend `engine` and wire up what the app serves."""

    refuse_unless("generates", adapters, "lora serve", "label rows with lora predict --adapter {adapter} --file ROWS.jsonl --out preds.jsonl")
    backend, infos = backend_class(engine).load(adapters, base=base, trust_remote_code=trust_remote_code)
    base_template = next((i.template for i in infos.values()), "human_assistant")
    base_name = base or next((i.base for i in infos.values()), BASE)
    return Server(backend, served_models(infos, base_template, base_name),
                  Scheduler(backend, max_batch=max_batch, max_queue=max_queue), api_key, limits)


def curl_line(url: str, model: str, api_key: bool) -> str:
    auth = ' -H "Authorization: Bearer $LORA_API_KEY"' if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]})
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def startup_lines(server: Server, host: str, port: int) -> list[str]:
    url = f"http://{host}:{port}"
    where = ("local connections only (--host 0.0.0.0 listens on every interface)" if host in ("127.0.0.1", "localhost")
             else f"listening on {host}: reachable from other machines")
    first = next((m for m in server.models.values() if m.adapter is not None), server.models[BASE])
    return [f"serving {', '.join(server.models)} at {url}/v1 ({where})",
            f"auth: {'Bearer key required' if server.api_key else 'none (--api-key KEY, or LORA_API_KEY, requires one)'}",
            f"try:  {curl_line(url, first.id, bool(server.api_key))}"]


class ServerThread:
    """The real app on uvicorn in a background thread, on a free port of `host` unless told:
    what tests and the benchmark start, the same app `lora serve` runs in the foreground."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        # proto IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only for
        # sockets that say they are TCP, and with Nagle on every response waited for the client's
        # delayed ACK: 40 ms a request on localhost (uvicorn's own bind, `lora serve`, says so).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(server), log_level="warning", lifespan="off", **uvicorn_settings(server))
        self.uvicorn = uvicorn.Server(config)
        self.server = server
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def uvicorn_settings(server: Server) -> dict:
    """What uvicorn is told beyond host and port, the same for `lora serve` and ServerThread."""
    return {"http": header_deadline(server.limits.header_timeout),
            "timeout_keep_alive": 5}  # an idle connection after its response (uvicorn's default, said here)
    # request line + headers are bounded by h11's own 16 KiB (uvicorn's h11_max_incomplete_event_size)


def run_server(server: Server, host: str, port: int, log=print) -> None:
    """Serve in the foreground until Ctrl-C."""
    import uvicorn

    for line in startup_lines(server, host, port):
        log(line)
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level="warning", **uvicorn_settings(server))
    finally:
        server.scheduler.close()
