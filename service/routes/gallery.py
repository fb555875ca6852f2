"""Gallery ingestion, deletion and stats; bulk vectors in and out."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from pipeline.thumbnail import thumbnail_jpeg
from service import catalog_io
from service.auth import require_read, require_write
from service.catalog_io import ImageChoice
from service.errors import BadRequest, Conflict
from service.routes.deps import ReadShop, RoutingShop, State, originals_of, read_upload, write_shop
from service.schemas import BulkImported, Deleted, GalleryStats, ItemCreated

router = APIRouter(prefix="/v1/gallery", tags=["gallery"])


_valid_id = catalog_io.valid_id


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON: stored, they would come back as null
    raise json.JSONDecodeError(f"{name} is not allowed", name, 0)


def _parse_metadata(raw: str | None, limit: int) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if len(raw.encode()) > limit:
        raise BadRequest(f"metadata exceeds {limit} bytes")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"metadata is not valid JSON: {exc.msg}") from exc
    if not isinstance(value, dict):
        raise BadRequest("metadata must be a JSON object")
    return value


@router.post("/items", status_code=201, response_model=ItemCreated, dependencies=[Depends(require_write)])
async def add_item(
    request: Request,
    state: State,
    routing: RoutingShop,
    image: Annotated[UploadFile, File(description="the product image (jpeg, png, webp, bmp)")],
    sku: str = Form(..., description="the product's SKU"),
    shop_id: str | None = Form(None, description="the shop selling it (searches may filter by shop)"),
    item_id: str | None = Form(None, description="id of this image; an existing id is replaced. Default: a new UUID"),
    metadata: str | None = Form(None, description="a JSON object returned with search results (at most RICE_MAX_METADATA_BYTES)"),
) -> ItemCreated:
    """Add (or replace) one product image in the gallery. Visible to searches once answered (sharded:
    on the replicas of the shop's shard; it is written there whichever replica takes it)."""
    _valid_id(sku, "sku")
    shop_id = write_shop(request, routing, shop_id)
    if shop_id is not None:
        _valid_id(shop_id, "shop_id")
    if item_id is not None:
        _valid_id(item_id, "item_id")
    meta = _parse_metadata(metadata, state.settings.max_metadata_bytes)
    data = await read_upload(image, request, state.settings.max_upload_bytes, "image")
    vector, frame, features = await state.pipeline.embed_catalog_item(data)
    views = await state.pipeline.embed_catalog_views(frame, state.settings.catalog_views)
    thumbnail = await asyncio.to_thread(thumbnail_jpeg, frame)
    item_id = item_id or uuid.uuid4().hex
    await catalog_io.keep_original(originals_of(request), item_id, data)  # before the item: a findable item always has its original
    new_id, version = await state.replica.add(vector, sku, shop_id, item_id, meta, thumbnail, features, views=views)
    shard = state.replica.shard_of(shop_id)
    return ItemCreated(
        item_id=new_id, sku=sku, shop_id=shop_id, gallery_version=version, model_version=state.engine.model_version, shard=shard
    )


@router.delete("/items/{item_id:path}", response_model=Deleted, dependencies=[Depends(require_write)])
async def delete_item(item_id: str, state: State, request: Request, routing: RoutingShop) -> Deleted:
    """Remove one gallery image (404 if there is no such item). Sharded: give the item's shop."""
    shop_id = write_shop(request, routing)
    version, ids = await state.replica.delete_item(item_id, shop_id)
    await catalog_io.forget_originals(originals_of(request), ids)
    return Deleted(deleted=ids, gallery_version=version, shard=state.replica.shard_of(shop_id))


@router.delete("/skus/{sku}", response_model=Deleted, dependencies=[Depends(require_write)])
async def delete_sku(sku: str, state: State, request: Request, routing: RoutingShop) -> Deleted:
    """Remove every image of a SKU (404 if it has none); with a shop, only that shop's (sharded: required)."""
    shop_id = write_shop(request, routing)
    version, ids = await state.replica.delete_sku(sku, shop_id)
    await catalog_io.forget_originals(originals_of(request), ids)
    return Deleted(deleted=ids, gallery_version=version, shard=state.replica.shard_of(shop_id))


@router.get("/stats", response_model=GalleryStats, dependencies=[Depends(require_read)])
async def stats(state: State) -> GalleryStats:
    """Size and version of this replica's gallery."""
    return GalleryStats(**await asyncio.to_thread(state.replica.stats))  # takes the gallery's read lock


@router.post("/bulk", status_code=201, response_model=BulkImported, response_model_exclude_none=True, dependencies=[Depends(require_write)])
async def bulk_import(
    state: State,
    request: Request,
    vectors: Annotated[UploadFile, File(description="a .npy float32 array [n, dim] of embeddings (the served model's)")],
    items: Annotated[
        UploadFile | str, File(description='JSONL, one line per row: {"item_id", "sku", "shop_id"?, "metadata"?} (a file or a text field)')
    ],
    model_version: str = Form(..., description="the model that made the vectors; must be the served one (else 409)"),
    images: Annotated[
        UploadFile | None,
        File(description="optional tar of the rows' thumbnails/<id>.jpg, originals/<id>.jpg, features/<id>.rlf (id percent-quoted)"),
    ] = None,
) -> BulkImported:
    """Import precomputed vectors (e.g. from the offline reindex job, or a backup) under one gallery
    version. Every row is checked before anything is written; the import is all or nothing. Its
    size limit is RICE_MAX_BULK_BYTES. Visible to searches once answered. Sharded: every row needs
    its shop_id; the rows are split by shard, each shard's part written (all or nothing) to its
    store under its own version (`gallery_versions`), whichever replica takes the import."""
    if model_version != state.engine.model_version:
        raise Conflict(f"the vectors are from model {model_version!r}; this service serves {state.engine.model_version!r}")
    lines = io.BytesIO(items.encode()) if isinstance(items, str) else items.file
    records = await asyncio.to_thread(catalog_io.read_bulk, vectors.file, lines, state.replica.dim, state.settings.max_metadata_bytes)
    await asyncio.to_thread(state.replica.check_bulk, records)  # sharded: a row without a shop, before any image is written
    if images is not None:
        await catalog_io.import_images(state, originals_of(request), images.file, {r.item_id: r.shop_id for r in records})
    versions = await state.replica.import_bulk(records)
    sharded = state.settings.shards > 1
    return BulkImported(
        imported=len(records), gallery_version=state.replica.answer_version(versions), gallery_versions=versions if sharded else None
    )


@router.get("/export", dependencies=[Depends(require_write)], response_class=StreamingResponse)
async def export(
    state: State,
    request: Request,
    shop_id: ReadShop,
    images: Annotated[
        ImageChoice, Query(description="items' images in the tar: none, thumbnails, all (+ originals); with any, their local features")
    ] = "thumbnails",
) -> StreamingResponse:
    """Every live item of the served model's gallery as a tar stream: manifest.json (model_version,
    dim, count, gallery_version), items.jsonl, vectors.npy: the format POST /v1/gallery/bulk reads.
    Needs the write right: it hands out the whole catalog. Sharded: this replica's shard, every shop
    of it (the shop id, required, routes the request to the shard)."""
    version, rows, vectors = await asyncio.to_thread(state.replica.gallery.export)
    extra = catalog_io.export_images(state, originals_of(request), [r[0] for r in rows], images)
    body = catalog_io.export_stream(state, version, rows, vectors, extra)
    headers = {"Content-Disposition": f'attachment; filename="gallery-v{version}.tar"'}
    return StreamingResponse(iterate_in_threadpool(body), media_type="application/x-tar", headers=headers)
