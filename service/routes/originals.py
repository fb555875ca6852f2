"""Items' original images (index/blobs.py): kept on every add, removed with the item, readable by
GET /v1/gallery/items/{item_id}/original (what `rice gallery export --originals` fetches)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request, Response

from index.blobs import Blobs
from pipeline.originals import original_jpeg
from service.auth import require_write
from service.errors import NotFound

router = APIRouter(prefix="/v1/gallery", tags=["gallery"])


def _originals(request: Request) -> Blobs | None:
    blobs: Blobs | None = getattr(request.app.state, "originals", None)
    return blobs


async def keep_original(request: Request, item_id: str, upload: bytes) -> None:
    """Store the bounded re-encoded original of an upload the pipeline has already decoded."""
    blobs = _originals(request)
    if blobs is None:
        return
    jpeg = await asyncio.to_thread(original_jpeg, upload)
    if jpeg is not None:  # a format only the decode workers read: the item keeps its thumbnail alone
        await asyncio.to_thread(blobs.put, item_id, jpeg)


async def forget_originals(request: Request, item_ids: list[str]) -> None:
    """Deletes act on every namespace, so a deleted item's original has no other user."""
    blobs = _originals(request)
    if blobs is not None and item_ids:
        await asyncio.to_thread(blobs.delete, item_ids)


@router.get(
    "/items/{item_id}/original",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the item's original image (long side at most 1024)"}},
    dependencies=[Depends(require_write)],
)
async def original(item_id: str, request: Request) -> Response:
    """The item's kept original image (a JPEG, long side at most 1024); 404 when none is kept.
    Needs the write right, like the export it is part of."""
    blobs = _originals(request)
    data = await asyncio.to_thread(blobs.get, item_id) if blobs is not None else None
    if data is None:
        raise NotFound(f"no original image for item {item_id!r}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
