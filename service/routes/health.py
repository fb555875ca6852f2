"""Liveness, readiness, metrics and service info."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import NotReady
from service.routes.deps import State, current_state

router = APIRouter(tags=["health"])


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process is up and its event loop answers. Checks no dependency: restarting would not fix one."""
    return {"status": "alive"}


def readiness(state: State) -> list[str]:
    """Machine-readable reasons this replica cannot serve right now (empty = ready).

    batcher_stalled: the batcher has had queued or running work for `stall_after_s` without
    finishing a batch (a wedged encoder or device); it clears by itself once batches finish.
    """
    reasons = []
    if not state.engine.warmed:
        reasons.append("model_not_warmed")
    b = state.batcher
    if not b.alive:
        reasons.append("batcher_stopped")
    elif b.stalled_for() > state.settings.stall_after_s:
        reasons.append("batcher_stalled")
    reasons.extend(state.replica.health())
    return reasons


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready to serve: model warmed, batcher making progress, gallery in sync. 503 with reasons otherwise."""
    try:
        state = current_state(request)
    except NotReady:
        return JSONResponse({"ready": False, "reasons": ["starting"]}, 503)
    reasons = await asyncio.to_thread(readiness, state)  # the store check may do I/O
    state.metrics.ready.set(0 if reasons else 1)
    return JSONResponse({"ready": not reasons, "reasons": reasons}, 200 if not reasons else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """Prometheus metrics."""
    m = state.metrics
    m.queue_depth.set(state.batcher.queued_frames)
    m.decode_pending.set(state.pipeline.decode_pending)
    m.batcher_stalled_seconds.set(state.batcher.stalled_for())
    m.ready.set(0 if await asyncio.to_thread(readiness, state) else 1)
    m.gallery_items.set(len(state.replica.gallery))
    m.gallery_version.set(state.replica.gallery.version)
    m.gallery_lag.set(state.replica.lag_seconds())
    others = await asyncio.to_thread(state.replica.other_namespaces)  # asks the store only while the gallery is empty
    m.other_namespace_items.set(sum(others.values()))
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info")
async def info(state: State) -> dict[str, Any]:
    """What this replica serves: model, device, preprocessing, limits, gallery."""
    s, e = state.settings, state.engine
    gallery = await asyncio.to_thread(state.replica.stats)
    others = await asyncio.to_thread(state.replica.other_namespaces)
    # Not a readiness failure: an empty gallery is also how every new deployment starts, and an
    # unready replica would be taken out of the load balancer that ingest and reindex go through.
    gallery["other_namespaces"] = others
    gallery["warning"] = state.replica.namespace_warning(others)
    return {
        "model_version": e.model_version,
        "model_source": e.source,
        "backbone": e.config.backbone,
        "embedding_dim": e.dim,
        "device": str(e.device),
        "dtype": str(e.dtype).removeprefix("torch."),
        "preprocess": e.config.preprocess.__dict__,
        "gallery": gallery,
        "shards": s.shards,  # shop-sharded replica groups (1 = unsharded)
        "shard": s.shard,  # the one whose shops this replica holds
        "match_threshold": state.pipeline.match_threshold,
        "match_threshold_calibrated": state.calibration_warning is None,  # by RICE_MATCH_THRESHOLD or the checkpoint
        "calibration_warning": state.calibration_warning,
        "match_probability": state.pipeline.config.match_probability,  # the verdict's threshold (RICE_MATCH_PROBABILITY)
        "verify": s.verify,
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
            "max_decode_pending": s.max_decode_pending,
        },
        "batching": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "pipeline_depth": s.pipeline_depth},
        "auth": {"keys_configured": bool(s.api_keys.get_secret_value().strip()), "read_requires_key": s.read_requires_key},
        "uptime_s": round(time.time() - state.started_at, 1),
    }
