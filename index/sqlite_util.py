"""What the SQLite stores (gallery, jobs, feedback) share: one connection behind a lock, and SQLite's
failures reported as the store error every caller already handles."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from index.errors import StoreUnavailable


@contextmanager
def locked(lock: threading.Lock) -> Iterator[None]:
    """Hold the connection's `lock`; SQLite failures (locked, disk I/O, full disk, closed) raise the
    same StoreUnavailable as an unreachable Redis, so callers handle one error for both stores."""
    with lock:
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # a bug in our SQL, not an outage
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc
