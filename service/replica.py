"""This process's copy of the gallery: a faiss index kept in step with the durable store.

Writes go to the store first (durable, versioned); the local index then catches up by applying
the store's changes since the version it has, so the same code path serves the embedded store
(where this process is the only writer) and shared stores (where others write too).
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import numpy as np

from index.gallery import Gallery, Hit
from index.records import Record, Store


class GalleryReplica:
    def __init__(self, store: Store, namespace: str, dim: int) -> None:
        self.store = store
        self.namespace = namespace  # the model version: vectors of other models are never searched
        self.gallery = Gallery(dim)
        self._sync_lock = threading.Lock()

    def sync(self) -> int:
        """Apply every change the store has beyond our version; returns the version now applied."""
        with self._sync_lock:
            changes = self.store.changes_since(self.namespace, self.gallery.version)
            self.gallery.apply(changes)
            # Deletes in other namespaces also advance the global version.
            self.gallery.set_version(self.store.version())
            return self.gallery.version

    async def add(
        self, vector: np.ndarray, sku: str, shop_id: str | None, item_id: str | None, metadata: dict[str, Any]
    ) -> tuple[str, int]:
        item_id = item_id or uuid.uuid4().hex
        rec = Record(item_id, sku, shop_id, vector.astype(np.float32), metadata)
        version = await asyncio.to_thread(self.store.upsert, self.namespace, [rec])
        await asyncio.to_thread(self.sync)
        return item_id, version

    async def delete_item(self, item_id: str) -> tuple[int, list[str]]:
        version, ids = await asyncio.to_thread(self.store.delete_items, [item_id])
        await asyncio.to_thread(self.sync)
        return version, ids

    async def delete_sku(self, sku: str, shop_id: str | None) -> tuple[int, list[str]]:
        version, ids = await asyncio.to_thread(self.store.delete_sku, sku, shop_id)
        await asyncio.to_thread(self.sync)
        return version, ids

    def search(self, queries: np.ndarray, k: int, shop_id: str | None) -> tuple[list[list[Hit]], int]:
        return self.gallery.search(queries, k, shop_id)

    def health(self) -> list[str]:
        """Reasons this replica's gallery cannot be trusted right now (empty = healthy); catches up if behind."""
        try:
            if self.store.version() > self.gallery.version:
                self.sync()
        except Exception as exc:  # any store failure means we cannot vouch for the gallery
            return [f"gallery_store_unavailable: {type(exc).__name__}"]
        return []

    def stats(self) -> dict[str, Any]:
        return {**self.gallery.stats(), "namespace": self.namespace}
