"""The app factory: builds every component from one Settings object and wires the routes."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from index.ann import AnnConfig
from index.records import Store
from index.redis_store import RedisStore
from index.sqlite_store import SQLiteStore
from model.checkpoint import LoadedEncoder, load_encoder
from service.app_state import AppState
from service.auth import ApiKeys
from service.batcher import Batcher
from service.decode import DecodeLimits
from service.disconnect import CancelOnDisconnect
from service.engine import EncoderEngine
from service.errors import PayloadTooLarge, error_body, install_error_handlers
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.replica import GalleryReplica
from service.routes import admin, gallery, health, recognize
from service.settings import Settings

log = logging.getLogger("rice.app")


class UploadLimit:
    """Reject bodies over the limit: by Content-Length up front, or while streaming (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + 64 * 1024  # room for multipart headers and form fields
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_json(send, 413, error_body("payload_too_large", f"upload exceeds {self.max_bytes} bytes"))
                return
        seen = 0
        too_large = False
        started = False
        message_413 = f"upload exceeds {self.max_bytes} bytes"

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
    import json

    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def open_store(settings: Settings) -> Store:
    """The gallery store the settings ask for: shared Redis when RICE_REDIS_URL is set, else embedded SQLite."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.redis_prefix, settings.redis_log_maxlen)
    return SQLiteStore(settings.gallery_path)


def build_serving(settings: Settings, loaded: LoadedEncoder, gallery_store: Store, metrics: Metrics) -> AppState:
    """Everything that depends on the served model: engine (warmed), gallery replica of that model's
    namespace, batcher and pipeline. A model switch builds a second set and swaps it in whole, so a
    request never mixes one model's embeddings with another model's gallery. Blocking (model load,
    warm-up, gallery load): run it off the event loop, then call `state.batcher.start()` on it."""
    engine = EncoderEngine(loaded, settings.device, settings.torch_threads, settings.dtype, settings.cuda_graphs)
    log.info("model %s from %s on %s (%s)", engine.model_version, engine.source, engine.device, engine.dtype)
    warm = engine.warm_up(settings.max_batch_size)
    log.info("warm-up batch of %d took %.2f s", settings.max_batch_size, warm)
    dtype = str(engine.dtype).removeprefix("torch.")
    metrics.model_info.info({"version": engine.model_version, "source": engine.source, "device": str(engine.device), "dtype": dtype})
    ann = AnnConfig(threshold=settings.ann_threshold, nprobe=settings.ann_nprobe)
    replica = GalleryReplica(gallery_store, engine.model_version, engine.dim, ann, settings.sync_wait_s)
    replica.start()  # loads the gallery; with Redis, also follows the shared stream

    def on_batch(size: int, seconds: float) -> None:
        metrics.batch_size.observe(size)
        metrics.stage_seconds.labels("encode").observe(seconds)
        metrics.encoded_frames.inc(size)

    batcher = Batcher(
        engine.encode,
        settings.max_batch_size,
        settings.max_wait_ms,
        settings.max_queue_frames,
        depth=settings.pipeline_depth,
        on_batch=on_batch,
        on_cancel=metrics.cancelled.inc,
        on_queue_wait=metrics.stage_seconds.labels("queue_wait").observe,
        on_error=metrics.batch_errors.inc,
    )
    limits = DecodeLimits(settings.max_duration_s, settings.max_frame_pixels, settings.max_decoded_frames, settings.decode_timeout_s)
    pipeline = Pipeline(
        batcher,
        replica,
        engine.config.preprocess,
        limits,
        settings.max_frame_pixels,
        settings.decode_threads,
        metrics,
        settings.max_decode_pending,
    )
    return AppState(settings, metrics, engine, batcher, replica, pipeline, time.time())


async def close_serving(state: AppState) -> None:
    """Finish queued work, then release the model's batcher, decoders and replica (not the store)."""
    await state.batcher.stop(state.settings.drain_timeout_s)
    state.pipeline.close()
    await asyncio.to_thread(state.replica.stop)  # joins the follower thread: not on the event loop


def create_app(settings: Settings | None = None, encoder: LoadedEncoder | None = None, store: Store | None = None) -> FastAPI:
    """Build the service. `encoder` and `store` let tests inject prepared components."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gallery_store = store or open_store(settings)
        app.state.rice = build_serving(settings, encoder or load_encoder(settings.checkpoint), gallery_store, metrics)
        app.state.rice.batcher.start()
        app.state.model_switch = asyncio.Lock()
        try:
            yield
        finally:
            # uvicorn has already drained in-flight HTTP requests; finish what is still queued.
            await close_serving(app.state.rice)
            if store is None:
                gallery_store.close()

    app = FastAPI(
        title="RICE livestream product recognition",
        version="0.1.0",
        lifespan=lifespan,
        description="Upload a clip of a product being shown; get the shop's matching SKUs.",
    )
    install_error_handlers(app, on_unexpected=metrics.unexpected_errors.inc)
    app.state.api_keys = ApiKeys.parse(settings.api_keys.get_secret_value())  # bad RICE_API_KEYS fails start-up

    # Added before the request counter so it sits inside it: a streamed upload going over the
    # limit then raises in the route's own body read and the error table answers 413 (outside the
    # counter's BaseHTTPMiddleware it would surface as an ExceptionGroup, i.e. a 500).
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)

    @app.middleware("http")
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

    app.add_middleware(CancelOnDisconnect, on_cancel=metrics.cancelled_requests.inc)  # outermost: cancels all below
    app.include_router(recognize.router)
    app.include_router(gallery.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    return app
