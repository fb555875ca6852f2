"""Items' original images (index/blobs.py): kept on every add, removed with the item, readable by
GET /v1/gallery/items/{item_id}/original; and items' images (thumbnails, originals) carried by the
gallery export and the bulk import."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Literal

from fastapi import APIRouter, Depends, Request, Response, UploadFile

from index.blobs import Blobs, image_member, read_image_tar
from index.errors import InvalidBulk
from index.records import Thumbnails
from pipeline.originals import original_jpeg
from service.auth import require_write
from service.errors import NotFound
from service.state import AppState

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
    "/items/{item_id:path}/original",  # :path: an id may hold "/"
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


ImageChoice = Literal["none", "thumbnails", "all"]


def export_images(request: Request, state: AppState, item_ids: list[str], which: ImageChoice) -> Iterator[tuple[str, bytes]]:
    """The export's image members, read one at a time as the tar streams (on the threadpool)."""
    if which == "none":
        return
    blobs = _originals(request) if which == "all" else None
    for item_id in item_ids:
        thumb = state.replica.thumbnail(item_id)
        if thumb is not None:
            yield image_member("thumbnails", item_id), thumb
        original = blobs.get(item_id) if blobs is not None else None
        if original is not None:
            yield image_member("originals", item_id), original


async def import_images(request: Request, state: AppState, images: UploadFile, item_ids: set[str]) -> None:
    """Store a bulk import's thumbnails and originals, checked first (InvalidBulk: nothing written),
    before its items: an imported item any replica can find has its images."""
    found = await asyncio.to_thread(read_image_tar, images.file)
    stray = sorted({item_id for _, item_id, _ in found} - item_ids)
    if stray:
        raise InvalidBulk(f"images: {len(stray)} images of items not in this import, e.g. {stray[0]!r}")
    store, blobs = state.replica.store, _originals(request)
    for kind, item_id, data in found:
        if kind == "thumbnails" and isinstance(store, Thumbnails):
            await asyncio.to_thread(store.put_thumbnail, item_id, data)
        elif kind == "originals" and blobs is not None:
            await asyncio.to_thread(blobs.put, item_id, data)
