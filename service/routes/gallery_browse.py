"""Browsing the gallery: a page of items by SKU and shop, and each item's catalog thumbnail."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Response

from service.auth import require_read
from service.errors import NotFound
from service.routes.deps import ReadShop, State
from service.schemas import GalleryItem, GalleryPage

router = APIRouter(prefix="/v1/gallery", tags=["gallery"], dependencies=[Depends(require_read)])


@router.get("/items", response_model=GalleryPage)
async def list_items(
    state: State,
    shop_id: ReadShop,
    sku: str | None = Query(None, max_length=256, description="only SKUs containing this text (case-insensitive)"),
    offset: int = Query(0, ge=0, description="items to skip"),
    limit: int = Query(50, ge=1, le=500, description="items per page"),
) -> GalleryPage:
    """A page of the served model's gallery, in SKU then item id order, with the number of matches."""
    replica = state.replica
    gallery = replica.gallery  # one gallery for the whole answer, even if a resync swaps it meanwhile
    total, hits = await asyncio.to_thread(gallery.list_items, sku, shop_id, offset, limit)  # O(N): off the loop
    items = [GalleryItem(item_id=h.item_id, sku=h.sku, shop_id=h.shop_id, metadata=h.metadata, source=h.source) for h in hits]
    return GalleryPage(total=total, offset=offset, limit=limit, items=items, gallery_version=gallery.version, namespace=replica.namespace)


@router.get(
    "/items/{item_id:path}/thumbnail",  # :path: an id may hold "/" (ID_PATTERN)
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the item's catalog thumbnail"}},
)
async def thumbnail(item_id: str, state: State, shop_id: ReadShop) -> Response:
    """The small JPEG made from the item's catalog image when it was added (404 when there is none)."""
    data = await asyncio.to_thread(state.replica.thumbnail, item_id)
    if data is None:
        raise NotFound(f"no thumbnail for item {item_id!r}")
    # Item ids can be re-used for a new image: let browsers keep it briefly, then revalidate.
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})
