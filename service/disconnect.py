"""Cancel a request's handler when its client disconnects.

Neither uvicorn nor Starlette cancels a plain (non-streaming) handler when the client goes away:
the handler runs to the end and its answer is thrown away. For us that would mean a clip whose
viewer left still occupies decode threads and encoder batches. This ASGI middleware watches the
connection once the request body has been read, and cancels the handler task on
`http.disconnect`; the cancellation reaches `Batcher.submit`, which drops the request's queued
frames.

The watcher starts only after the app has read the last body chunk, so uploads keep uvicorn's
flow control (nothing is buffered here) and the app's own reads are never raced.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
