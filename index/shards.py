"""Shop-sharded replica groups: which shard holds a shop, and the Redis key prefixes of each shard.

When a catalog outgrows one machine's memory, the gallery is split by shop over `shards` replica
groups; every replica of group `i` holds (and follows the log of) shard `i` only. A proxy in front
sends each request to the group of its shop, so the proxy and the service must agree on the shard
of a shop without sharing code: `shard_of` is exactly what nginx's (non-consistent) `hash` directive
computes with equal-weight servers (it is documented as Cache::Memcached compatible):
`(crc32(key) >> 16) & 0x7fff`, modulo the number of servers. With `shards` = 1 nothing is sharded
and every prefix is the configured one, unchanged (existing deployments keep their data).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

# The first {...} of a key with something inside it is its Redis Cluster hash tag.
_HASH_TAG = re.compile(r"\{([^{}]+)\}")


def shard_of(shop_id: str, shards: int) -> int:
    """The shard that holds `shop_id` among `shards`, as nginx `hash <key>;` (not `consistent`) picks it.

    nginx (ngx_http_upstream_hash_module) takes the CRC-32 of the key, keeps bits 16..30
    (`(hash >> 16) & 0x7fff`, as Cache::Memcached does) and picks that value modulo the total
    weight: with equal-weight servers, server number `value % shards` in configuration order."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    return ((zlib.crc32(shop_id.encode("utf-8")) >> 16) & 0x7FFF) % shards


def shard_prefix(prefix: str, shard: int, shards: int) -> str:
    """The Redis key prefix of shard `shard` among `shards`, derived from the deployment's `prefix`.

    Unsharded (`shards` = 1): `prefix` itself. Sharded: the shard goes into the hash tag, so each
    shard's keys share one Redis Cluster slot of their own (`rice:{gallery}:` -> `rice:{gallery-s1}:`);
    a prefix without a tag gets `s<shard>:` appended (`rice:` -> `rice:s1:`)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    if shards == 1:
        return prefix
    tag = _HASH_TAG.search(prefix)
    if tag is None:
        return f"{prefix}s{shard}:"
    return f"{prefix[: tag.end(1)]}-s{shard}{prefix[tag.end(1) :]}"


@dataclass(frozen=True)
class ShardPlan:
    """This replica's place among the shards: `shard` of `shards` (1 = unsharded)."""

    shards: int = 1
    shard: int = 0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"RICE_SHARDS must be at least 1, got {self.shards}")
        if not 0 <= self.shard < self.shards:
            raise ValueError(f"RICE_SHARD={self.shard} must be in 0..{self.shards - 1} (RICE_SHARDS={self.shards})")

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def of(self, shop_id: str) -> int:
        """The shard of a shop (0 when unsharded)."""
        return shard_of(shop_id, self.shards)

    def is_local(self, shop_id: str | None) -> bool:
        """Whether this replica holds `shop_id`'s items (a shop-less item: only when unsharded)."""
        if not self.sharded:
            return True
        return shop_id is not None and self.of(shop_id) == self.shard

    def prefix(self, prefix: str, shard: int | None = None) -> str:
        """`prefix` for shard `shard` (default: this replica's)."""
        return shard_prefix(prefix, self.shard if shard is None else shard, self.shards)
