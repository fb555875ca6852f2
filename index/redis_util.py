"""What the Redis stores (gallery, jobs, feedback) share: connection problems reported as the store
error every caller already handles."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from index.errors import StoreUnavailable


@contextmanager
def reachable() -> Iterator[None]:
    """Connection problems (refused, reset, timed out) become StoreUnavailable: callers need not know
    this is Redis. Other Redis errors (a script's error reply, a wrong type) are bugs and pass as they are."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise StoreUnavailable(f"redis: {exc}") from exc
