"""What the gallery stores, and the protocol every store implements."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Record:
    """One gallery image (an upsert) or its tombstone (deleted=True, no vector)."""

    item_id: str
    sku: str
    shop_id: str | None
    vector: np.ndarray | None  # float32 [D], L2-normalised; None for tombstones
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    deleted: bool = False
    source: str = "catalog"  # "catalog" (ingested images) or "feedback" (a confirmed answer's clip vector, index.feedback)


# Where a gallery item came from; only catalog items have a catalog image (thumbnail).
SOURCES = ("catalog", "feedback")


def vector_to_bytes(v: np.ndarray) -> bytes:
    """Raw little-endian float32 bytes: the only way vectors cross a process boundary."""
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def vector_from_bytes(b: bytes, dim: int) -> np.ndarray:
    v = np.frombuffer(b, dtype="<f4")
    if v.shape[0] != dim:
        raise ValueError(f"vector has {v.shape[0]} floats, expected {dim}")
    return v.astype(np.float32, copy=True)


def metadata_to_json(metadata: dict[str, Any]) -> str:
    return json.dumps(metadata, separators=(",", ":"), sort_keys=True)


# Printable ids without spaces, at most 256 characters: item ids, SKUs and shop ids alike.
ID_PATTERN = re.compile(r"^[\w.:@/+-]{1,256}$")
ID_RULE = "1-256 characters of letters, digits and . _ - : @ / +"


@runtime_checkable
class Store(Protocol):
    """Durable, versioned gallery state, namespaced by model version.

    Every mutation gets the next gallery version (monotonic across namespaces). Deletes act
    on every namespace: a product removed from the shop is gone whichever model embedded it.
    """

    def upsert(self, namespace: str, records: list[Record]) -> int:
        """Store records (vectors required); returns the new gallery version."""
        ...

    def delete_items(self, item_ids: list[str]) -> tuple[int, list[str]]:
        """Tombstone live items; returns (version, ids deleted). Raises ItemNotFound if none were live."""
        ...

    def delete_sku(self, sku: str, shop_id: str | None = None) -> tuple[int, list[str]]:
        """Tombstone every live item of a SKU (in one shop if given). Raises ItemNotFound if none."""
        ...

    def changes_since(self, namespace: str, version: int) -> list[Record]:
        """Records and tombstones of a namespace with version > `version`, in version order."""
        ...

    def version(self) -> int:
        """The latest gallery version written."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Thumbnails(Protocol):
    """A store that also keeps each item's catalog thumbnail (a small JPEG), keyed by item id.

    Thumbnails belong to the product image, not to a model: every namespace's item of that id
    shows the same one, and a reindex keeps them. Deleting an item removes its thumbnail."""

    def put_thumbnail(self, item_id: str, jpeg: bytes) -> None:
        """Store (or replace) the thumbnail of `item_id`."""
        ...

    def thumbnail(self, item_id: str) -> bytes | None:
        """The thumbnail of `item_id`, or None."""
        ...

    def delete_thumbnails(self, item_ids: list[str]) -> None:
        """Remove the thumbnails of items no namespace holds any more."""
        ...


@runtime_checkable
class FeatureStore(Protocol):
    """A store that also keeps each item's local features (opaque bytes, `pipeline.local_features`),
    keyed by item id like thumbnails: made from the product image, shared by every namespace's copy,
    kept by a reindex, removed with the item."""

    def put_features(self, item_id: str, data: bytes) -> None:
        """Store (or replace) the local features of `item_id`."""
        ...

    def features(self, item_ids: list[str]) -> dict[str, bytes]:
        """The stored features of those items that have some (one round trip)."""
        ...

    def delete_features(self, item_ids: list[str]) -> None:
        """Remove the features of items no namespace holds any more."""
        ...


@runtime_checkable
class Namespaces(Protocol):
    """A store that can say how many live items each namespace (model version) holds."""

    def namespace_counts(self) -> dict[str, int]:
        """Live items per namespace (namespaces without live items may be missing)."""
        ...


@dataclass(frozen=True)
class LogEntry:
    """One mutation read from a change log: every record a single gallery version wrote.

    `records` holds only the records of the namespace the reader asked for (other namespaces'
    upserts come back empty, so the reader still sees every version go by)."""

    version: int
    namespace: str | None  # None for deletes, which act on every namespace
    records: list[Record]
    written_at: float  # writer's wall clock (seconds since the epoch), for lag measurements


@dataclass(frozen=True)
class Snapshot:
    """The live items of a namespace, read after (epoch, version): every change after `version`
    is in the log, so replaying the log from `version` on top of the records is exact.

    `records` may be lazy (Redis reads them a chunk at a time as they are iterated, so a million
    records are never all in memory at once): iterate it once, or `list()` it for a small namespace."""

    epoch: str
    version: int
    records: Iterable[Record]


@runtime_checkable
class ChangeLog(Protocol):
    """A store that other processes write to, followed through an append-only log of mutations."""

    def snapshot(self, namespace: str) -> Snapshot:
        """The namespace's live records, with the (epoch, version) the log must be followed from."""
        ...

    def read_log(self, namespace: str, after_version: int, block_ms: int, count: int) -> list[LogEntry]:
        """Log entries with version > `after_version`, oldest first; waits up to `block_ms` for the first one."""
        ...

    def position(self) -> tuple[str | None, int]:
        """(epoch, latest version): the epoch changes when the server lost its data."""
        ...
