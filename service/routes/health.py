"""Liveness, readiness, metrics and service info."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.routes.deps import State

router = APIRouter(tags=["health"])

STALL_AFTER_S = 10.0  # a batcher with queued work and no finished batch for this long is stuck


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "alive"}


def readiness(state: State) -> list[str]:
    """Reasons this replica cannot serve right now (empty = ready)."""
    reasons = []
    if not state.engine.warmed:
        reasons.append("model_not_warmed")
    b = state.batcher
    if not b.alive:
        reasons.append("batcher_stopped")
    elif b.queued_frames > 0 and time.monotonic() - b.last_progress > STALL_AFTER_S:
        reasons.append("batcher_stalled")
    reasons.extend(state.replica.health())
    return reasons


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: model warmed, batcher making progress, gallery in sync. 503 with reasons otherwise."""
    state = getattr(request.app.state, "rice", None)
    if state is None:
        return JSONResponse({"ready": False, "reasons": ["starting"]}, 503)
    reasons = readiness(state)
    return JSONResponse({"ready": not reasons, "reasons": reasons}, 200 if not reasons else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    m = state.metrics
    m.queue_depth.set(state.batcher.queued_frames)
    m.gallery_items.set(len(state.replica.gallery))
    m.gallery_version.set(state.replica.gallery.version)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info")
async def info(state: State) -> dict[str, Any]:
    """What this replica serves: model, device, preprocessing, limits, gallery."""
    s, e = state.settings, state.engine
    return {
        "model_version": e.model_version,
        "model_source": e.source,
        "backbone": e.config.backbone,
        "embedding_dim": e.dim,
        "device": str(e.device),
        "dtype": str(e.dtype).removeprefix("torch."),
        "preprocess": e.config.preprocess.__dict__,
        "gallery": state.replica.stats(),
        "limits": {
            "max_upload_bytes": s.max_upload_bytes,
            "max_num_frames": s.max_num_frames,
            "max_top_k": s.max_top_k,
            "max_duration_s": s.max_duration_s,
            "max_frame_pixels": s.max_frame_pixels,
            "max_decoded_frames": s.max_decoded_frames,
            "decode_timeout_s": s.decode_timeout_s,
            "max_metadata_bytes": s.max_metadata_bytes,
            "max_queue_frames": s.max_queue_frames,
        },
        "batching": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms},
        "uptime_s": round(time.time() - state.started_at, 1),
    }
