"""Items' original images: GET /v1/gallery/items/{item_id}/original (the blob store is kept on every
add and removed with the item: service/catalog_io.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from service import catalog_io
from service.auth import require_write
from service.errors import NotFound
from service.routes.deps import ReadShop, originals_of

router = APIRouter(prefix="/v1/gallery", tags=["gallery"])


@router.get(
    "/items/{item_id:path}/original",  # :path: an id may hold "/"
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the item's original image (long side at most 1024)"}},
    dependencies=[Depends(require_write)],
)
async def original(item_id: str, request: Request, shop_id: ReadShop) -> Response:
    """The item's kept original image (a JPEG, long side at most 1024); 404 when none is kept.
    Needs the write right, like the export it is part of."""
    data = await catalog_io.original(originals_of(request), item_id)
    if data is None:
        raise NotFound(f"no original image for item {item_id!r}")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
