"""The app factory: builds the serving state from one Settings object and wires middleware and routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from index.blobs import open_originals
from index.feedback import FeedbackStore
from index.records import Store
from index.stores import open_feedback_store, open_job_store
from model.checkpoint import LoadedEncoder, load_encoder
from pipeline.feedback import FeedbackConfig, FeedbackKeeper
from pipeline.jobs import JobEvents, JobWorker
from service.auth import ApiKeys
from service.docs import install_offline_docs
from service.errors import install_error_handlers
from service.metrics import Metrics
from service.middleware import CancelOnDisconnect, UploadLimit, request_counter
from service.routes import admin, console, feedback, gallery, gallery_browse, health, jobs, originals, recognize, timeline
from service.serving import Serving
from service.settings import Settings
from service.state import store_for


def create_app(settings: Settings | None = None, encoder: LoadedEncoder | None = None, store: Store | None = None) -> FastAPI:
    """Build the service. `encoder` and `store` let tests inject prepared components."""
    settings = settings or Settings()
    metrics = Metrics()
    job_config = settings.job_config()

    def job_started() -> None:
        metrics.jobs_running.inc()

    def job_finished(status: str) -> None:
        metrics.jobs_running.dec()
        metrics.jobs_finished.labels(status).inc()

    job_events = JobEvents(job_started, job_finished, metrics.timeline_seconds.inc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gallery_store = store or store_for(settings)
        serving = Serving(settings, metrics, gallery_store)
        await serving.start(encoder if encoder is not None else await asyncio.to_thread(load_encoder, settings.checkpoint))
        app.state.serving = serving
        job_store = open_job_store(settings.redis_url, settings.jobs_prefix(), settings.gallery_path)
        current = lambda: (serving.current.job_timeline, serving.current.engine.model_version)  # noqa: E731  # the model serving now
        app.state.job_worker = JobWorker(job_store, current, job_config, job_events)
        app.state.job_worker.start()
        feedback_store = open_feedback_store(
            settings.redis_url, settings.redis_feedback_prefix, settings.gallery_path, settings.feedback_max_records
        )
        app.state.feedback = feedback_keeper(settings, metrics, feedback_store)
        try:
            yield
        finally:
            await app.state.job_worker.stop()  # this replica's running jobs go back to the queue
            await app.state.feedback.flush()  # records of answers already sent
            feedback_store.close()
            job_store.close()
            await serving.close()
            if store is None:
                gallery_store.close()

    app = FastAPI(
        title="RICE livestream product recognition",
        version="0.1.0",
        lifespan=lifespan,
        description="Upload a clip of a product being shown; get the shop's matching SKUs.",
        docs_url=None,  # FastAPI's own pages load their assets from a CDN: see install_offline_docs
        redoc_url=None,
    )
    install_offline_docs(app)
    install_error_handlers(app, on_unexpected=metrics.unexpected_errors.inc, on_error=lambda code: metrics.errors.labels(code).inc())
    app.state.settings = settings  # what auth and health read; unchanged by model switches
    app.state.originals = open_originals(settings.blob_dir, settings.gallery_path)  # per item, not per model: kept across switches
    app.state.metrics = metrics
    app.state.api_keys = ApiKeys.parse(settings.api_keys.get_secret_value())  # bad RICE_API_KEYS fails start-up
    if not app.state.api_keys.enabled and not settings.allow_open:
        raise ValueError(
            "RICE_API_KEYS is empty and RICE_ALLOW_OPEN is false: refusing to serve gallery writes and model "
            "switches to anyone. Set RICE_API_KEYS (e.g. 'ops-key-1234:rwa,viewer-5678:r') or RICE_ALLOW_OPEN=true."
        )

    # Added before the request counter so it sits inside it: a streamed upload going over the
    # limit then raises in the route's own body read and the error table answers 413 (outside the
    # counter's BaseHTTPMiddleware it would surface as an ExceptionGroup, i.e. a 500).
    # Bulk vector uploads and timeline jobs (recordings streamed to disk) have limits of their own.
    per_path = {"/v1/gallery/bulk": settings.max_bulk_bytes, "/v1/jobs/timeline": settings.max_job_upload_bytes}
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes, per_path=per_path)
    app.middleware("http")(request_counter(metrics))
    app.add_middleware(CancelOnDisconnect, on_cancel=metrics.cancelled_requests.inc)  # outermost: cancels all below
    app.include_router(recognize.router)
    app.include_router(timeline.router)
    app.include_router(jobs.router)
    app.include_router(gallery.router)
    app.include_router(gallery_browse.router)
    app.include_router(originals.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(feedback.router)
    console.mount(app)
    return app


def feedback_keeper(settings: Settings, metrics: Metrics, store: FeedbackStore) -> FeedbackKeeper:
    """Request records and verdicts, under the settings' limits and enrichment policy, counted."""
    config = FeedbackConfig(
        settings.feedback_record_ttl_s,
        settings.feedback_retention_days * 86400.0,
        settings.feedback_keep_frames,
        settings.enrich,
        settings.enrich_max_views,
        view=settings.enrich_view,
    )
    return FeedbackKeeper(
        store,
        config,
        on_record_error=metrics.feedback_record_errors.inc,
        on_verdict=lambda shop, verdict: metrics.feedback_verdicts.labels(shop or "none", verdict).inc(),
        on_view=lambda event: metrics.feedback_views.labels(event).inc(),
    )
