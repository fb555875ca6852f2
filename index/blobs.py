"""Each gallery item's original image, kept beside the gallery so a model switch can re-embed the
catalog from the gallery itself (`rice reindex`), with no local folder that must match it.

A blob store is three calls keyed by item id, so another backend (an S3-compatible bucket) is one
small class. Originals belong to the product image, not to a model: every namespace's item of that
id shares one, and they go when the item is deleted. What is kept is a re-encoded JPEG with its
long side bounded (pipeline/originals.py), never the client's bytes as sent.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from index.errors import InvalidBulk
from index.records import ID_PATTERN


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


# -- items' images in export folders and bulk imports ------------------------------------------------
# An export (and a `rice reindex --embed-only` folder) may carry `thumbnails/<id>.jpg`,
# `originals/<id>.jpg` and `features/<id>.rlf` (the item's stored local features for verification,
# a few tens of KB: carried as they are, a restored item verifies exactly as on the original server),
# the id percent-quoted so that it is one safe file name; POST /v1/gallery/bulk takes the same
# members as an optional tar beside the vectors.

IMAGE_KINDS = ("thumbnails", "originals", "features")
MAX_IMAGE_BYTES = {"thumbnails": 256 * 1024, "originals": 8 * 1024 * 1024, "features": 64 * 1024}
_SUFFIX = {"thumbnails": ".jpg", "originals": ".jpg", "features": ".rlf"}
_MAGIC = {"thumbnails": b"\xff\xd8\xff", "originals": b"\xff\xd8\xff", "features": b"RLF1"}


def image_member(kind: str, item_id: str) -> str:
    """The member (or file) name of an item's image or features: `thumbnails/<quoted id>.jpg`."""
    return f"{kind}/{urllib.parse.quote(item_id, safe='')}{_SUFFIX[kind]}"


def parse_image_member(name: str) -> tuple[str, str] | None:
    """(kind, item_id) of a member name made by `image_member`; None for any other name."""
    kind, sep, rest = name.partition("/")
    if kind not in IMAGE_KINDS or not sep or "/" in rest or not rest.endswith(_SUFFIX[kind]):
        return None
    item_id = urllib.parse.unquote(rest[: -len(_SUFFIX[kind])])
    return (kind, item_id) if ID_PATTERN.match(item_id) else None


def read_image_tar(f: IO[bytes]) -> list[tuple[str, str, bytes]]:
    """Every (kind, item_id, jpeg) of an uploaded images tar, checked before anything is written:
    only regular `thumbnails/` and `originals/` JPEGs and `features/` RLF1 data, within size; else
    InvalidBulk. (Features are parsed in full by their reader, `pipeline.local_features`.)"""
    out: list[tuple[str, str, bytes]] = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                parsed = parse_image_member(member.name)
                if parsed is None or not member.isfile():
                    want = "thumbnails/<id>.jpg, originals/<id>.jpg, features/<id>.rlf"
                    raise InvalidBulk(f"images: unexpected member {member.name[:120]!r} (want {want})")
                kind, item_id = parsed
                if member.size > MAX_IMAGE_BYTES[kind]:
                    raise InvalidBulk(f"images: {member.name[:120]} is {member.size} bytes, over {MAX_IMAGE_BYTES[kind]}")
                data = tar.extractfile(member)
                body = data.read() if data is not None else b""
                if not body.startswith(_MAGIC[kind]):
                    raise InvalidBulk(f"images: {member.name[:120]} is not {'RLF1 features' if kind == 'features' else 'a JPEG'}")
                out.append((kind, item_id, body))
    except tarfile.TarError as exc:
        raise InvalidBulk(f"images: not a tar archive ({exc})") from None
    return out


def image_tar(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar (in memory) of (name, bytes) members: the `images` part of a bulk import request."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:  # PAX: quoted ids may pass 100 bytes
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
