"""Shop sharding, the parts below the service: the shard of a shop (what nginx's `hash` picks), the
Redis prefixes of each shard, and the settings that refuse a deployment that cannot work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from index.shards import ShardPlan, shard_of, shard_prefix
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _crc32_bitwise(data: bytes) -> int:
    """CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320) one bit at a time: independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _nginx_pick(key: str, servers: int) -> int:
    """ngx_http_upstream_hash_module, non-consistent, equal weights: w = ((crc >> 16) & 0x7fff) % total
    weight, then walk the servers subtracting each weight (1) until w is below one: server w."""
    w = ((_crc32_bitwise(key.encode("utf-8")) >> 16) & 0x7FFF) % servers
    for index in range(servers):
        if w < 1:
            return index
        w -= 1
    raise AssertionError("unreachable")


# Printed once from the formula and checked by hand against the CRC-32 check value table:
# crc32("shop-1") = 0xd3763790 -> 0x5376 = 21366; crc32("shop-2") = 0x4a7f662a -> 0x4a7f = 19071;
# crc32("acme") = 0x05c4ba3e -> 0x05c4 = 1476; crc32("") = 0.
FIXED = [
    ("shop-1", 2, 0),
    ("shop-2", 2, 1),
    ("shop-3", 2, 0),
    ("shop-1", 4, 2),
    ("shop-2", 4, 3),
    ("shop-2", 3, 0),
    ("shop-3", 3, 1),
    ("acme", 4, 0),
    ("", 7, 0),
    ("ßhop", 3, 2),  # UTF-8 bytes, as nginx sees the header
]


@pytest.mark.parametrize(("shop", "shards", "expected"), FIXED)
def test_shard_of_fixed_values(shop: str, shards: int, expected: int) -> None:
    assert shard_of(shop, shards) == expected


def test_the_bitwise_crc_is_crc32() -> None:
    assert _crc32_bitwise(b"123456789") == 0xCBF43926  # the standard CRC-32 check value
    assert _crc32_bitwise(b"shop-1") == 0xD3763790


def test_shard_of_agrees_with_an_independent_nginx_pick() -> None:
    shops = [f"shop-{i}" for i in range(300)] + ["a", "Z", "店铺-7", "x" * 200]
    for shards in (1, 2, 3, 5, 8):
        picks = [shard_of(s, shards) for s in shops]
        assert picks == [_nginx_pick(s, shards) for s in shops]
        assert set(picks) == set(range(shards))  # every shard gets shops


def test_shard_of_rejects_no_shards() -> None:
    with pytest.raises(ValueError):
        shard_of("shop-1", 0)


def test_prefix_derivation() -> None:
    assert shard_prefix("rice:{gallery}:", 0, 1) == "rice:{gallery}:"  # unsharded: unchanged
    assert shard_prefix("rice:{gallery}:", 0, 2) == "rice:{gallery-s0}:"
    assert shard_prefix("rice:{gallery}:", 1, 2) == "rice:{gallery-s1}:"
    assert shard_prefix("rice:{jobs}:", 3, 4) == "rice:{jobs-s3}:"
    assert shard_prefix("prod:{g}:x:", 1, 2) == "prod:{g-s1}:x:"  # only the tag changes
    assert shard_prefix("rice:", 1, 2) == "rice:s1:"  # no tag: appended
    assert shard_prefix("rice:{}:", 1, 2) == "rice:{}:s1:"  # an empty {} is no tag to Redis either
    with pytest.raises(ValueError):
        shard_prefix("rice:", 2, 2)


def test_default_settings_are_unsharded() -> None:
    s = Settings()
    assert (s.shards, s.shard) == (1, 0)
    assert not s.shard_plan().sharded
    assert s.gallery_prefix() == s.redis_prefix == "rice:{gallery}:"
    assert s.jobs_prefix() == s.redis_jobs_prefix == "rice:{jobs}:"
    assert s.shard_plan().is_local(None) and s.shard_plan().is_local("shop-2")


def test_sharded_settings_derive_prefixes() -> None:
    s = Settings(shards=2, shard=1, redis_url="redis://127.0.0.1:1/0")
    assert s.gallery_prefix() == "rice:{gallery-s1}:"
    assert s.gallery_prefix(0) == "rice:{gallery-s0}:"
    assert s.jobs_prefix() == "rice:{jobs-s1}:"
    plan = s.shard_plan()
    assert plan.is_local("shop-2") and not plan.is_local("shop-1") and not plan.is_local(None)


def test_settings_refuse_a_shard_outside_the_shards() -> None:
    with pytest.raises(ValidationError, match=r"RICE_SHARD=2 must be in 0\.\.1"):
        Settings(shards=2, shard=2, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ValidationError, match=r"RICE_SHARD=1 must be in 0\.\.0"):
        Settings(shard=1)
    with pytest.raises(ValidationError):
        Settings(shards=0)
    with pytest.raises(ValueError):
        ShardPlan(2, -1)


def test_settings_refuse_shards_without_redis() -> None:
    with pytest.raises(ValidationError, match="RICE_SHARDS=2 needs RICE_REDIS_URL"):
        Settings(shards=2, shard=0)
    with pytest.raises(ValidationError, match="needs RICE_REDIS_URL"):
        Settings(shards=2, shard=0, redis_url="")  # an empty value is unset


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RICE_SHARDS": "2", "RICE_SHARD": "5", "RICE_REDIS_URL": "redis://127.0.0.1:1/0"}, "RICE_SHARD=5 must be in 0..1"),
        ({"RICE_SHARDS": "3"}, "RICE_SHARDS=3 needs RICE_REDIS_URL"),
    ],
)
def test_the_entry_point_refuses_bad_sharding_in_one_line(env: dict[str, str], says: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RICE_")}
    clean.update(env, RICE_GALLERY_PATH=":memory:")
    out = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rice service: ") and says in lines[0], out.stderr
