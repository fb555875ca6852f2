"""Request records and feedback verdicts: the record type, the store protocol, the SQLite store.

Every recognition answer carries a `request_id`; at answer time the service keeps a small record
of that request (its clip vector and frame embeddings as raw float32 bytes, never pickles; the
sampled frames as JPEG only when configured) for a bounded time, in the gallery's store, so that
any replica can take the feedback for any request. A verdict (`POST /v1/feedback`) is kept with a
copy of the record for the retention period: it outlives the request record, and it is what the
offline retrain job exports. A second verdict on one request replaces the first.

Bounded: records expire after their TTL (SQLite: purged on write; Redis: key TTL), and at most
`max_records` are kept (the oldest go first).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from index.errors import RequestNotFound
from index.records import vector_to_bytes
from index.sqlite_util import locked

Verdict = Literal["correct", "wrong", "none_of_these"]
VERDICTS: tuple[str, ...] = ("correct", "wrong", "none_of_these")


@dataclass(frozen=True)
class RequestRecord:
    """What the service kept of one answered request."""

    request_id: str
    kind: str  # clip, image or timeline
    model_version: str  # the namespace its vectors belong to
    shop_id: str | None
    created_at: float
    answer: list[dict[str, Any]]  # the answered SKUs, best first: [{sku, score, item_id}]
    vector: np.ndarray | None  # [D] float32 clip vector (None for a timeline)
    frame_emb: np.ndarray | None  # [N, D] float32 frame embeddings
    frames: list[bytes] = field(default_factory=list)  # JPEG per sampled frame, only with RICE_FEEDBACK_KEEP_FRAMES
    regions: np.ndarray | None = None  # [R, D] float32 region vectors (the region stage's), when it ran

    @property
    def top1(self) -> str | None:
        return str(self.answer[0]["sku"]) if self.answer else None


@dataclass(frozen=True)
class Feedback:
    """A verdict on an answered request, with the record it judges."""

    request_id: str
    verdict: str  # one of VERDICTS
    sku: str | None  # the right SKU: the top-1 when correct, the correction when wrong, None when none of these
    at: float
    record: RequestRecord


# -- one wire format for both stores: a JSON header plus raw little-endian float32 / JPEG bytes ----


def pack_record(r: RequestRecord) -> tuple[str, bytes, bytes, bytes]:
    """(header JSON, clip vector bytes, frame embedding bytes, concatenated JPEGs)."""
    dim = 0 if r.vector is None else int(r.vector.shape[0])
    frames_n = 0 if r.frame_emb is None else int(r.frame_emb.shape[0])
    header = {
        "request_id": r.request_id,
        "kind": r.kind,
        "model_version": r.model_version,
        "shop_id": r.shop_id,
        "created_at": r.created_at,
        "answer": r.answer,
        "dim": dim,
        "frames_n": frames_n,
        "jpeg_sizes": [len(j) for j in r.frames],
        "regions_n": 0 if r.regions is None else int(r.regions.shape[0]),
    }
    # The vector blob holds the clip vector, then the region vectors: [1 + R, D].
    regions = b"" if r.regions is None else vector_to_bytes(r.regions.reshape(-1))
    vec = b"" if r.vector is None else vector_to_bytes(r.vector) + regions
    emb = b"" if r.frame_emb is None else vector_to_bytes(r.frame_emb.reshape(-1))
    return json.dumps(header), vec, emb, b"".join(r.frames)


def unpack_record(header: str | bytes, vec: bytes, emb: bytes, jpegs: bytes) -> RequestRecord:
    h = json.loads(header)
    dim, n = int(h["dim"]), int(h["frames_n"])
    vector = np.frombuffer(vec, dtype="<f4", count=dim).astype(np.float32) if dim else None
    nr = int(h.get("regions_n", 0))
    regions = np.frombuffer(vec, dtype="<f4", count=nr * dim, offset=dim * 4).astype(np.float32).reshape(nr, dim) if dim and nr else None
    frame_emb = np.frombuffer(emb, dtype="<f4", count=n * dim).astype(np.float32).reshape(n, dim) if dim and n else None
    frames, at = [], 0
    for size in h["jpeg_sizes"]:
        frames.append(bytes(jpegs[at : at + size]))
        at += size
    created = float(h["created_at"])
    return RequestRecord(
        h["request_id"], h["kind"], h["model_version"], h["shop_id"], created, h["answer"], vector, frame_emb, frames, regions
    )


@runtime_checkable
class FeedbackStore(Protocol):
    """Request records (short-lived) and verdicts (retained), shared by every replica."""

    def put_request(self, record: RequestRecord, ttl_s: float) -> None:
        """Keep a record until created_at + ttl_s (and while among the newest `max_records`)."""
        ...

    def get_request(self, request_id: str, now: float) -> RequestRecord:
        """The live record; raises RequestNotFound when unknown or expired."""
        ...

    def put_feedback(self, feedback: Feedback, retention_s: float) -> Feedback | None:
        """Store a verdict (kept until feedback.at + retention_s), replacing any earlier one on the
        same request; returns the one it replaced, or None."""
        ...

    def get_feedback(self, request_id: str, now: float) -> Feedback | None:
        """The live verdict on a request, or None."""
        ...

    def feedback_since(self, since: float, now: float) -> Iterator[Feedback]:
        """Live verdicts given at or after `since`, oldest first (the retrain export)."""
        ...

    def purge(self, now: float) -> int:
        """Drop expired records and verdicts; returns how many went."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback_requests (
    request_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    header     TEXT NOT NULL,
    vector     BLOB NOT NULL,
    frame_emb  BLOB NOT NULL,
    frames     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_requests_by_time ON feedback_requests (created_at);
