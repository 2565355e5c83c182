"""The ASGI middleware in front of every route: API key, concurrency limit, body size, metrics.

It runs before FastAPI parses anything, so a request over a limit costs no more than its headers
(a Content-Length over the limit is refused unread; a chunked body is counted as it arrives and
refused at the limit). Its refusals use the service's one error shape.
"""
from __future__ import annotations

import hmac
import json
import time

from vlmkit.serve.errors import error_body
from vlmkit.serve.metrics import Metrics
from vlmkit.serve.settings import Settings


def _protected(path: str) -> bool:
    """Paths that need the API key when one is set (the page, /docs and /healthz stay open)."""
    return path.startswith("/v1/") or path == "/metrics"


class Guard:
    """Pure ASGI middleware: refuses what breaks a limit, counts everything it lets through."""

    def __init__(self, app, settings: Settings, metrics: Metrics, endpoints: set[str]) -> None:
        self.app, self.settings, self.metrics, self.endpoints = app, settings, metrics, endpoints
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        started, status = time.perf_counter(), [500]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            label = path if path in self.endpoints else ("/v1/indexes/image" if path.startswith("/v1/indexes/") else "other")
            self.metrics.observe_request(label, status[0], time.perf_counter() - started)

    async def _guarded(self, scope, receive, send, path: str) -> None:
        if self.settings.api_key and _protected(path) and not self._authorised(scope):
            await _reply(send, 401, "unauthorized", "this server needs an API key: send 'Authorization: Bearer KEY' "
                                                    "or 'X-API-Key: KEY'", {"www-authenticate": "Bearer"})
            return
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.settings.max_concurrency:
            await _reply(send, 429, "too_many_requests", f"the server already holds {self.settings.max_concurrency} requests; "
                                                         f"retry shortly", {"retry-after": "1"})
            return
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is None:
                return  # refused (or the client left); the answer is sent
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    def _authorised(self, scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        # Constant time: how much of a guess matches must not show in the response time.
        return hmac.compare_digest(given, self.settings.api_key.encode())

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole body, or None after answering 413 when it is over the limit."""
        limit = self.settings.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, "body_too_large", f"the request body of {int(declared)} bytes is over the limit of {limit}; "
                                                      f"send less (smaller or fewer images)", {"connection": "close"})
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, 413, "body_too_large", f"the request body is over the limit of {limit} bytes; send less",
                             {"connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives the buffered body once, then waits on the client (for disconnects)."""
    sent = [False]

    async def replayed():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _reply(send, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(type, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(key.encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
