"""In-memory faiss gallery: exact inner-product search over L2-normalised vectors, answered as SKUs.

Search returns SKUs, not images: a SKU's score is its best image's score. A shop filter restricts
the search to that shop's images with a faiss ID selector, so results are exact, not post-filtered.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index.records import Record


@dataclass(frozen=True)
class Hit:
    sku: str
    score: float
    item_id: str
    shop_id: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class _Entry:
    item_id: str
    sku: str
    shop_id: str | None
    metadata: dict[str, Any]


class Gallery:
    """Thread-safe faiss index of gallery images with SKU aggregation and a shop filter."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._entries: dict[int, _Entry] = {}
        self._ids: dict[str, int] = {}  # item_id -> faiss id
        self._by_shop: dict[str | None, set[int]] = defaultdict(set)
        self._next_id = 0
        self._lock = threading.RLock()
        self.version = 0  # the last gallery version applied

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, records: list[Record]) -> None:
        """Apply upserts and tombstones in order. Idempotent: replaying a record changes nothing."""
        for r in records:  # validate the whole batch first: a bad record must not half-apply it
            if not r.deleted and (r.vector is None or np.asarray(r.vector).reshape(-1).shape[0] != self.dim):
                got = None if r.vector is None else np.asarray(r.vector).size
                raise ValueError(f"record {r.item_id!r}: vector of {got} floats, gallery dim is {self.dim}")
        with self._lock:
            for r in records:
                self._remove(r.item_id)
                if not r.deleted:
                    self._add(r)
                self.version = max(self.version, r.version)

    def set_version(self, version: int) -> None:
        with self._lock:
            self.version = max(self.version, version)

    def _add(self, r: Record) -> None:
        vec = np.asarray(r.vector, dtype=np.float32).reshape(1, -1)
        fid = self._next_id
        self._next_id += 1
        self._index.add_with_ids(vec, np.array([fid], dtype=np.int64))
        self._entries[fid] = _Entry(r.item_id, r.sku, r.shop_id, dict(r.metadata))
        self._ids[r.item_id] = fid
        self._by_shop[r.shop_id].add(fid)

    def _remove(self, item_id: str) -> None:
        fid = self._ids.pop(item_id, None)
        if fid is None:
            return
        entry = self._entries.pop(fid)
        self._by_shop[entry.shop_id].discard(fid)
        if not self._by_shop[entry.shop_id]:
            del self._by_shop[entry.shop_id]
        self._index.remove_ids(faiss.IDSelectorBatch(np.array([fid], dtype=np.int64)))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            skus = {e.sku for e in self._entries.values()}
            return {
                "items": len(self._entries),
                "skus": len(skus),
                "shops": len([s for s in self._by_shop if s is not None]),
                "dim": self.dim,
                "gallery_version": self.version,
            }

    def search(self, queries: np.ndarray, k: int, shop_id: str | None = None) -> tuple[list[list[Hit]], int]:
        """Top-k SKUs per query [Q, D] (best image per SKU). Returns (hits per query, version seen)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(q.shape)}")
        with self._lock:
            version = self.version
            if shop_id is None:
                pool = len(self._entries)
                params = None
            else:
                shop = self._by_shop.get(shop_id)
                if not shop:
                    return [[] for _ in range(len(q))], version
                pool = len(shop)
                sel = faiss.IDSelectorBatch(np.fromiter(shop, dtype=np.int64, count=len(shop)))
                params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
            if pool == 0 or k <= 0:
                return [[] for _ in range(len(q))], version
            # A SKU may own several images: widen the image search until k distinct SKUs are found.
            n = min(pool, max(4 * k, 16))
            while True:
                scores, ids = self._index.search(q, n, params=params)
                results = [self._aggregate(s, i, k) for s, i in zip(scores, ids, strict=True)]
                if n >= pool or all(len(r) >= k for r in results):
                    return results, version
                n = min(pool, n * 4)

    def _aggregate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Hit]:
        best: dict[str, Hit] = {}
        for score, fid in zip(scores.tolist(), ids.tolist(), strict=True):
            if fid < 0:
                continue
            e = self._entries[fid]
            if e.sku not in best:  # faiss returns scores in descending order
                best[e.sku] = Hit(e.sku, float(score), e.item_id, e.shop_id, e.metadata)
                if len(best) == k:
                    break
        return list(best.values())
