"""This process's copy of the gallery: a faiss index kept in step with the durable store.

Writes go to the store first (durable, versioned); the local index then catches up:

- embedded store (SQLite, this process is the only writer): by pulling the store's changes since
  the version it has, right after each write;
- shared store with a change log (Redis, many replicas write): a `Follower` thread applies the
  log as it grows; a write here waits (bounded) until the follower has applied it.

Either way every answer reports the gallery version it saw, and `wait_for_version` gives
read-your-writes: a request may ask for a version at least as new as one it was told.

On a shop-sharded deployment (`index.shards`) the replica follows its own shard's store only, and
routes every gallery write by shop: a write for a shop of another shard goes durably into that
shard's store (`ShardStores`) and is answered with that shard's version, without waiting here
(this replica never holds that shard). Routes and feedback enrichment write through these methods
alike, so no caller routes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from typing import Any, cast

import numpy as np

from index.ann import AnnConfig, IndexPlacer
from index.errors import InvalidBulk, ItemNotFound, StoreUnavailable
from index.follower import Follower
from index.gallery import Gallery, Hit
from index.records import ChangeLog, FeatureStore, Namespaces, Record, Store, Thumbnails
from index.shards import ShardPlan, ShardStores
from index.views import is_view, view_ids

log = logging.getLogger("rice.replica")


class GalleryReplica:
    def __init__(
        self,
        store: Store,
        namespace: str,
        dim: int,
        ann: AnnConfig | None = None,
        wait_s: float = 2.0,
        placer: IndexPlacer | None = None,
        shards: ShardStores | None = None,
    ) -> None:
        """`wait_s` bounds how long a write waits to become visible here, and readiness's patience with lag;
        `placer` puts the search index on the GPUs (see `index.ann.default_placer`); `shards`, on a
        sharded deployment: `store` is this replica's shard's, `shards` opens the others' for writes."""
        self.store = store
        self.shards = shards
        self.plan = shards.plan if shards is not None else ShardPlan()
        self.namespace = namespace  # the model version: vectors of other models are never searched
        self.dim = dim
        self.ann = ann
        self.wait_s = wait_s
        self.gallery = Gallery(dim, ann, placer=placer)
        self._sync_lock = threading.Lock()
        self._behind_since: float | None = None
        self.follower: Follower | None = None
        if isinstance(store, ChangeLog):  # a store other processes write to: follow its log
            self.follower = Follower(store, namespace, lambda: Gallery(dim, ann, placer=placer), lambda: self.gallery, self._swap)

    def _swap(self, gallery: Gallery) -> None:
        self.gallery = gallery  # a single reference assignment: a search holds one gallery or the other

    def start(self) -> None:
        """Load the gallery (and start following the store's log when it has one)."""
        if self.follower is not None:
            self.follower.start()
        else:
            self.sync()

    def stop(self) -> None:
        """Stop following the store's log (and close the other shards' stores opened for writes)."""
        if self.follower is not None:
            self.follower.stop()
        if self.shards is not None:
            self.shards.close()

    # -- shards: where a shop's writes go ----------------------------------------------------------

    def holds(self, shop_id: str | None) -> bool:
        """Whether this replica's gallery holds `shop_id`'s items (always, unsharded)."""
        return self.plan.is_local(shop_id)

    def shard_of(self, shop_id: str | None) -> int:
        """The shard a write for `shop_id` goes to (0 unsharded; ShopRequired sharded without a shop)."""
        self.plan.require_shop(shop_id)
        return self.plan.of(shop_id) if shop_id is not None else self.plan.shard

    def _store_of(self, shard: int) -> Store:
        if shard == self.plan.shard:
            return self.store
        assert self.shards is not None  # a shard other than ours exists only when sharded
        return self.shards.store(shard)

    def _target(self, shop_id: str | None) -> tuple[Store, bool]:
        """The store a write for `shop_id` goes to, and whether it is this replica's own."""
        shard = self.shard_of(shop_id)
        return self._store_of(shard), shard == self.plan.shard

    def sync(self) -> int:
        """Apply every change the store has beyond our version; returns the version now applied."""
        if self.follower is not None:  # the follower applies; wait (bounded) until it has the store's head
            target = self.store.version()
            self._wait_blocking(target, self.wait_s)
            return self.gallery.version
        with self._sync_lock:
            # Read the head first: every change up to it is in the changes read next, so claiming
            # it cannot skip a change that a concurrent writer commits in between.
            head = self.store.version()
            changes = self.store.changes_since(self.namespace, self.gallery.version)
            self.gallery.apply(changes)
            self.gallery.set_version(head)  # deletes in other namespaces also advance the version
            return self.gallery.version

    def _wait_blocking(self, version: int, timeout_s: float) -> bool:
        assert self.follower is not None
        deadline = time.monotonic() + timeout_s
        with self.follower.progress:
            while self.gallery.version < version:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.follower.progress.wait(min(left, 0.05))
        return True

    async def wait_for_version(self, version: int, timeout_s: float | None = None) -> bool:
        """Wait until this replica has applied `version` (read-your-writes); False on timeout."""
        if self.gallery.version >= version:
            return True
        timeout = self.wait_s if timeout_s is None else timeout_s
        if self.follower is None:
            await asyncio.to_thread(self._pull)
            return self.gallery.version >= version
        deadline = time.monotonic() + timeout
        while self.gallery.version < version:  # polling keeps the event loop free and holds no thread
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    def _pull(self) -> None:
        self.sync()  # StoreUnavailable reaches the client as 503 through the error table

    async def _write(self, fn: Any, *args: Any, here: bool = True) -> Any:
        """Run a store write; when it went to this replica's store (`here`), also wait until it is visible here."""
        result = await asyncio.to_thread(fn, *args)  # StoreUnavailable: 503 through the error table
        if not here:  # another shard's store: its own replicas apply it from their log
            return result
        version = result if isinstance(result, int) else result[0]
        # Durable now; make it visible here before answering (bounded: another replica's backlog
        # must not hold this answer forever; the client can still ask for the version later).
        if self.follower is None:
            await asyncio.to_thread(self._pull)
        else:
            await self.wait_for_version(version)
        return result

    async def add(
        self,
        vector: np.ndarray,
        sku: str,
        shop_id: str | None,
        item_id: str | None,
        metadata: dict[str, Any],
        thumbnail: bytes | None = None,
        features: bytes | None = None,
        source: str = "catalog",
        views: np.ndarray | None = None,
    ) -> tuple[str, int]:
        """Upsert one item. Its thumbnail and local features (when the store keeps them) are written
        first, so an item that any replica can find always has them. `views` [V, D]: extra vectors
        of the item (gallery-side views, `index.views`), written with it under one version; a
        replaced item's views beyond V are removed. Goes to `shop_id`'s shard (see the module docstring)."""
        store, here = self._target(shop_id)
        item_id = item_id or uuid.uuid4().hex
        if thumbnail is not None and isinstance(store, Thumbnails):
            await asyncio.to_thread(store.put_thumbnail, item_id, thumbnail)
        if features is not None and isinstance(store, FeatureStore):
            await asyncio.to_thread(store.put_features, item_id, features)
        n = 0 if views is None else len(views)
        # Another shard's gallery is not held here: try its possible stale views (none live: no version).
        stale = [v for v in view_ids(item_id)[n:] if not here or self.gallery.has(v)]
        if stale:  # a replaced item that had more views: they go first (the item itself stays findable)
            with contextlib.suppress(ItemNotFound):  # another writer removed them already
                await self._write(store.delete_items, stale, here=here)
        recs = [Record(item_id, sku, shop_id, vector.astype(np.float32), metadata, source=source)]
        if views is not None and n:
            recs += [
                Record(v, sku, shop_id, vec.astype(np.float32), metadata, source=source)
                for v, vec in zip(view_ids(item_id, n), views, strict=True)
            ]
        version = await self._write(store.upsert, self.namespace, recs, here=here)
        return item_id, int(version)

    async def put_thumbnail(self, item_id: str, jpeg: bytes, shop_id: str | None) -> None:
        """Store an item's thumbnail in its shop's shard (a bulk import's images, before its rows)."""
        store, _ = self._target(shop_id)
        if isinstance(store, Thumbnails):
            await asyncio.to_thread(store.put_thumbnail, item_id, jpeg)

    async def put_features(self, item_id: str, data: bytes, shop_id: str | None) -> None:
        """Store an item's local features in its shop's shard (a bulk import's, before its rows)."""
        store, _ = self._target(shop_id)
        if isinstance(store, FeatureStore):
            await asyncio.to_thread(store.put_features, item_id, data)

    async def _forget_thumbnails(self, ids: list[str], store: Store | None = None) -> None:
        store = self.store if store is None else store
        if isinstance(store, Thumbnails):
            await asyncio.to_thread(store.delete_thumbnails, ids)
        if isinstance(store, FeatureStore):
            await asyncio.to_thread(store.delete_features, ids)

    async def add_bulk(self, records: list[Record]) -> int:
        """Store many records under one gallery version, all or nothing (a bulk import), then make
        them visible here; the local index applies them in chunks, so searches keep running.
        Sharded: see `import_bulk`; the version is `answer_version`'s."""
        return self.answer_version(await self.import_bulk(records))

    async def import_bulk(self, records: list[Record]) -> dict[int, int]:
        """A bulk import, split by shard: {shard: the gallery version its part was stored under}.
        Every row is checked first (sharded: each needs a shop id, InvalidBulk naming the row); each
        shard's part is then all or nothing, other shards' parts first, this replica's last (and waited for)."""
        parts = self._split(records)
        versions: dict[int, int] = {}
        for shard in sorted(parts, key=lambda s: s == self.plan.shard):  # ours last
            here = shard == self.plan.shard
            versions[shard] = int(await self._write(self._store_of(shard).upsert, self.namespace, parts[shard], here=here))
        return versions

    def check_bulk(self, records: list[Record]) -> None:
        """InvalidBulk (naming the row) when a sharded import has a row without a shop id."""
        self._split(records)

    def _split(self, records: list[Record]) -> dict[int, list[Record]]:
        if not self.plan.sharded:
            return {self.plan.shard: records}
        parts: dict[int, list[Record]] = {}
        for row, r in enumerate(records, 1):
            if r.shop_id is None:
                raise InvalidBulk(
                    f"items row {row} (item {r.item_id!r}): shop_id is required on a sharded deployment "
                    f"({self.plan.shards} shards by shop): every row goes to its shop's shard"
                )
            parts.setdefault(self.plan.of(r.shop_id), []).append(r)
        return parts or {self.plan.shard: []}

    def answer_version(self, versions: dict[int, int]) -> int:
        """The one `gallery_version` of a write to several shards: this replica's shard's, else the lowest shard's."""
        return versions.get(self.plan.shard, versions[min(versions)])

    async def delete_item(self, item_id: str, shop_id: str | None = None) -> tuple[int, list[str]]:
        """Delete one item and its views (`index.views`); returns (version, [item_id]). Sharded: in
        `shop_id`'s shard (required there: an item id alone does not say which shard holds it)."""
        store, here = self._target(shop_id)
        result = await self._write(store.delete_items, [item_id, *view_ids(item_id)], here=here)
        version, ids = cast(tuple[int, list[str]], result)
        ids = [i for i in ids if not is_view(i)]
        await self._forget_thumbnails(ids, store)
        return version, ids

    async def delete_items(self, item_ids: list[str]) -> tuple[int, list[str]]:
        """Remove several items under one version (e.g. a SKU's feedback views); ItemNotFound if none were live."""
        result = cast(tuple[int, list[str]], await self._write(self.store.delete_items, item_ids))
        await self._forget_thumbnails(result[1])
        return result

    async def delete_sku(self, sku: str, shop_id: str | None) -> tuple[int, list[str]]:
        """Delete a SKU's items (one shop's if given; sharded: `shop_id`'s shard, a shop required)."""
        store, here = self._target(shop_id)
        version, ids = cast(tuple[int, list[str]], await self._write(store.delete_sku, sku, shop_id, here=here))
        ids = [i for i in ids if not is_view(i)]  # the SKU's views go with it
        await self._forget_thumbnails(ids, store)
        return version, ids

    def thumbnail(self, item_id: str) -> bytes | None:
        """The item's catalog thumbnail from the store (None when it has none or keeps none). Blocking."""
        return self.store.thumbnail(item_id) if isinstance(self.store, Thumbnails) else None

    def features(self, item_ids: list[str]) -> dict[str, bytes]:
        """The stored local features of those items that have some (none when the store keeps none). Blocking."""
        return self.store.features(item_ids) if isinstance(self.store, FeatureStore) else {}

    def other_namespaces(self) -> dict[str, int]:
        """Live items of other models' namespaces, asked only while this one is empty (the
        model-switch trap: a new model serving an empty gallery beside a full one). Blocking."""
        if len(self.gallery) or not isinstance(self.store, Namespaces):
            return {}
        return {ns: n for ns, n in self.store.namespace_counts().items() if ns != self.namespace and n > 0}

    def namespace_warning(self, others: dict[str, int] | None = None) -> str | None:
        """A sentence for the log and /v1/info when this model's gallery is empty but another's is
        not, saying how to fix it; None otherwise. Blocking (asks the store) unless `others` is given."""
        others = self.other_namespaces() if others is None else others
        if not others:
            return None
        ns, n = max(others.items(), key=lambda kv: kv[1])
        return (
            f"the served model {self.namespace} has an empty gallery, but {n} items are stored under model {ns}: "
            "galleries are per model, so embed the catalog for this one with "
            "`rice reindex --checkpoint <this model's checkpoint> --catalog <catalog> --url <this server>`"
        )

    def search(self, queries: np.ndarray, k: int, shop_id: str | None) -> tuple[list[list[Hit]], int]:
        return self.gallery.search(queries, k, shop_id)

    def lag(self) -> int:
        """Versions the store is ahead of this replica (0 for the embedded store)."""
        return self.follower.lag if self.follower is not None else 0

    def lag_seconds(self) -> float:
        """How long this replica has been behind the store (0 = in sync); the rice_gallery_lag_seconds gauge."""
        if self.lag() == 0:
            self._behind_since = None
            return 0.0
        self._behind_since = self._behind_since or time.monotonic()
        return time.monotonic() - self._behind_since

    def health(self) -> list[str]:
        """Reasons this replica's gallery cannot be trusted right now (empty = healthy)."""
        f = self.follower
        if f is None:  # embedded store: catch up if behind
            try:
                if self.store.version() > self.gallery.version:
                    self.sync()
            except StoreUnavailable as exc:  # the store failed: we cannot vouch for the gallery
                return [f"gallery_store_unavailable: {type(exc.__cause__ or exc).__name__}"]  # e.g. OperationalError
            except Exception as exc:  # a bug, not an outage: keep the traceback, still report unready
                log.exception("gallery health check failed")
                return [f"gallery_sync_failed: {type(exc).__name__}"]
            return []
        reasons = []
        if not f.connected:
            reasons.append("redis_unreachable")
        if f.error is not None:
            reasons.append(f"gallery_follower_failing: {f.error.split(':', 1)[0]}")
        if not f.running:
            reasons.append("gallery_follower_stopped")
        # Behind is normal for a few milliseconds after every write elsewhere; only a lag that lasts
        # longer than a write is allowed to wait for it makes the replica unready.
        if self.lag_seconds() > self.wait_s:
            reasons.append("gallery_behind")
        return reasons

    def stats(self) -> dict[str, Any]:
        return {**self.gallery.stats(), "namespace": self.namespace}
