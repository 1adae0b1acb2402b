"""What keeps `lora serve` standing on an open network: the API key and the body limits,
checked in front of the app (before FastAPI reads a byte of the body), and a deadline on
connections that never finish their request headers.

The app (serve.py) is wrapped in `Guard`, a plain ASGI middleware: every path but the bare
health check needs the key (the OpenAPI schema too); a body over the limit is refused from its
Content-Length, or as soon as its chunks pass the limit, and a body that trickles in slower
than the deadline is cut off. uvicorn arms its keep-alive timer only after a response, so a
connection that sends half its headers, or nothing, would be held forever: `header_deadline`
gives uvicorn's own h11 protocol a timer from the moment a connection opens until its request
line and headers are in.

Nothing here imports torch; uvicorn only inside `header_deadline`."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from lora_cli.errors import LoraError

OPEN_PATHS = frozenset({"/health"})  # answered without the key: load balancers probe it


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Limits:
    """What one client may cost the server, besides the queue (--max-queue) and the rows
    of one generate call (--max-batch)."""
    max_body: int = 8 << 20        # bytes of one request body (--max-body)
    body_timeout: float = 60.0     # seconds to send the whole body once the headers are in
    header_timeout: float = 10.0   # seconds from connecting to the end of the request headers
    max_rows: int = 1024           # prompts x n of one request (each row is one answer)


def parse_size(text: str, flag: str = "--max-body") -> int:
    """'8M', '512k', '1048576' (bytes; k/M/G are 1024-based) as a positive number of bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)i?[bB]?\s*", text or "")
    if not m or int(m.group(1)) < 1:
        raise LoraError(f"{flag} {text!r} is not a size", f"give bytes, or a number with k, M or G: {flag} 8M")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def check_api_key(key: str | None, env_value: str | None = None) -> str | None:
    """The --api-key (or LORA_API_KEY) as the server will require it, refused at start when no
    client could ever send it: empty (which would also read as 'no key' in some places), or
    not visible ASCII (HTTP clients refuse other characters in a header, and spaces are cut)."""
    if key is None and env_value == "":
        raise LoraError("LORA_API_KEY is set but empty, so the server would run without a key",
                        "set LORA_API_KEY to the key, or unset it to serve without one")
    if key is None:
        return None
    if not key:
        raise LoraError("--api-key is empty", "give a key of visible ASCII characters, e.g. --api-key $(openssl rand -hex 24)")
    bad = next((c for c in key if not "!" <= c <= "~"), None)
    if bad is not None:
        raise LoraError(f"--api-key holds {bad!r}: a key must be visible ASCII (letters, digits, punctuation; no spaces)",
                        "HTTP clients cannot send other characters in a header; e.g. --api-key $(openssl rand -hex 24)")
    return key


def key_matches(authorization: str | None, key: str) -> bool:
    """An `Authorization: Bearer KEY` header holding exactly `key` (compared in constant time)."""
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


# --------------------------------------------------------------------------- the middleware

Refusal = Callable[..., Callable]  # (status, message, code=, headers=) -> an ASGI response


class Guard:
    """ASGI middleware in front of the app: key, then body size and pace, then the app, which
    reads the body from what was already received."""

    def __init__(self, app, *, api_key: str | None, limits: Limits, refuse: Refusal):
        self.app, self.api_key, self.limits, self.refuse = app, api_key, limits, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS \
                and not key_matches(headers.get("authorization"), self.api_key):
            refusal = self.refuse(401, "Missing or incorrect API key: send 'Authorization: Bearer KEY' with the "
                                       "server's --api-key", code="invalid_api_key")
            return await refusal(scope, receive, send)
        body = await self._read_body(headers, receive)
        if not isinstance(body, bytes):  # a refusal
            return await body(scope, receive, send)
        return await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, headers: dict, receive):
        """The whole body, or the refusal to send: over max_body (from Content-Length before
        reading, or while reading), or not in within body_timeout."""
        limit = self.limits.max_body
        declared = headers.get("content-length", "")
        if declared.strip().isdigit() and int(declared) > limit:
            return self._too_large(int(declared))
        chunks, size = [], 0
        deadline = time.monotonic() + self.limits.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return self.refuse(408, f"The request body did not arrive within {self.limits.body_timeout:g} s",
                                   code="request_timeout")
            if message["type"] == "http.disconnect":
                return b"".join(chunks)  # the app sees the disconnect on its next receive
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, declared: int | None):
        said = f" ({declared:,} bytes)" if declared is not None else ""
        return self.refuse(413, f"The request body{said} is over this server's limit of {self.limits.max_body:,} bytes "
                                "(lora serve --max-body)", code="body_too_large")


def _replay(body: bytes, receive) -> Callable[[], Awaitable[dict]]:
    """A receive that hands the app the body already read, then listens to the client
    (for http.disconnect) as the original receive does."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


# --------------------------------------------------------------------------- connections

def header_deadline(seconds: float):
    """uvicorn's h11 protocol with a deadline on request headers: a connection is closed when
    `seconds` pass after it opened, or after its last response, without a complete request
    line and headers (a client that sends nothing, or trickles its headers byte by byte).
    Pass it as uvicorn's `http=` protocol class."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            self._disarm_header_deadline()
            waiting_for = self.cycle  # a new request replaces the cycle once its headers are in
            self._header_timer = self.loop.call_later(seconds, self._header_deadline_passed, waiting_for)

        def _disarm_header_deadline(self) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
                self._header_timer = None

        def _header_deadline_passed(self, waiting_for) -> None:
            self._header_timer = None
            no_new_request = self.cycle is waiting_for and (waiting_for is None or waiting_for.response_complete)
            if no_new_request and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11
