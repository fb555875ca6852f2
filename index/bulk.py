"""Bulk vectors in and out: one gallery as three files, validated as a whole before anything is written.

The format (the same for `POST /v1/gallery/bulk`, `GET /v1/gallery/export`, `rice gallery
export/import` and `rice reindex --embed-only`):

- `vectors.npy`: a float32 array [count, dim] (NumPy's .npy format, read with allow_pickle=False);
- `items.jsonl`: one JSON object per row, `{"item_id", "sku", "shop_id"?, "metadata"?}`;
- `manifest.json`: `{"format", "model_version", "dim", "count", "gallery_version"}`.

The export streams the three as an uncompressed tar (manifest first), so `tar x` gives the folder
that `rice gallery import` reads. Vectors are raw float32 with an explicit shape, never pickles.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from index.errors import InvalidBulk
from index.halfstore import HalfRows
from index.records import ID_PATTERN, ID_RULE, SOURCES, Record, metadata_to_json

FORMAT = "rice-gallery/1"
VECTORS, ITEMS, MANIFEST = "vectors.npy", "items.jsonl", "manifest.json"
_ROWS_PER_CHUNK = 4096  # rows per streamed piece of the export


@dataclass(frozen=True)
class Manifest:
    model_version: str
    dim: int
    count: int
    gallery_version: int = 0
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise InvalidBulk(f"manifest format is {raw.get('format')!r}, expected {FORMAT!r}")
            return cls(str(raw["model_version"]), int(raw["dim"]), int(raw["count"]), int(raw.get("gallery_version", 0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, InvalidBulk):
                raise
            raise InvalidBulk(f"manifest is not valid: {exc}") from exc


@dataclass(frozen=True)
class BulkItem:
    item_id: str
    sku: str
    shop_id: str | None
    metadata: dict[str, Any]
    source: str = "catalog"  # written only when not "catalog", so older readers and files match

    def to_json(self) -> str:
        row = {"item_id": self.item_id, "sku": self.sku, "shop_id": self.shop_id, "metadata": self.metadata}
        if self.source != "catalog":
            row["source"] = self.source
        return json.dumps(row, sort_keys=True)


def read_vectors(f: IO[bytes]) -> np.ndarray:
    """A .npy float32 [n, dim] array from a seekable file object; anything else is InvalidBulk.

    The header is checked against the bytes that follow it before any array is allocated: a header
    that claims more rows than were sent must not make the reader allocate for them."""
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError) as exc:  # not .npy, or a truncated header
        raise InvalidBulk(f"vectors is not a readable .npy array: {exc}") from exc
    if dtype != np.float32:
        raise InvalidBulk(f"vectors must be float32, got {dtype}")
    if len(shape) != 2:
        raise InvalidBulk(f"vectors must be a 2-D array [n, dim], got shape {list(shape)}")
    data_at = f.tell()
    f.seek(0, io.SEEK_END)
    sent = f.tell() - data_at
    if sent != shape[0] * shape[1] * 4:
        raise InvalidBulk(f"vectors header says {list(shape)} float32 ({shape[0] * shape[1] * 4} bytes), but {sent} bytes follow it")
    f.seek(start)
    try:
        arr = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidBulk(f"vectors is not a readable .npy array: {exc}") from exc
    return np.asarray(arr, dtype=np.float32).reshape(shape)  # also native byte order


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")  # NaN and Infinity are not JSON


def _field_id(row: dict[str, Any], key: str, line: int, optional: bool = False) -> str | None:
    value = row.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidBulk(f"items line {line}: {key} must be {ID_RULE}")
    return value


def parse_items(lines: Iterable[bytes], max_metadata_bytes: int) -> list[BulkItem]:
    """JSONL rows -> items, each checked (ids, metadata as a JSON object within the limit); blank lines skipped."""
    out: list[BulkItem] = []
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidBulk(f"items line {line_no}: not valid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise InvalidBulk(f"items line {line_no}: must be a JSON object")
        item_id = _field_id(row, "item_id", line_no)
        sku = _field_id(row, "sku", line_no)
        shop_id = _field_id(row, "shop_id", line_no, optional=True)
        metadata = row.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidBulk(f"items line {line_no}: metadata must be a JSON object")
        if len(metadata_to_json(metadata).encode()) > max_metadata_bytes:
            raise InvalidBulk(f"items line {line_no}: metadata exceeds {max_metadata_bytes} bytes")
        source = row.get("source", "catalog")
        if source not in SOURCES:
            raise InvalidBulk(f"items line {line_no}: source must be one of {', '.join(SOURCES)}")
        assert item_id is not None and sku is not None
        out.append(BulkItem(item_id, sku, shop_id, metadata, source))
    return out


def bulk_records(vectors: np.ndarray, items: list[BulkItem], dim: int) -> list[Record]:
    """Check the whole import and turn it into records (vectors L2-normalised, as the encoder's are).

    Raises InvalidBulk, before anything is written, on: a dimension other than the gallery's, a row
    count that differs from the items', a duplicate item id, a non-finite or all-zero vector."""
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidBulk(f"vectors have dimension {vectors.shape[-1] if vectors.ndim else 0}; this gallery's is {dim}")
    if len(vectors) != len(items):
        raise InvalidBulk(f"{len(vectors)} vectors but {len(items)} items; one item line per vector row")
    if not items:
        raise InvalidBulk("the import is empty")
    seen: set[str] = set()
    for line_no, it in enumerate(items, 1):
        if it.item_id in seen:
            raise InvalidBulk(f"item {it.item_id!r} appears twice (row {line_no}); one row per item")
        seen.add(it.item_id)
    unit = np.array(vectors, dtype=np.float32, order="C")  # our own copy, normalised in place
    norms = np.sqrt(np.einsum("ij,ij->i", unit, unit))  # one pass, no float64 copy of the import
    bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-12))  # NaN/inf rows, overflow, all-zero rows
    if len(bad):
        raise InvalidBulk(f"vector row {int(bad[0])} (item {items[int(bad[0])].item_id!r}) is all zero or not finite")
    unit /= norms[:, None]
    return [Record(it.item_id, it.sku, it.shop_id, unit[i], it.metadata, source=it.source) for i, it in enumerate(items)]


