"""In-memory faiss gallery: inner-product search over L2-normalised vectors, answered as SKUs.

Search returns SKUs, not images: a SKU's score is its best image's score.

Storage is one `IndexFlatIP` whose rows are slots: a deleted item's row is zeroed and its slot
reused by the next add, so deletes cost O(D), not a compaction of the whole index. Searches:

- unfiltered, small gallery: exact flat search (asking for as many extra rows as there are
  zeroed ones, so dead rows never push a live one out of the top n);
- unfiltered, gallery past `AnnConfig.threshold`: an IVF index (see `index.ann`), trained in the
  background and swapped in atomically, kept up to date by add/remove in place;
- one shop: exact, over that shop's rows only (a gather and a matrix product), so thousands of
  small shops each cost what their own size costs; a shop larger than `exact_shop_max` uses the
  index with a faiss ID selector instead.

Past `AnnConfig.compress_threshold` live items the gallery compresses (issue 19: a million items
in bounded memory): the float32 rows (and the IVF-Flat copy of them) give way to float16 rows in a
`HalfStore` (2 bytes a float) plus an IVF-PQ index of 64-byte codes (`index.ann.PqBuild`), trained
in the background. An unfiltered search takes the IVF-PQ shortlist (`rescore` rows) and re-scores
it exactly from the float16 rows; per-shop search stays exact over the shop's float16 rows. Until
the first IVF-PQ index is swapped in, unfiltered search is exact over the float16 rows (slow at a
million, but right). Shrinking below half the threshold goes back to float32.
"""

from __future__ import annotations

import heapq
import logging
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from index.ann import ADD_ROWS, AnnConfig, IndexPlacer, IvfBuild, PqBuild
from index.halfstore import HalfRows, HalfStore
from index.records import Record
from index.rwlock import RWLock
from index.views import base_id, is_view

log = logging.getLogger("rice.index")


@dataclass(frozen=True)
class Hit:
    sku: str
    score: float
    item_id: str
    shop_id: str | None
    metadata: dict[str, Any]
    source: str = "catalog"  # the matched item's: a catalog image or a feedback view


@dataclass(frozen=True, slots=True)  # no per-instance dict: 50 MB less per million items
class _Entry:
    item_id: str
    sku: str
    shop_id: str | None
    metadata: dict[str, Any]
    source: str = "catalog"


def _listing_order(e: _Entry) -> tuple[str, str]:
    return e.sku, e.item_id


