"""The private Redis server fixture: its own port and data, and AOF durability across restarts."""

from __future__ import annotations

import pytest
import redis

from tests.conftest import RedisServer

pytestmark = pytest.mark.integration


def test_private_redis_server_keeps_acknowledged_writes_across_restart(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    r = redis.Redis.from_url(redis_server.url)
    assert r.dbsize() == 0  # a fresh server, not one already running on the machine
    r.set("k", b"\x00\x01float32")
    redis_server.stop(kill=True)
    redis_server.start()
    assert redis.Redis.from_url(redis_server.url).get("k") == b"\x00\x01float32"