def npy_header(count: int, dim: int) -> bytes:
    """The .npy header of a little-endian float32 [count, dim] array (the data follows as raw rows)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
    return buf.getvalue()


def _tar_member(name: str, size: int, fmt: Literal[0, 1, 2] = tarfile.USTAR_FORMAT) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    return info.tobuf(format=fmt)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def export_tar(
    manifest: Manifest, items: list[BulkItem], vectors: np.ndarray | HalfRows, extra: Iterable[tuple[str, bytes]] = ()
) -> Iterator[bytes]:
    """The export as a stream of tar pieces: manifest.json, items.jsonl, vectors.npy (row chunks),
    then the `extra` (name, bytes) members, read one at a time (items' images: index/blobs.py).
    `vectors` is read a row chunk at a time: a compressed gallery's `HalfRows` converts only that chunk."""
    meta = manifest.to_json()
    yield _tar_member(MANIFEST, len(meta)) + meta + _padding(len(meta))
    lines = "".join(it.to_json() + "\n" for it in items).encode()
    yield _tar_member(ITEMS, len(lines)) + lines + _padding(len(lines))
    header = npy_header(len(vectors), manifest.dim)
    size = len(header) + vectors.size * 4
    yield _tar_member(VECTORS, size) + header
    for s in range(0, len(vectors), _ROWS_PER_CHUNK):
        yield np.ascontiguousarray(vectors[s : s + _ROWS_PER_CHUNK], dtype="<f4").tobytes()
    yield _padding(size)
    for name, data in extra:
        yield _tar_member(name, len(data), tarfile.PAX_FORMAT) + data + _padding(len(data))  # PAX: names over 100 bytes
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker


def write_dir(folder: Path, manifest: Manifest, items: list[BulkItem], vectors: np.ndarray) -> None:
    """Write the three files into `folder` (created); the manifest last, so its presence means complete."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / VECTORS, np.ascontiguousarray(vectors, dtype="<f4"), allow_pickle=False)
    (folder / ITEMS).write_text("".join(it.to_json() + "\n" for it in items))
    (folder / MANIFEST).write_bytes(manifest.to_json())


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise InvalidBulk(f"{path} is missing: not an export folder (or an unfinished one)")
    manifest = Manifest.from_json(path.read_bytes())
    if manifest.dim <= 0 or manifest.count < 0:
        raise InvalidBulk(f"manifest has dim {manifest.dim} and count {manifest.count}")
    return manifest
