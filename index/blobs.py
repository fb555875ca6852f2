"""Each gallery item's original image, kept beside the gallery so a model switch can re-embed the
catalog from the gallery itself (`rice reindex`), with no local folder that must match it.

A blob store is three calls keyed by item id, so another backend (an S3-compatible bucket) is one
small class. Originals belong to the product image, not to a model: every namespace's item of that
id shares one, and they go when the item is deleted. What is kept is a re-encoded JPEG with its
long side bounded (pipeline/originals.py), never the client's bytes as sent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Blobs(Protocol):
    """Bytes by item id. `put` replaces; `get` of an unknown id is None; `delete` ignores unknown ids."""

    def put(self, item_id: str, data: bytes) -> None: ...

    def get(self, item_id: str) -> bytes | None: ...

    def delete(self, item_ids: list[str]) -> None: ...


class DirBlobs:
    """One file per item in a directory (a local disk, or a volume every replica mounts).

    File names are a hash of the item id (ids may hold '/', ':' and '@'), fanned out over 256
    sub-directories so that no directory holds hundreds of thousands of files. Writes go to a
    temporary file renamed into place: a reader never sees half an image."""

    def __init__(self, root: str | os.PathLike[str], suffix: str = ".jpg") -> None:
        self.root = Path(root)
        self.suffix = suffix

    def path(self, item_id: str) -> Path:
        digest = hashlib.sha256(item_id.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest[2:40]}{self.suffix}"

    def put(self, item_id: str, data: bytes) -> None:
        target = self.path(item_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)

    def get(self, item_id: str) -> bytes | None:
        try:
            return self.path(item_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, item_ids: list[str]) -> None:
        for item_id in item_ids:
            self.path(item_id).unlink(missing_ok=True)


def originals_dir(blob_dir: str | None, gallery_path: str) -> str | None:
    """Where originals go: RICE_BLOB_DIR, else `originals/` beside the SQLite gallery file; None (keep
    none) for an in-memory gallery without a RICE_BLOB_DIR."""
    if blob_dir:
        return blob_dir
    if gallery_path == ":memory:":
        return None
    return str(Path(gallery_path).resolve().parent / "originals")


def open_originals(blob_dir: str | None, gallery_path: str) -> Blobs | None:
    """The originals store the settings name (see `originals_dir`)."""
    where = originals_dir(blob_dir, gallery_path)
    return DirBlobs(where) if where else None
