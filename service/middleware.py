"""ASGI middleware: the upload limit, the request counter, and cancelling a handler whose client left.

CancelOnDisconnect: neither uvicorn nor Starlette cancels a plain (non-streaming) handler when the
client goes away: the handler runs to the end and its answer is thrown away. For us that would mean
a clip whose viewer left still occupies decoders and encoder batches. The middleware watches the
connection once the request body has been read, and cancels the handler task on
`http.disconnect`; the cancellation reaches `Batcher.submit`, which drops the request's queued
frames. The watcher starts only after the app has read the last body chunk, so uploads keep
uvicorn's flow control (nothing is buffered here) and the app's own reads are never raced.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, error_body
from service.metrics import Metrics


class CancelOnDisconnect:
    def __init__(self, app: ASGIApp, on_cancel: Callable[[], object] | None = None) -> None:
        self.app = app
        self.on_cancel = on_cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        disconnected = asyncio.Event()
        watcher: asyncio.Task[Message] | None = None
        body_done = False

        async def watch() -> Message:
            message = await receive()  # after the last body chunk, the next message is the disconnect
            if message["type"] == "http.disconnect":
                disconnected.set()
            return message

        async def wrapped_receive() -> Message:
            nonlocal watcher, body_done
            if body_done:
                # The app asks again (e.g. Request.is_disconnected): share the watcher's answer.
                if watcher is None:
                    watcher = asyncio.create_task(watch())
                return await asyncio.shield(watcher)
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
            elif message["type"] == "http.request" and not message.get("more_body", False):
                body_done = True
                watcher = asyncio.create_task(watch())
            return message

        async def run_app() -> None:
            await self.app(scope, wrapped_receive, send)

        app_task = asyncio.create_task(run_app())
        gone = asyncio.create_task(disconnected.wait())
        try:
            await asyncio.wait({app_task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if app_task.done():
                await app_task  # its result, or its exception for the error middleware
                return
            app_task.cancel()
            if self.on_cancel is not None:
                self.on_cancel()
            try:
                await app_task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # we are being cancelled too: let it through
                    raise
        finally:
            gone.cancel()
            if watcher is not None and not watcher.done():
                watcher.cancel()
            if not app_task.done():  # we ourselves were cancelled (server shutting down)
                app_task.cancel()


class UploadLimit:
    """Reject bodies over the limit: by Content-Length up front, or while streaming (chunked).
    `per_path` gives some paths their own limit (the bulk vector import is far larger than a clip)."""

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.per_path.get(scope.get("path", ""), self.max_bytes)
        limit = max_bytes + 64 * 1024  # room for multipart headers and form fields
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_json(send, 413, error_body("payload_too_large", f"upload exceeds {max_bytes} bytes"))
                return
        seen = 0
        too_large = False
        started = False
        message_413 = f"upload exceeds {max_bytes} bytes"

        async def limited() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    raise PayloadTooLarge(message_413)
            return message

        async def guarded_send(message: Message) -> None:
            # Whatever the app answers once the body went over the limit (the form parser turns
            # the error into a 400, a route into the error table's 413), the client gets one 413.
            nonlocal started
            if too_large:
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_json(send, 413, error_body("payload_too_large", message_413))
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except PayloadTooLarge:
            if not started:
                await _send_json(send, 413, error_body("payload_too_large", message_413))


async def _send_json(send: Send, status: int, body: Mapping[str, object]) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def request_counter(metrics: Metrics) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    """HTTP middleware counting requests by route template, method and status, and their latency."""

    async def count_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t = time.perf_counter()
        status = "500"  # an exception escaping call_next becomes the generic 500 outside
        metrics.inflight.inc()
        try:
            response = await call_next(request)
            status = str(response.status_code)
            return response
        finally:
            metrics.inflight.dec()
            path = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(path, request.method, status).inc()
            metrics.request_seconds.labels(path).observe(time.perf_counter() - t)

    return count_requests
