"""What the gallery routes do beyond wiring: ids, the bulk format in and out, and the items' images
(thumbnails in the gallery store, originals in the blob store) that travel with them.

The routes import this module, never `index/`: the web layer only wires routes to it and to the
serving state."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import IO, Literal

import numpy as np

from index.blobs import Blobs, image_member, read_image_tar
from index.bulk import BulkItem, Manifest, bulk_records, export_tar, parse_items, read_vectors
from index.errors import BadRequest, InvalidBulk
from index.halfstore import HalfRows
from index.records import ID_PATTERN, ID_RULE, Record
from pipeline.local_features import LocalFeatures
from pipeline.originals import original_jpeg
from service.state import AppState

ImageChoice = Literal["none", "thumbnails", "all"]


def valid_id(value: str, what: str) -> str:
    """An item id, SKU or shop id as given, or BadRequest naming the rule."""
    if not ID_PATTERN.match(value):
        raise BadRequest(f"{what} must be {ID_RULE}")
    return value


def read_bulk(vectors: IO[bytes], items: IO[bytes], dim: int, max_metadata_bytes: int) -> list[Record]:
    """Parse and check a whole import (on a thread: it is O(rows)); InvalidBulk (400) on any bad row."""
    vectors.seek(0)
    items.seek(0)
    return bulk_records(read_vectors(vectors), parse_items(items, max_metadata_bytes), dim)


def export_stream(
    state: AppState,
    version: int,
    rows: list[tuple[str, str, str | None, dict[str, object], str]],
    vectors: np.ndarray | HalfRows,
    extra: Iterator[tuple[str, bytes]],
) -> Iterator[bytes]:
    """The export tar (manifest.json, items.jsonl, vectors.npy, then `extra` members), as it streams."""
    manifest = Manifest(state.engine.model_version, state.replica.dim, len(rows), version)
    return export_tar(manifest, [BulkItem(*r) for r in rows], vectors, extra)


async def keep_original(blobs: Blobs | None, item_id: str, upload: bytes) -> None:
    """Store the bounded re-encoded original of an upload the pipeline has already decoded."""
    if blobs is None:
        return
    jpeg = await asyncio.to_thread(original_jpeg, upload)
    if jpeg is not None:  # a format only the decode workers read: the item keeps its thumbnail alone
        await asyncio.to_thread(blobs.put, item_id, jpeg)


async def forget_originals(blobs: Blobs | None, item_ids: list[str]) -> None:
    """Deletes act on every namespace, so a deleted item's original has no other user."""
    if blobs is not None and item_ids:
        await asyncio.to_thread(blobs.delete, item_ids)


async def original(blobs: Blobs | None, item_id: str) -> bytes | None:
    return await asyncio.to_thread(blobs.get, item_id) if blobs is not None else None


def export_images(state: AppState, blobs: Blobs | None, item_ids: list[str], which: ImageChoice) -> Iterator[tuple[str, bytes]]:
    """The export's image members, read one at a time as the tar streams (on the threadpool). With
    any images, also the items' stored local features: a restored item then verifies exactly as here
    (re-extracting them would need the full-resolution upload, which no store keeps)."""
    if which == "none":
        return
    originals = blobs if which == "all" else None
    for item_id in item_ids:
        thumb = state.replica.thumbnail(item_id)
        if thumb is not None:
            yield image_member("thumbnails", item_id), thumb
        data = originals.get(item_id) if originals is not None else None
        if data is not None:
            yield image_member("originals", item_id), data
        features = state.replica.features([item_id]).get(item_id)
        if features is not None:
            yield image_member("features", item_id), features


def _check_features(found: list[tuple[str, str, bytes]]) -> None:
    for kind, item_id, data in found:
        if kind == "features":
            try:
                LocalFeatures.from_bytes(data)
            except ValueError as exc:
                raise InvalidBulk(f"images: features of {item_id!r}: {exc}") from None


async def import_images(state: AppState, blobs: Blobs | None, images: IO[bytes], shops: dict[str, str | None]) -> None:
    """Store a bulk import's thumbnails, originals and local features, checked first (InvalidBulk:
    nothing written), before its items: an imported item any replica can find has its images.
    `shops`: each row's item id -> shop id (a thumbnail goes to its shop's shard's store)."""
    found = await asyncio.to_thread(read_image_tar, images)
    stray = sorted({item_id for _, item_id, _ in found} - shops.keys())
    if stray:
        raise InvalidBulk(f"images: {len(stray)} images of items not in this import, e.g. {stray[0]!r}")
    await asyncio.to_thread(_check_features, found)
    for kind, item_id, data in found:
        if kind == "thumbnails":
            await state.replica.put_thumbnail(item_id, data, shops[item_id])
        elif kind == "features":
            await state.replica.put_features(item_id, data, shops[item_id])
        elif kind == "originals" and blobs is not None:
            await asyncio.to_thread(blobs.put, item_id, data)
