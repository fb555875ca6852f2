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


def ping(url: str, timeout_s: float = 3.0) -> None:
    """One PING to the Redis at `url` (a start-up check): ValueError for a malformed URL, StoreUnavailable
    naming host:port when it does not answer, or any other Redis error (e.g. a refused password)."""
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    where = client.connection_pool.connection_kwargs
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"cannot reach Redis at {where.get('host', '?')}:{where.get('port', '?')} ({exc})") from None
    finally:
        client.close()
