"""Embedded gallery store: one SQLite file, crash-safe (WAL), for a single service process.

The table holds the current state of every item plus tombstones, each stamped with the
gallery version that last changed it, so "changes since version v" is one indexed query and
replaying it is idempotent.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from index.errors import ItemNotFound
from index.records import Record, metadata_to_json, vector_from_bytes, vector_to_bytes
from index.sqlite_util import locked

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    namespace TEXT NOT NULL,
    item_id   TEXT NOT NULL,
    sku       TEXT NOT NULL,
    shop_id   TEXT,
    metadata  TEXT NOT NULL DEFAULT '{}',
    dim       INTEGER NOT NULL DEFAULT 0,
    vector    BLOB,
    version   INTEGER NOT NULL,
    deleted   INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, item_id)
);
CREATE INDEX IF NOT EXISTS items_by_version ON items (namespace, version);
CREATE INDEX IF NOT EXISTS items_by_sku ON items (sku);
CREATE INDEX IF NOT EXISTS items_by_item ON items (item_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('version', 0);
CREATE TABLE IF NOT EXISTS thumbnails (item_id TEXT PRIMARY KEY, jpeg BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS local_features (item_id TEXT PRIMARY KEY, data BLOB NOT NULL);
"""
# Added after the first release: a gallery file written before it gets the column on open.
_SOURCE_COLUMN = "ALTER TABLE items ADD COLUMN source TEXT NOT NULL DEFAULT 'catalog'"


class SQLiteStore:
    """`index.records.Store` on a local SQLite file (":memory:" for tests)."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: writes are serialised anyway, and
        # check_same_thread=False lets the service's worker threads share it.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss too
            self._db.executescript(_SCHEMA)
            if "source" not in {row[1] for row in self._db.execute("PRAGMA table_info(items)")}:
                self._db.execute(_SOURCE_COLUMN)

    def _next_version(self) -> int:
        (v,) = self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'version' RETURNING value").fetchone()
        return int(v)

    def upsert(self, namespace: str, records: list[Record]) -> int:
        rows = []
        for r in records:
            if r.vector is None:
                raise ValueError("upsert needs a vector for every record")
            rows.append(
                (
                    namespace,
                    r.item_id,
                    r.sku,
                    r.shop_id,
                    metadata_to_json(r.metadata),
                    int(r.vector.shape[0]),
                    vector_to_bytes(r.vector),
                    r.source,
                )
            )
        with locked(self._lock):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                v = self._next_version()
                self._db.executemany(
                    "INSERT INTO items (namespace, item_id, sku, shop_id, metadata, dim, vector, source, version, deleted) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT (namespace, item_id) DO UPDATE SET "
                    "sku=excluded.sku, shop_id=excluded.shop_id, metadata=excluded.metadata, dim=excluded.dim, "
                    "vector=excluded.vector, source=excluded.source, version=excluded.version, deleted=0",
                    [(*row, v) for row in rows],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return v

    def _tombstone(self, where: str, params: tuple[object, ...], what: str) -> tuple[int, list[str]]:
        with locked(self._lock):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [row[0] for row in self._db.execute(f"SELECT DISTINCT item_id FROM items WHERE deleted = 0 AND {where}", params)]
                if not ids:
                    raise ItemNotFound(what)
                v = self._next_version()
                self._db.execute(f"UPDATE items SET deleted = 1, vector = NULL, version = ? WHERE deleted = 0 AND {where}", (v, *params))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return v, sorted(ids)

    def delete_items(self, item_ids: list[str]) -> tuple[int, list[str]]:
        marks = ",".join("?" * len(item_ids))
        return self._tombstone(f"item_id IN ({marks})", tuple(item_ids), f"no item with id {', '.join(item_ids)}")

    def delete_sku(self, sku: str, shop_id: str | None = None) -> tuple[int, list[str]]:
        if shop_id is None:
            return self._tombstone("sku = ?", (sku,), f"no items with sku {sku!r}")
        return self._tombstone("sku = ? AND shop_id = ?", (sku, shop_id), f"no items with sku {sku!r} in shop {shop_id!r}")

    def changes_since(self, namespace: str, version: int) -> list[Record]:
        with locked(self._lock):
            rows = self._db.execute(
                "SELECT item_id, sku, shop_id, metadata, dim, vector, version, deleted, source FROM items "
                "WHERE namespace = ? AND version > ? ORDER BY version",
                (namespace, version),
            ).fetchall()
        out = []
        for item_id, sku, shop_id, metadata, dim, vector, v, deleted, source in rows:
            vec = None if deleted else vector_from_bytes(vector, dim)
            out.append(Record(item_id, sku, shop_id, vec, json.loads(metadata), int(v), bool(deleted), source))
        return out

    def put_thumbnail(self, item_id: str, jpeg: bytes) -> None:
        with locked(self._lock):
            self._db.execute("INSERT OR REPLACE INTO thumbnails (item_id, jpeg) VALUES (?, ?)", (item_id, jpeg))

    def thumbnail(self, item_id: str) -> bytes | None:
        with locked(self._lock):
            row = self._db.execute("SELECT jpeg FROM thumbnails WHERE item_id = ?", (item_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def delete_thumbnails(self, item_ids: list[str]) -> None:
        with locked(self._lock):
            # Only ids that no namespace still holds live: a thumbnail is shared by every model's copy.
            self._db.executemany(
                "DELETE FROM thumbnails WHERE item_id = ? AND NOT EXISTS (SELECT 1 FROM items WHERE item_id = ? AND deleted = 0)",
                [(i, i) for i in item_ids],
            )

    def put_features(self, item_id: str, data: bytes) -> None:
        with locked(self._lock):
            self._db.execute("INSERT OR REPLACE INTO local_features (item_id, data) VALUES (?, ?)", (item_id, data))

    def features(self, item_ids: list[str]) -> dict[str, bytes]:
        if not item_ids:
            return {}
        marks = ",".join("?" * len(item_ids))
        with locked(self._lock):
            rows = self._db.execute(f"SELECT item_id, data FROM local_features WHERE item_id IN ({marks})", item_ids).fetchall()
        return {str(i): bytes(d) for i, d in rows}

    def delete_features(self, item_ids: list[str]) -> None:
        with locked(self._lock):
            self._db.executemany(
                "DELETE FROM local_features WHERE item_id = ? AND NOT EXISTS (SELECT 1 FROM items WHERE item_id = ? AND deleted = 0)",
                [(i, i) for i in item_ids],
            )

    def namespace_counts(self) -> dict[str, int]:
        with locked(self._lock):
            rows = self._db.execute("SELECT namespace, COUNT(*) FROM items WHERE deleted = 0 GROUP BY namespace").fetchall()
        return {str(ns): int(n) for ns, n in rows}

    def version(self) -> int:
        with locked(self._lock):
            (v,) = self._db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        return int(v)

    def close(self) -> None:
        with locked(self._lock):
            self._db.close()
