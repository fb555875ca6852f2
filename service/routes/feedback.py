"""POST /v1/feedback (a verdict on an answer), and removing feedback views from the gallery in bulk."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query

from pipeline.feedback import REQUEST_ID
from service.auth import require_write
from service.errors import BadRequest, NotFound
from service.routes.deps import Keeper, ReadShop, State
from service.schemas import Deleted, FeedbackRecorded, FeedbackRequest

router = APIRouter(tags=["feedback"], dependencies=[Depends(require_write)])


@router.post("/v1/feedback", response_model=FeedbackRecorded)
async def feedback(body: FeedbackRequest, state: State, keeper: Keeper) -> FeedbackRecorded:
    """Say whether an answer was right: `correct` (its top-1 is the product), `wrong` (with the right
    `sku` when known) or `none_of_these` (the product is not in the gallery). Any replica takes
    feedback for any request answered within RICE_FEEDBACK_RECORD_TTL_S (404 after that); a second
    verdict on a request replaces the first. Under RICE_ENRICH the request's clip vector becomes a
    gallery view of the right SKU (`view_item_id`), at most RICE_ENRICH_MAX_VIEWS per SKU and shop."""
    if not REQUEST_ID.fullmatch(body.request_id):
        raise BadRequest("request_id must be the 32 hexadecimal digits of an answer's request_id")
    judged = await keeper.judge(body.request_id, body.verdict, body.sku, state.replica)
    fb = judged.feedback
    return FeedbackRecorded(
        request_id=fb.request_id,
        verdict=fb.verdict,
        sku=fb.sku,
        replaced=judged.replaced,
        view_item_id=judged.view_item_id,
        removed=judged.removed,
        gallery_version=judged.gallery_version,
    )


@router.delete("/v1/gallery/items", response_model=Deleted)
async def delete_views(
    state: State,
    shop_id: ReadShop,  # only this shop's views; default: every shop's (sharded: one shop's, required)
    source: Literal["feedback"] = Query(..., description="which items: feedback views (catalog images go by item or SKU)"),
    sku: str | None = Query(None, max_length=256, description="only this SKU's views; default: every SKU's"),
) -> Deleted:
    """Remove feedback views in bulk (one gallery version), e.g. after a bad batch of feedback. 404 when there are none."""
    gallery = state.replica.gallery
    if sku is not None:  # O(N) either way: off the loop
        hits = await asyncio.to_thread(gallery.views, sku, source, shop_id, shop_id is None)
    else:
        hits = (await asyncio.to_thread(gallery.list_items, None, shop_id, 0, len(gallery) or 1))[1]
    ids = [h.item_id for h in hits if h.source == source]
    if not ids:
        raise NotFound(f"no {source} views" + (f" of sku {sku!r}" if sku else "") + (f" in shop {shop_id!r}" if shop_id else ""))
    version, deleted = await state.replica.delete_items(ids)
    state.metrics.feedback_views.labels("removed").inc(len(deleted))
    return Deleted(deleted=deleted, gallery_version=version, shard=state.settings.shard)
