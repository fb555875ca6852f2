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
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from index.errors import ShopRequired, WrongShard
from index.records import Store

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

    def require_shop(self, shop_id: str | None) -> None:
        """ShopRequired (400) on a sharded deployment when a request names no shop."""
        if self.sharded and shop_id is None:
            raise ShopRequired(
                f"this is a sharded deployment ({self.shards} shards by shop): give the shop id in the "
                "shop_id query parameter or the X-Shop-Id header"
            )

    def check_read(self, shop_id: str | None) -> None:
        """A read or recognition for `shop_id` can be answered here: it names a shop (when sharded)
        and this replica holds that shop's shard (else WrongShard, 421: the proxy is misconfigured)."""
        self.require_shop(shop_id)
        if shop_id is not None and not self.is_local(shop_id):
            raise WrongShard(
                f"shop {shop_id!r} is on shard {self.of(shop_id)}, this replica serves shard {self.shard} of {self.shards}: "
                "the proxy in front should route by the shop id (X-Shop-Id header, else the shop_id query parameter)"
            )

    def prefix(self, prefix: str, shard: int | None = None) -> str:
        """`prefix` for shard `shard` (default: this replica's)."""
        return shard_prefix(prefix, self.shard if shard is None else shard, self.shards)


class ShardStores:
    """The stores of the shards other than this replica's, opened on first use and kept.

    A replica follows (and searches) its own shard only, but gallery writes for any shop are taken
    by whichever replica receives them: a write for a shop of another shard goes durably into that
    shard's store, whose own replicas apply it from their log. `open_shard(i)` opens shard i's store
    (the same Redis, shard i's prefix)."""

    def __init__(self, plan: ShardPlan, open_shard: Callable[[int], Store]) -> None:
        self.plan = plan
        self._open_shard = open_shard
        self._stores: dict[int, Store] = {}
        self._lock = threading.Lock()

    def store(self, shard: int) -> Store:
        """Shard `shard`'s store (not this replica's own: that one the replica holds)."""
        if shard == self.plan.shard:
            raise ValueError(f"shard {shard} is this replica's own")
        with self._lock:  # writes arrive on worker threads: open each shard's store once
            store = self._stores.get(shard)
            if store is None:
                store = self._stores[shard] = self._open_shard(shard)
            return store

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()
