"""Switching the served model without downtime (what `rice reindex` calls on every replica)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from index.errors import StoreUnavailable
from model.checkpoint import CheckpointError, load_encoder
from service.auth import require_admin
from service.errors import BadRequest, Conflict, NotReady
from service.state import AppState, build_serving, close_serving

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])
log = logging.getLogger("rice.admin")


class ModelSwitch(BaseModel):
    checkpoint: str | None = Field(None, description="checkpoint path on the server; null = the built-in ImageNet encoder")
    min_gallery_items: int = Field(0, ge=0, description="refuse the switch if the new model's gallery has fewer items")


@router.post("/model")
async def switch_model(body: ModelSwitch, request: Request) -> dict[str, Any]:
    """Load a checkpoint, warm it up and load its gallery namespace beside the serving model, then
    swap model and gallery together. Requests already running finish on the old pair; every answer
    comes from one model and that model's gallery. 409 while another switch runs."""
    # Not the counted State dependency: this request must not wait for itself to finish.
    state: AppState = request.app.state.rice
    lock: asyncio.Lock = request.app.state.model_switch
    if lock.locked():
        raise Conflict("a model switch is already in progress")
    async with lock:
        try:
            loaded = await asyncio.to_thread(load_encoder, body.checkpoint)
        except CheckpointError as exc:
            raise BadRequest(str(exc)) from exc
        if loaded.model_version == state.engine.model_version:
            # Already served: pick up what another process (rice reindex) wrote to this model's
            # namespace; the embedded store has no change log that would bring it here by itself.
            await asyncio.to_thread(state.replica.sync)
            items = len(state.replica.gallery)
            return {
                "model_version": loaded.model_version,
                "previous_model_version": loaded.model_version,
                "switched": False,
                "gallery_items": items,
            }
        try:
            new = await asyncio.to_thread(build_serving, state.settings, loaded, state.replica.store, state.metrics)
        except StoreUnavailable as exc:
            raise NotReady(f"gallery store unavailable; the served model is unchanged: {exc}") from exc
        except Exception as exc:  # e.g. out of device memory at warm-up: the server's problem, not the request's
            log.exception("model switch to %s failed", loaded.model_version)
            why = type(exc).__name__
            raise NotReady(f"could not bring up model {loaded.model_version} ({why}); the served model is unchanged") from exc
        new.batcher.start()
        items = len(new.replica.gallery)
        if items < body.min_gallery_items:
            await close_serving(new)
            want = body.min_gallery_items
            raise BadRequest(f"model {new.engine.model_version} has {items} gallery items, fewer than min_gallery_items={want}")
        request.app.state.rice = new  # one assignment: the next request sees the new pair
        log.info("switched model %s -> %s (%d gallery items)", state.engine.model_version, new.engine.model_version, items)
    # Retire the old model only once its last request is done: requests that started on it finish on it.
    if not await state.idle(state.settings.drain_timeout_s):
        log.warning("old model %s still busy after %.0f s; closing it", state.engine.model_version, state.settings.drain_timeout_s)
    await close_serving(state)
    previous = state.engine.model_version
    return {"model_version": new.engine.model_version, "previous_model_version": previous, "switched": True, "gallery_items": items}