class Gallery:
    """Thread-safe faiss index of gallery images with SKU aggregation and a shop filter."""

    def __init__(
        self,
        dim: int,
        ann: AnnConfig | None = None,
        exact_shop_max: int = 50_000,
        placer: IndexPlacer | None = None,
        apply_chunk: int = 4096,
    ) -> None:
        """`placer` copies the unfiltered index to where searches run (`index.ann.default_placer`: all
        GPUs when faiss has them, else None = search the CPU index in place); `apply_chunk` bounds
        how many records one write-lock hold applies."""
        self.dim = dim
        self._placer = placer
        self._placed: faiss.Index | None = None  # the placer's copy of the unfiltered index
        self.apply_chunk = max(1, apply_chunk)
        self._applying = threading.Lock()
        self.ann_config = ann or AnnConfig()
        self.exact_shop_max = exact_shop_max
        self._flat: faiss.IndexFlatIP | None = faiss.IndexFlatIP(dim)  # row i holds slot i's vector (zeros when free)
        self._half: HalfStore | None = None  # instead of _flat once compressed (float16 rows, same slots)
        self._entries: dict[int, _Entry] = {}
        self._ids: dict[str, int] = {}  # item_id -> slot
        self._by_shop: dict[str | None, set[int]] = defaultdict(set)
        self._free: list[int] = []
        # An export of a compressed gallery reads its rows lazily (`HalfRows`): while one is open, a
        # slot freed in that store is held (neither zeroed nor reused) so the export's rows stay its own.
        self._pins = 0
        self._pinned: HalfStore | None = None
        self._held: list[int] = []
        self._ann: faiss.Index | None = None
        self._ann_size = 0  # live items when the approximate index was trained
        self._build: IvfBuild | PqBuild | None = None
        self._lock = RWLock()  # searches share it; writes (apply, index swap) take it alone
        self._sku_items: Counter[str] = Counter()  # live images per SKU: stats without an O(N) pass
        self._views = 0  # live view records (`index.views`): vectors, not items
        self.version = 0  # the last gallery version applied

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._ids

    def has(self, item_id: str) -> bool:
        """Whether a record with this id is live here (an item or a view)."""
        with self._lock.read():
            return item_id in self._ids

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def approximate(self) -> bool:
        """True while unfiltered searches go through the approximate index."""
        return self._ann is not None

    @property
    def compressed(self) -> bool:
        """True while the vectors are kept as float16 rows (past `compress_threshold`)."""
        return self._half is not None

    def _vectors(self, slots: np.ndarray) -> np.ndarray:
        """Rows [S, D] float32 of the given slots, from whichever store holds them (a copy)."""
        if self._half is not None:
            return self._half.get(slots)
        return self._rows()[slots]

    def _rows(self) -> np.ndarray:
        """A writable view of the flat index's rows [ntotal, D] (re-taken after every add: adds may move them)."""
        assert self._flat is not None, "the float32 rows are gone once the gallery is compressed"
        n = self._flat.ntotal
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        return faiss.rev_swig_ptr(self._flat.get_xb(), n * self.dim).reshape(n, self.dim)

    def apply(self, records: list[Record], build: bool = True) -> None:
        """Apply upserts and tombstones in order. Idempotent: replaying a record changes nothing.

        `build=False` leaves the decision to start a background index build to a later call: a boot
        applying a snapshot batch by batch starts one build once all of it is in, instead of builds
        that each next batch makes stale (compression is still checked every chunk).

        A large batch (a bulk import) is applied in chunks of `apply_chunk` records, each under the
        write lock alone, so a search waits for one chunk (milliseconds), never for the whole import.
        The gallery version moves only after the last chunk: a search during the import may already
        see some of its items, but read-your-writes (`version` >= the import's) sees all of them."""
        for r in records:  # validate the whole batch first: a bad record must not half-apply it
            if not r.deleted and (r.vector is None or np.asarray(r.vector).reshape(-1).shape[0] != self.dim):
                got = None if r.vector is None else np.asarray(r.vector).size
                raise ValueError(f"record {r.item_id!r}: vector of {got} floats, gallery dim is {self.dim}")
        with self._applying:  # one batch at a time, and exports never see half of one
            for start in range(0, len(records), self.apply_chunk):
                last = start + self.apply_chunk >= len(records)
                with self._lock.write():  # an index build is decided once the whole batch is in, not mid-import
                    self._apply_chunk(records[start : start + self.apply_chunk], may_build=last and build)
            newest = max((r.version for r in records), default=0)
            if newest > self.version:
                with self._lock.write():
                    self.version = newest

    def _apply_chunk(self, records: list[Record], may_build: bool = True) -> None:
        """Apply records under the write lock (held by the caller); the version is the caller's business."""
        half = self._half
        base = half.size if half is not None else self._rows().shape[0]
        rows = self._rows() if half is None else np.zeros((0, self.dim), np.float32)
        appended: list[np.ndarray] = []  # rows for slots >= base, added to faiss in one call
        pending: dict[int, np.ndarray] = {}  # compressed: slot -> its last vector, stored in one call
        removed: set[int] = set()  # slots that left the approximate index
        added: set[int] = set()  # slots whose vector is new

        def write(slot: int, vec: np.ndarray) -> None:
            if half is not None:
                pending[slot] = vec
            elif slot < base:
                rows[slot] = vec
            else:
                appended[slot - base] = vec

        for r in records:
            old = self._ids.pop(r.item_id, None)
            if old is not None:
                entry = self._entries.pop(old)
                self._views -= is_view(entry.item_id)
                self._sku_items[entry.sku] -= 1
                if not self._sku_items[entry.sku]:
                    del self._sku_items[entry.sku]
                shop = self._by_shop[entry.shop_id]
                shop.discard(old)
                if not shop:
                    del self._by_shop[entry.shop_id]
                if self._pins and half is not None and half is self._pinned:
                    self._held.append(old)  # an open export still reads this row
                else:
                    write(old, np.zeros(self.dim, np.float32))
                    self._free.append(old)
                if old in added:
                    added.discard(old)
                else:
                    removed.add(old)
            if not r.deleted:
                vec = np.asarray(r.vector, dtype=np.float32).reshape(-1)
                if self._free:
                    slot = self._free.pop()
                else:
                    slot = base + len(appended)
                    appended.append(vec)
                write(slot, vec)
                added.add(slot)
                # Shop ids repeat across thousands of items: one string each, not one per item.
                shop_id = None if r.shop_id is None else sys.intern(r.shop_id)
                self._entries[slot] = _Entry(r.item_id, r.sku, shop_id, dict(r.metadata), r.source)
                self._views += is_view(r.item_id)
                self._sku_items[r.sku] += 1
                self._ids[r.item_id] = slot
                self._by_shop[shop_id].add(slot)
        if half is not None:
            if pending:
                half.put(np.fromiter(pending, np.int64, len(pending)), np.stack(list(pending.values())))
        elif appended:
            assert self._flat is not None
            self._flat.add(np.stack(appended))
        n, cfg = len(self._entries), self.ann_config
        if half is None and cfg.enabled and n >= cfg.compress_threshold:
            self._compress()  # checked every chunk: a bulk import never holds a million float32 rows
            removed, added = set(), set()  # the old approximate index is dropped with the float32 rows
        elif half is not None and n < cfg.compress_threshold // 2:
            self._decompress()
            removed, added = set(), set()
        self._update_ann(removed, added, may_build)
        self._place()

    def _compress(self) -> None:
        """float32 rows -> float16 rows, under the write lock; the approximate index is rebuilt as IVF-PQ.

        Copies a chunk at a time, so the peak is the float32 rows plus their float16 copy (at the
        default threshold of 200k x 1280: 1.02 + 0.51 GB), once."""
        rows = self._rows()
        half = HalfStore(self.dim)
        for start in range(0, len(rows), 16_384):
            half.put(np.arange(start, min(len(rows), start + 16_384)), rows[start : start + 16_384])
        self._half, self._flat = half, None
        self._ann, self._ann_size, self._build = None, 0, None  # a running IVF-Flat build is discarded when it ends
        self._unhold()
        log.info("gallery compressed: %d items as float16 rows (%.2f GB), IVF-PQ to follow", len(self._entries), half.nbytes / 1e9)

    def _decompress(self) -> None:
        """float16 rows -> float32 flat index again (the gallery shrank below half the threshold)."""
        assert self._half is not None
        flat = faiss.IndexFlatIP(self.dim)
        for _, chunk in self._half.scan():
            flat.add(chunk)
        self._flat, self._half = flat, None
        self._ann, self._ann_size, self._build = None, 0, None
        self._unhold()  # an open export keeps the float16 store it reads; nothing writes to it any more

    def _place(self) -> None:
        """Refresh the search copy of the unfiltered index (e.g. on the GPU) after a change; under the write lock.

        Not when compressed: the IVF-PQ shortlist is re-scored from the float16 rows on the CPU."""
        if self._placer is None:
            return
        source = self._ann if self._ann is not None else self._flat
        self._placed = self._placer(source) if source is not None and source.ntotal and self._half is None else None

    def export(self) -> tuple[int, list[tuple[str, str, str | None, dict[str, Any], str]], np.ndarray | HalfRows]:
        """A consistent copy of every live item: (version, [(item_id, sku, shop_id, metadata, source)], vectors [N, D]).

        Waits for an import being applied to finish, then copies under the read lock (searches go on).
        A compressed gallery's vectors come as `HalfRows`, a lazy float32 view read a slice at a time
        (never a full float32 copy: 5.1 GB at 1M x 1280); its slots stay pinned until it is read or dropped."""
        with self._applying, self._lock.read():
            slots = np.fromiter(sorted(self._entries), np.int64, len(self._entries))
            if self._views:  # views are regenerated from images at ingestion, not exported as items
                slots = slots[[not is_view(self._entries[int(s)].item_id) for s in slots]]
            items = [(e.item_id, e.sku, e.shop_id, dict(e.metadata), e.source) for e in (self._entries[int(s)] for s in slots)]
            if self._half is None:
                return self.version, items, self._vectors(slots)  # a float32 copy (below the compression threshold)
            # Exports hold `_applying`, so no other export or apply changes the pins meanwhile.
            self._pins += 1
            self._pinned = self._half
            return self.version, items, HalfRows(self._half, slots, self._unpin)

    def _unpin(self) -> None:
        """An export's rows are read (or dropped): once none is open, held slots are zeroed and reusable."""
        with self._lock.write():
            self._pins -= 1
            if not self._pins:
                self._pinned = None
                self._unhold()

    def _unhold(self) -> None:
        """Return held slots to the free list, zeroed in whichever store holds the rows now; under the write lock."""
        if not self._held:
            return
        held = np.asarray(self._held, np.int64)
        if self._half is not None:
            self._half.put(held, np.zeros((len(held), self.dim), np.float32))
        else:
            self._rows()[held] = 0.0
        self._free.extend(self._held)
        self._held = []

    def _update_ann(self, removed: set[int], added: set[int], may_build: bool = True) -> None:
        """Keep the approximate index (and one being built) in step; start or drop it by size."""
        if self._build is not None:
            self._build.touched |= removed | added
        if self._ann is not None:
            if removed:
                self._ann.remove_ids(faiss.IDSelectorBatch(np.fromiter(removed, np.int64, len(removed))))
            if added:
                slots = np.fromiter(sorted(added), np.int64, len(added))
                self._ann.add_with_ids(self._vectors(slots), slots)
        n, cfg = len(self._entries), self.ann_config
        if self._ann is not None and self._half is None and n < cfg.threshold // 2:
            self._ann = None  # small again: exact is cheaper than approximate (the caller re-places)
        stale = self._ann is None or n >= cfg.rebuild_growth * self._ann_size
        threshold = cfg.compress_threshold if self._half is not None else cfg.threshold
        if may_build and cfg.enabled and n >= threshold and stale and self._build is None:
            self._start_build()

    def _start_build(self) -> None:
        slots = np.fromiter(self._entries, np.int64, len(self._entries))
        build: IvfBuild | PqBuild
        if self._half is not None:  # reads the float16 rows as it goes: no snapshot copy
            build = PqBuild(self.dim, self.ann_config, slots, self._half.get)
        else:
            build = IvfBuild(self.dim, self.ann_config, slots, self._rows()[slots].copy())
        self._build = build
        threading.Thread(target=self._finish_build, args=(build,), name="ivf-build", daemon=True).start()

    def _finish_build(self, build: IvfBuild | PqBuild) -> None:
        """Train and fill the new index off the lock, then replay what changed meanwhile and swap."""
        try:
            index = build.run()
            with self._lock.write():
                if self._build is not build:
                    return
                if len(build.touched) > len(build.slots) // 2:
                    # Most of the gallery changed during the build (a bulk import or a replica's boot):
                    # replaying it here would hold the write lock for as long as a build; start over instead.
                    self._start_build()
                    return
                if build.touched:
                    touched = np.fromiter(build.touched, np.int64, len(build.touched))
                    index.remove_ids(faiss.IDSelectorBatch(touched))
                    live = np.array([s for s in touched.tolist() if s in self._entries], np.int64)
                    for start in range(0, len(live), ADD_ROWS):  # float32 rows a chunk at a time
                        index.add_with_ids(self._vectors(live[start : start + ADD_ROWS]), live[start : start + ADD_ROWS])
                self._ann, self._ann_size = index, len(build.slots)
                self._place()
        except Exception:  # a failed build leaves exact search in place; it is retried on further growth
            log.exception("approximate index build failed")
        finally:
            with self._lock.write():
                if self._build is build:
                    self._build = None
            build.done.set()

    def wait_for_index(self, timeout_s: float = 600.0) -> bool:
        """Block until no background index build is running (tests and benchmarks); True if none is."""
        deadline = time.monotonic() + timeout_s
        while (build := self._build) is not None:  # a build may hand over to a fresh one (see _finish_build)
            if not build.done.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def set_version(self, version: int) -> None:
        with self._lock.write():
            self.version = max(self.version, version)

    def stats(self) -> dict[str, Any]:
        with self._lock.read():
            return {
                "items": len(self._entries) - self._views,
                "skus": len(self._sku_items),
                "shops": len([s for s in self._by_shop if s is not None]),
                "dim": self.dim,
                "gallery_version": self.version,
                "index": ("ivf-pq" if self._half is not None else "ivf") if self._ann is not None else "exact",
                "index_building": self._build is not None,
            }

    def views(self, sku: str, source: str, shop_id: str | None = None, any_shop: bool = False) -> list[Hit]:
        """The live items of exactly `sku` from `source` (in `shop_id`, or in every shop with `any_shop`),
        as score-less hits in item id order: e.g. a SKU's feedback views, to cap or to remove them."""
        with self._lock.read():
            found = [e for e in self._entries.values() if e.sku == sku and e.source == source and (any_shop or e.shop_id == shop_id)]
        return [Hit(e.sku, 0.0, e.item_id, e.shop_id, e.metadata, e.source) for e in sorted(found, key=lambda e: e.item_id)]

    def closest(self, vectors: np.ndarray, sku: str, shop_id: str | None = None) -> tuple[int, float] | None:
        """Which of `vectors` [V, D] is most similar to one of the SKU's catalog images (in `shop_id`,
        or any shop when None): (its row, that similarity); None when the SKU has no catalog image."""
        with self._lock.read():
            slots = [
                s for s, e in self._entries.items() if e.sku == sku and e.source == "catalog" and (shop_id is None or e.shop_id == shop_id)
            ]
            if not slots:
                return None
            sims = np.asarray(vectors, np.float32).reshape(-1, self.dim) @ self._vectors(np.asarray(slots, np.int64)).T  # [V, S]
        best = sims.max(axis=1)
        return int(best.argmax()), float(best.max())

    def list_items(self, sku: str | None = None, shop_id: str | None = None, offset: int = 0, limit: int = 50) -> tuple[int, list[Hit]]:
        """Browse the live items: (how many match, one page of them as score-less hits), in SKU then
        item id order. `sku` matches case-insensitively anywhere in the SKU; `shop_id` exactly.
        O(matching items): a console page, not a hot path (callers run it off the event loop)."""
        needle = (sku or "").lower()
        with self._lock.read():
            slots = self._entries if shop_id is None else self._by_shop.get(shop_id, set())
            found = [self._entries[s] for s in slots]
        if self._views:
            found = [e for e in found if not is_view(e.item_id)]
        if needle:
            found = [e for e in found if needle in e.sku.lower()]
        # An early page needs only its first offset + limit entries: a bounded heap, not a full sort.
        wanted = offset + limit
        first = heapq.nsmallest(wanted, found, key=_listing_order) if wanted < len(found) // 8 else sorted(found, key=_listing_order)
        return len(found), [Hit(e.sku, 0.0, e.item_id, e.shop_id, e.metadata, e.source) for e in first[offset : offset + limit]]

    def search(self, queries: np.ndarray, k: int, shop_id: str | None = None) -> tuple[list[list[Hit]], int]:
        """Top-k SKUs per query [Q, D] (best image per SKU). Returns (hits per query, version seen)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got {list(q.shape)}")
        with self._lock.read():  # concurrent searches run together (faiss releases the GIL)
            version = self.version
            shop = None if shop_id is None else self._by_shop.get(shop_id)
            pool = len(self._entries) if shop_id is None else len(shop or ())
            if pool == 0 or k <= 0:
                return [[] for _ in range(len(q))], version
            if shop is not None and len(shop) <= self.exact_shop_max:
                return self._search_slots(q, k, np.fromiter(shop, np.int64, len(shop))), version
            if self._half is not None:
                return self._search_compressed(q, k, shop, pool), version
            assert self._flat is not None
            index: faiss.Index = self._flat
            extra = len(self._free)
            params: faiss.SearchParameters | None = None
            if self._ann is not None:
                index, extra = self._ann, 0  # dead slots are removed from the IVF, not zeroed
                params = faiss.SearchParametersIVF(nprobe=self.ann_config.nprobe)  # type: ignore[call-arg]
            if shop is None and self._placed is not None:
                index, params = self._placed, None  # the device copy; an IVF copy keeps the CPU index's nprobe
            if shop is not None:
                sel = faiss.IDSelectorBatch(np.fromiter(shop, np.int64, len(shop)))
                if self._ann is not None:
                    params = faiss.SearchParametersIVF(sel=sel, nprobe=self.ann_config.nprobe)  # type: ignore[call-arg]
                else:
                    params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
                extra = 0  # the selector only lets live slots of the shop through
            # A SKU may own several images: widen the image search until k distinct SKUs are found.
            n = min(pool, max(4 * k, 16))
            while True:
                scores, ids = index.search(q, min(n + extra, index.ntotal), params=params)
                results = [self._aggregate(s, i, k) for s, i in zip(scores, ids, strict=True)]
                if n >= pool or all(len(r) >= k for r in results):
                    return results, version
                n = min(pool, n * 4)

    def _search_compressed(self, q: np.ndarray, k: int, shop: set[int] | None, pool: int) -> list[list[Hit]]:
        """IVF-PQ shortlist, re-scored exactly from the float16 rows; exact over them while no index is built yet."""
        if self._ann is None:
            slots = shop if shop is not None else self._entries
            return self._search_slots(q, k, np.fromiter(slots, np.int64, len(slots)))
        cfg = self.ann_config
        sel = None if shop is None else faiss.IDSelectorBatch(np.fromiter(shop, np.int64, len(shop)))
        params = faiss.SearchParametersIVF(sel=sel, nprobe=cfg.nprobe)  # type: ignore[call-arg]
        n = min(pool, max(4 * k, 16))
        while True:  # widen until k distinct SKUs, as for the other indexes
            _, ids = self._ann.search(q, min(max(n, cfg.rescore), self._ann.ntotal), params=params)
            results = []
            for qi, row in zip(q, ids, strict=True):
                row = row[row >= 0]
                exact = self._half.get(row) @ qi  # type: ignore[union-attr]  # [R]
                order = np.argsort(-exact, kind="stable")
                results.append(self._aggregate(exact[order], row[order], k))
            if n >= pool or all(len(r) >= k for r in results):
                return results
            n = min(pool, n * 4)

    def _search_slots(self, q: np.ndarray, k: int, slots: np.ndarray) -> list[list[Hit]]:
        """Exact search over the given slots only: gather their rows, one matrix product."""
        if self._half is None:
            scores = q @ self._rows()[slots].T  # [Q, S]
        else:  # float16 rows, gathered and converted a chunk at a time
            scores = np.empty((len(q), len(slots)), np.float32)
            for s in range(0, len(slots), 16_384):
                scores[:, s : s + 16_384] = q @ self._half.get(slots[s : s + 16_384]).T
        out = []
        for row in scores:
            n = min(len(slots), max(4 * k, 16))
            while True:
                top = np.argpartition(-row, n - 1)[:n] if n < len(slots) else np.arange(len(slots))
                top = top[np.argsort(-row[top], kind="stable")]
                hits = self._aggregate(row[top], slots[top], k)
                if len(hits) >= k or n >= len(slots):
                    break
                n = min(len(slots), n * 4)
            out.append(hits)
        return out

    def _aggregate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Hit]:
        live = [(s, e) for s, fid in zip(scores.tolist(), ids.tolist(), strict=True) if (e := self._entries.get(fid)) is not None]
        # Equal scores are ordered by item id, not by slot: slots depend on a replica's history, and
        # two replicas holding the same items must answer the same.
        live.sort(key=lambda se: (-se[0], se[1].item_id))
        best: dict[str, Hit] = {}
        for score, e in live:  # -1 padding and zeroed (free) rows have no entry
            if e.sku not in best:
                best[e.sku] = Hit(e.sku, float(score), base_id(e.item_id), e.shop_id, e.metadata, e.source)  # a view answers as its item
                if len(best) == k:
                    break
        return list(best.values())