CREATE INDEX IF NOT EXISTS feedback_requests_by_expiry ON feedback_requests (expires_at);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    verdict    TEXT NOT NULL,
    sku        TEXT,
    at         REAL NOT NULL,
    expires_at REAL NOT NULL,
    header     TEXT NOT NULL,
    vector     BLOB NOT NULL,
    frame_emb  BLOB NOT NULL,
    frames     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_time ON feedback (at);
CREATE INDEX IF NOT EXISTS feedback_by_expiry ON feedback (expires_at);
"""

_PURGE_EVERY = 64  # writes between purges of expired rows (and trims to the cap)


class SQLiteFeedbackStore:
    """`FeedbackStore` in a SQLite file (the gallery's, when embedded): WAL, one lock per connection."""

    def __init__(self, path: str | Path, max_records: int = 10_000) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        self.max_records = max_records
        self._writes = 0
        with locked(self._lock):
            self._db.execute("PRAGMA journal_mode=WAL")
            # Records are written on every answer: no fsync per commit (WAL + NORMAL survives a crash of
            # the process; a power loss may drop the last records, which only means no feedback on them).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._purge(time.time())  # what expired while no replica wrote (also every _PURGE_EVERY writes)

    def put_request(self, record: RequestRecord, ttl_s: float) -> None:
        header, vec, emb, jpegs = pack_record(record)
        with locked(self._lock):
            self._db.execute(
                "INSERT OR REPLACE INTO feedback_requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                (record.request_id, record.created_at, record.created_at + ttl_s, header, vec, emb, jpegs),
            )
            self._writes += 1
            if self._writes % _PURGE_EVERY == 0:
                self._purge(record.created_at)

    def get_request(self, request_id: str, now: float) -> RequestRecord:
        with locked(self._lock):
            row = self._db.execute(
                "SELECT header, vector, frame_emb, frames FROM feedback_requests WHERE request_id = ? AND expires_at > ?", (request_id, now)
            ).fetchone()
        if row is None:
            raise RequestNotFound(f"no request with id {request_id} (unknown, or expired)")
        return unpack_record(*row)

    def put_feedback(self, feedback: Feedback, retention_s: float) -> Feedback | None:
        header, vec, emb, jpegs = pack_record(feedback.record)
        with locked(self._lock):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                old = self._feedback(feedback.request_id, feedback.at)
                self._db.execute(
                    "INSERT OR REPLACE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (feedback.request_id, feedback.verdict, feedback.sku, feedback.at, feedback.at + retention_s, header, vec, emb, jpegs),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._writes += 1
            if self._writes % _PURGE_EVERY == 0:
                self._purge(feedback.at)
        return old

    _FEEDBACK_COLUMNS = "request_id, verdict, sku, at, header, vector, frame_emb, frames"

    def _feedback(self, request_id: str, now: float) -> Feedback | None:
        row = self._db.execute(
            f"SELECT {self._FEEDBACK_COLUMNS} FROM feedback WHERE request_id = ? AND expires_at > ?", (request_id, now)
        ).fetchone()
        return None if row is None else _feedback_from_row(row)

    def get_feedback(self, request_id: str, now: float) -> Feedback | None:
        with locked(self._lock):
            return self._feedback(request_id, now)

    def feedback_since(self, since: float, now: float) -> Iterator[Feedback]:
        with locked(self._lock):
            rows = self._db.execute(
                f"SELECT {self._FEEDBACK_COLUMNS} FROM feedback WHERE at >= ? AND expires_at > ? ORDER BY at", (since, now)
            ).fetchall()
        for row in rows:
            yield _feedback_from_row(row)

    def _purge(self, now: float) -> int:
        """Expired rows, then records beyond the cap (oldest first); under the lock."""
        gone = self._db.execute("DELETE FROM feedback_requests WHERE expires_at <= ?", (now,)).rowcount
        gone += self._db.execute("DELETE FROM feedback WHERE expires_at <= ?", (now,)).rowcount
        gone += self._db.execute(
            "DELETE FROM feedback_requests WHERE request_id IN "
            "(SELECT request_id FROM feedback_requests ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
            (self.max_records,),
        ).rowcount
        return int(gone)

    def purge(self, now: float) -> int:
        with locked(self._lock):
            return self._purge(now)

    def close(self) -> None:
        with locked(self._lock):
            self._db.close()


def _feedback_from_row(row: tuple[Any, ...]) -> Feedback:
    request_id, verdict, sku, at, header, vec, emb, jpegs = row
    return Feedback(request_id, verdict, sku, float(at), unpack_record(header, vec, emb, jpegs))
