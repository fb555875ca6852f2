"""Timeline jobs: the record, the store protocol, and the embedded (SQLite) store.

Jobs live beside the gallery: in the gallery's SQLite file when embedded, in Redis when
configured (`index.redis_jobs`), so every replica sharing a gallery also shares its jobs: any
replica answers a job's status, and a replica that dies mid-job leaves a lease that runs out, after
which another replica claims the job and runs it again from the start.

The store's status is the truth: cancelling sets `cancelled` at once, and the replica running the
job learns it on its next heartbeat (which then answers False) and stops.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from index.errors import JobNotFound
from index.sqlite_util import locked

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    status: JobStatus
    progress: float  # 0..1
    params: dict[str, Any]  # the request's options, as JSON
    upload_path: str  # the recording, in the job directory every replica can read
    created_at: float
    updated_at: float
    owner: str | None = None  # the replica holding the lease while running
    lease_until: float = 0.0
    attempts: int = 0  # claims so far (a job that keeps killing replicas is given up)
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None  # {code, message} when failed


@runtime_checkable
class JobStore(Protocol):
    """Durable job records shared by every replica of a deployment."""

    def create(self, job_id: str, params: dict[str, Any], upload_path: str, now: float) -> JobRecord:
        """A new queued job."""
        ...

    def get(self, job_id: str) -> JobRecord:
        """The job's record; raises JobNotFound."""
        ...

    def claim(self, owner: str, lease_s: float, now: float, max_attempts: int) -> JobRecord | None:
        """Take the oldest queued job, or a running one whose lease ran out (its replica died), and
        mark it running for `owner` until now + lease_s. A job already claimed `max_attempts` times
        is failed instead of claimed again. None when there is nothing to run."""
        ...

    def heartbeat(self, job_id: str, owner: str, progress: float, lease_s: float, now: float) -> bool:
        """Extend the lease and record progress; False when the job is no longer `owner`'s to run
        (cancelled, or claimed by another replica after the lease ran out): stop working on it."""
        ...

    def finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus,
        now: float,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> bool:
        """Record the end (done, failed, or back to queued on a graceful shutdown) if `owner`
        still holds the job; False otherwise (it was cancelled meanwhile: that status stands)."""
        ...

    def cancel(self, job_id: str, now: float) -> JobRecord:
        """Cancel a queued or running job (a finished one is returned unchanged); raises JobNotFound."""
        ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    progress    REAL NOT NULL DEFAULT 0,
    params      TEXT NOT NULL,
    upload_path TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    owner       TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    result      TEXT,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, created_at);
"""

_COLUMNS = "job_id, status, progress, params, upload_path, created_at, updated_at, owner, lease_until, attempts, result, error"


def record_from_row(row: tuple[Any, ...]) -> JobRecord:
    job_id, status, progress, params, upload_path, created, updated, owner, lease, attempts, result, error = row
    return JobRecord(
        job_id,
        status,
        float(progress),
        json.loads(params),
        upload_path,
        float(created),
        float(updated),
        owner,
        float(lease),
        int(attempts),
        json.loads(result) if result else None,
        json.loads(error) if error else None,
    )


def gave_up(attempts: int) -> dict[str, str]:
    return {"code": "job_abandoned", "message": f"the job stopped {attempts} times without finishing (its replica died each time)"}


class SQLiteJobStore:
    """`JobStore` in a SQLite file (the gallery's, when embedded). WAL, so the replica processes
    on one host may share it; BEGIN IMMEDIATE makes a claim atomic across them."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._lock = threading.Lock()
        with locked(self._lock):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with locked(self._lock):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _get(self, job_id: str) -> JobRecord:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id}")
        return record_from_row(row)

    def create(self, job_id: str, params: dict[str, Any], upload_path: str, now: float) -> JobRecord:
        with self._transaction():
            self._db.execute(
                "INSERT INTO jobs (job_id, status, params, upload_path, created_at, updated_at) VALUES (?, 'queued', ?, ?, ?, ?)",
                (job_id, json.dumps(params), upload_path, now, now),
            )
            return self._get(job_id)

    def get(self, job_id: str) -> JobRecord:
        with locked(self._lock):
            return self._get(job_id)

    def claim(self, owner: str, lease_s: float, now: float, max_attempts: int) -> JobRecord | None:
        with self._transaction():
            while True:
                row = self._db.execute(
                    "SELECT job_id, attempts FROM jobs WHERE status = 'queued' OR (status = 'running' AND lease_until < ?) "
                    "ORDER BY created_at LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                job_id, attempts = row
                if attempts >= max_attempts:
                    self._db.execute(
                        "UPDATE jobs SET status = 'failed', owner = NULL, error = ?, updated_at = ? WHERE job_id = ?",
                        (json.dumps(gave_up(attempts)), now, job_id),
                    )
                    continue
                self._db.execute(
                    "UPDATE jobs SET status = 'running', owner = ?, lease_until = ?, attempts = attempts + 1, progress = 0, "
                    "updated_at = ? WHERE job_id = ?",
                    (owner, now + lease_s, now, job_id),
                )
                return self._get(job_id)

    def heartbeat(self, job_id: str, owner: str, progress: float, lease_s: float, now: float) -> bool:
        with locked(self._lock):
            cur = self._db.execute(
                "UPDATE jobs SET progress = ?, lease_until = ?, updated_at = ? WHERE job_id = ? AND status = 'running' AND owner = ?",
                (progress, now + lease_s, now, job_id, owner),
            )
            return cur.rowcount == 1

    def finish(
        self,
        job_id: str,
        owner: str,
        status: JobStatus,
        now: float,
        result: dict[str, Any] | None = None,
        error: dict[str, str] | None = None,
    ) -> bool:
        progress = "1.0" if status == "done" else ("0.0" if status == "queued" else "progress")
        with locked(self._lock):
            cur = self._db.execute(
                f"UPDATE jobs SET status = ?, progress = {progress}, owner = NULL, lease_until = 0, result = ?, error = ?, "
                "updated_at = ? WHERE job_id = ? AND status = 'running' AND owner = ?",
                (status, json.dumps(result) if result is not None else None, json.dumps(error) if error else None, now, job_id, owner),
            )
            return cur.rowcount == 1

    def cancel(self, job_id: str, now: float) -> JobRecord:
        with self._transaction():
            self._db.execute(
                "UPDATE jobs SET status = 'cancelled', owner = NULL, lease_until = 0, updated_at = ? "
                "WHERE job_id = ? AND status IN ('queued', 'running')",
                (now, job_id),
            )
            return self._get(job_id)

    def close(self) -> None:
        with locked(self._lock):
            self._db.close()
