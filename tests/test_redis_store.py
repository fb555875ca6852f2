"""index.redis_store.RedisStore against a real Redis server: the SQLite store's behaviour tests run
unchanged on it, plus the log (stream) a follower reads, epochs and restarts."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from index.errors import StoreUnavailable
from index.gallery import Gallery, Hit
from index.redis_store import RedisStore
from tests.conftest import RedisServer
from tests.test_sqlite_store import (  # the same behaviour contract, collected again here
    rec,
    test_changes_since_returns_newer_records_in_version_order,
    test_delete_items_tombstones_only_live_ids,
    test_delete_sku_with_and_without_shop,
    test_deleting_unknown_ids_or_skus_raises_and_keeps_version,
    test_namespaces_are_separate_but_deletes_are_global,
    test_upsert_without_vector_raises_and_writes_nothing,
    test_vectors_and_metadata_round_trip,
    test_versions_strictly_increase,
    unit_vectors,
)

pytestmark = pytest.mark.integration

__all__ = [
    "test_changes_since_returns_newer_records_in_version_order",
    "test_delete_items_tombstones_only_live_ids",
    "test_delete_sku_with_and_without_shop",
    "test_deleting_unknown_ids_or_skus_raises_and_keeps_version",
    "test_namespaces_are_separate_but_deletes_are_global",
    "test_upsert_without_vector_raises_and_writes_nothing",
    "test_vectors_and_metadata_round_trip",
    "test_versions_strictly_increase",
]


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, log_maxlen=0)
    yield s
    s.close()


def test_log_holds_one_entry_per_version_with_raw_vectors(store: RedisStore, redis_server: RedisServer) -> None:
    vecs = unit_vectors(10, 4, dim=5)
    v1 = store.upsert("m", [rec("a", "s1", "x", vecs[0], n=1), rec("b", "s2", None, vecs[1])])
    v2 = store.upsert("other", [rec("c", "s3", "x", vecs[2])])
    v3, _ = store.delete_sku("s1")
    v4 = store.upsert("m", [])  # an empty write still takes a version, as in SQLite
    entries = store.read_log("m", 0, block_ms=0, count=100)
    assert [(e.version, e.namespace) for e in entries] == [(v1, "m"), (v2, "other"), (v3, None), (v4, "m")]
    assert [(r.item_id, r.sku, r.shop_id, r.metadata, r.version) for r in entries[0].records] == [
        ("a", "s1", "x", {"n": 1}, v1),
        ("b", "s2", None, {}, v1),
    ]
    assert entries[0].records[1].vector is not None and entries[0].records[1].vector.tobytes() == vecs[1].tobytes()
    assert entries[1].records == []  # another namespace: the version goes by, the vectors do not
    assert [(r.item_id, r.deleted) for r in entries[2].records] == [("a", True)]
    assert store.read_log("m", v2, block_ms=0, count=100)[0].version == v3
    assert store.read_log("m", v4, block_ms=50, count=100) == []
    # The raw stream holds bytes, never pickles: the vector field is exactly items x dim float32s.
    _, fields = redis.Redis.from_url(redis_server.url).xrange(store.prefix + "log", count=1)[0]
    assert len(fields[b"vecs"]) == 2 * 5 * 4 and fields[b"dim"] == b"5"


def test_snapshot_and_log_rebuild_the_same_gallery(store: RedisStore) -> None:
    vecs = unit_vectors(11, 60)
    rng = np.random.default_rng(0)
    followed = Gallery(8)
    for i in range(60):
        store.upsert("m", [rec(f"i{i}", f"sku{i % 13}", f"shop{i % 5}", vecs[i])])
        if i % 7 == 6:
            store.delete_items([f"i{rng.integers(i)}", f"i{i}"])
        if i % 20 == 19:
            store.delete_sku(f"sku{i % 13}")
    for e in store.read_log("m", 0, block_ms=0, count=1000):
        followed.apply(e.records)
        followed.set_version(e.version)
    snap = store.snapshot("m")
    booted = Gallery(8)
    booted.apply(list(snap.records))
    booted.set_version(snap.version)
    assert booted.stats() == followed.stats()
    q = unit_vectors(12, 5)
    for shop in (None, "shop1", "shop3"):
        a, va = booted.search(q, 10, shop)
        b, vb = followed.search(q, 10, shop)
        assert va == vb

        def key(hits: list[list[Hit]]) -> list[list[tuple[str, str, float]]]:
            return [[(h.sku, h.item_id, round(h.score, 5)) for h in r] for r in hits]

        assert key(a) == key(b)


def test_versions_survive_restart_and_epoch_marks_data_loss(redis_server: RedisServer) -> None:
    s = RedisStore(redis_server.url)
    vecs = unit_vectors(13, 3)
    versions = [s.upsert("m", [rec(f"i{i}", "s", None, vecs[i])]) for i in range(3)]
    epoch, version = s.position()
    assert epoch is not None and version == versions[-1]
    redis_server.stop(kill=True)
    with pytest.raises(StoreUnavailable):
        s.upsert("m", [rec("x", "s", None, vecs[0])])
    redis_server.start()
    assert s.position() == (epoch, version)  # AOF (fsync always): every acknowledged write is there
    assert [r.item_id for r in s.changes_since("m", 0)] == ["i0", "i1", "i2"]
    assert s.upsert("m", [rec("i3", "s", None, vecs[0])]) == version + 1
    redis.Redis.from_url(redis_server.url).flushall()  # data loss: the epoch goes with it
    assert s.position() == (None, 0)
    s.upsert("m", [rec("j", "s", None, vecs[1])])
    assert s.position()[0] not in (None, epoch)
    s.close()


def test_trimming_keeps_versions_contiguous(store: RedisStore) -> None:
    vecs = unit_vectors(14, 30)
    for i in range(30):
        store.upsert("m", [rec(f"i{i}", "s", None, vecs[i])])
    store.trim_log(5)
    assert store.log_versions() == (26, 30)
    versions = [e.version for e in store.read_log("m", 0, block_ms=0, count=100)]
    assert versions == [26, 27, 28, 29, 30] and all(b == a + 1 for a, b in itertools.pairwise(versions))


def test_sku_index_follows_an_item_that_changes_sku(store: RedisStore) -> None:
    v = unit_vectors(15, 2)
    store.upsert("m", [rec("a", "old", "x", v[0])])
    store.upsert("m", [rec("a", "new", "x", v[1])])
    with pytest.raises(LookupError):
        store.delete_sku("old")
    assert store.delete_sku("new")[1] == ["a"]
    assert [(r.item_id, r.sku, r.deleted) for r in store.changes_since("m", 0)] == [("a", "new", True)]


def test_unreachable_server_raises_store_unavailable() -> None:
    s = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.5)
    with pytest.raises(StoreUnavailable):
        s.version()
    assert not s.ping()


def test_redis_store_is_a_change_log(store: RedisStore) -> None:
    from index.records import ChangeLog, Store

    assert isinstance(store, Store) and isinstance(store, ChangeLog)
