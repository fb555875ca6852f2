"""Unit tests of index.sqlite_store.SQLiteStore: versions, namespaces, tombstones, durability."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.errors import ItemNotFound, StoreUnavailable
from index.gallery import Gallery
from index.records import Record
from index.sqlite_store import SQLiteStore

DIM = 8


def unit_vectors(seed: int, n: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rec(item_id: str, sku: str, shop_id: str | None, vector: np.ndarray, **metadata: object) -> Record:
    return Record(item_id, sku, shop_id, vector, dict(metadata))


@pytest.fixture
def store() -> Iterator[SQLiteStore]:
    s = SQLiteStore(":memory:")
    yield s
    s.close()


def summary(store: SQLiteStore, namespace: str) -> list[tuple[str, str, str | None, int, bool]]:
    return [(r.item_id, r.sku, r.shop_id, r.version, r.deleted) for r in store.changes_since(namespace, 0)]


def live(records: list[Record]) -> dict[str, Record]:
    return {r.item_id: r for r in records if not r.deleted}


def test_versions_strictly_increase(store: SQLiteStore) -> None:
    assert store.version() == 0
    vecs = unit_vectors(0, 4)
    seen = [store.version()]
    seen.append(store.upsert("m1", [rec("a", "s1", "shop", vecs[0]), rec("b", "s1", "shop", vecs[1])]))
    seen.append(store.upsert("m2", [rec("c", "s2", "shop", vecs[2])]))
    seen.append(store.delete_items(["a"])[0])
    seen.append(store.upsert("m1", [rec("a", "s1", "shop", vecs[3])]))
    seen.append(store.delete_sku("s2")[0])
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert store.version() == seen[-1]


def test_changes_since_returns_newer_records_in_version_order(store: SQLiteStore) -> None:
    vecs = unit_vectors(1, 6)
    v1 = store.upsert("m", [rec("a", "s1", "x", vecs[0]), rec("b", "s2", "x", vecs[1])])
    v2 = store.upsert("m", [rec("c", "s3", "y", vecs[2])])
    v3, deleted = store.delete_items(["b"])
    assert deleted == ["b"]
    v4 = store.upsert("m", [rec("a", "s1", "x", vecs[3], name="again")])

    def summary(since: int) -> list[tuple[str, int, bool]]:
        return [(r.item_id, r.version, r.deleted) for r in store.changes_since("m", since)]

    # Each item appears once, at the version that last changed it.
    assert summary(0) == [("c", v2, False), ("b", v3, True), ("a", v4, False)]
    assert summary(v1) == summary(0)
    assert summary(v2) == [("b", v3, True), ("a", v4, False)]
    assert summary(v3) == [("a", v4, False)]
    assert summary(v4) == []
    versions = [r.version for r in store.changes_since("m", 0)]
    assert versions == sorted(versions)
    tomb = store.changes_since("m", v2)[0]
    assert tomb.vector is None
    assert (tomb.sku, tomb.shop_id) == ("s2", "x")


def test_vectors_and_metadata_round_trip(store: SQLiteStore) -> None:
    vecs = unit_vectors(2, 3, dim=17)
    vecs[2, 0] = np.float32(1e-40)  # a subnormal survives too
    meta = {"name": "Red mug \u2615", "price": 12.5, "tags": ["a", "b"], "nested": {"n": 1, "ok": True}, "none": None}
    records = [
        rec("a", "s1", "shop-1", vecs[0], **meta),
        rec("b", "s2", None, vecs[1]),
        rec("c", "s3", "shop-2", vecs[2], x=1),
    ]
    v = store.upsert("m", records)
    out = {r.item_id: r for r in store.changes_since("m", 0)}
    assert set(out) == {"a", "b", "c"}
    for r in records:
        got = out[r.item_id]
        assert got.vector is not None and r.vector is not None
        assert got.vector.dtype == np.float32
        assert got.vector.shape == (17,)
        assert got.vector.tobytes() == r.vector.tobytes()
        assert (got.sku, got.shop_id, got.metadata, got.version, got.deleted) == (r.sku, r.shop_id, r.metadata, v, False)


def test_namespaces_are_separate_but_deletes_are_global(store: SQLiteStore) -> None:
    va, vb = unit_vectors(3, 2)
    store.upsert("A", [rec("shared", "s1", "x", va), rec("only-a", "s2", "x", va)])
    store.upsert("B", [rec("shared", "s1", "x", vb), rec("only-b", "s3", "x", vb)])
    a, b = store.changes_since("A", 0), store.changes_since("B", 0)
    assert sorted(r.item_id for r in a) == ["only-a", "shared"]
    assert sorted(r.item_id for r in b) == ["only-b", "shared"]
    shared_b = live(b)["shared"].vector
    assert shared_b is not None and shared_b.tobytes() == vb.tobytes()  # B's embedding, not A's
    assert store.changes_since("C", 0) == []

    v, deleted = store.delete_items(["shared"])
    assert deleted == ["shared"]
    for ns in ("A", "B"):
        changes = store.changes_since(ns, v - 1)
        assert [(r.item_id, r.deleted, r.version) for r in changes] == [("shared", True, v)]

    v2, deleted = store.delete_sku("s3")
    assert deleted == ["only-b"]
    assert store.changes_since("A", v) == []
    assert [(r.item_id, r.deleted) for r in store.changes_since("B", v)] == [("only-b", True)]
    assert v2 > v


def test_delete_sku_with_and_without_shop(store: SQLiteStore) -> None:
    vecs = unit_vectors(4, 5)
    store.upsert(
        "m",
        [
            rec("a1", "mug", "shop-1", vecs[0]),
            rec("a2", "mug", "shop-1", vecs[1]),
            rec("b1", "mug", "shop-2", vecs[2]),
            rec("c1", "mug", "shop-3", vecs[3]),
            rec("d1", "pan", "shop-1", vecs[4]),
        ],
    )
    v1, deleted = store.delete_sku("mug", shop_id="shop-1")
    assert deleted == ["a1", "a2"]
    assert sorted(live(store.changes_since("m", 0))) == ["b1", "c1", "d1"]

    with pytest.raises(ItemNotFound):
        store.delete_sku("mug", shop_id="shop-1")  # already gone there
    assert store.version() == v1

    v2, deleted = store.delete_sku("mug")
    assert deleted == ["b1", "c1"]
    assert v2 == v1 + 1
    assert sorted(live(store.changes_since("m", 0))) == ["d1"]


def test_delete_items_tombstones_only_live_ids(store: SQLiteStore) -> None:
    vecs = unit_vectors(5, 3)
    store.upsert("m", [rec("a", "s", None, vecs[0]), rec("b", "s", None, vecs[1]), rec("c", "t", None, vecs[2])])
    v, deleted = store.delete_items(["c", "a", "unknown"])
    assert deleted == ["a", "c"]  # the unknown id is skipped, not an error, when some were live
    assert list(live(store.changes_since("m", 0))) == ["b"]
    assert store.version() == v


def test_deleting_unknown_ids_or_skus_raises_and_keeps_version(store: SQLiteStore) -> None:
    vecs = unit_vectors(6, 2)
    store.upsert("m", [rec("a", "s", "shop-1", vecs[0])])
    v, _ = store.delete_items(["a"])
    store.upsert("m", [rec("b", "t", "shop-1", vecs[1])])
    before = store.version()
    changes = summary(store, "m")
    for call in (
        lambda: store.delete_items(["nope"]),
        lambda: store.delete_items(["a"]),  # already a tombstone
        lambda: store.delete_items([]),
        lambda: store.delete_sku("nope"),
        lambda: store.delete_sku("s"),  # every item of it already deleted
        lambda: store.delete_sku("t", shop_id="shop-2"),  # right SKU, wrong shop
    ):
        with pytest.raises(ItemNotFound):
            call()
        assert store.version() == before
    assert summary(store, "m") == changes
    assert before == v + 1  # only the upsert after the delete advanced the version


def test_upsert_without_vector_raises_and_writes_nothing(store: SQLiteStore) -> None:
    vecs = unit_vectors(7, 2)
    store.upsert("m", [rec("a", "s", None, vecs[0])])
    before = store.version()
    bad = [rec("b", "s", None, vecs[1]), Record("c", "s", None, None)]
    with pytest.raises(ValueError):
        store.upsert("m", bad)
    assert store.version() == before
    assert [r.item_id for r in store.changes_since("m", 0)] == ["a"]


def test_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "gallery.db"  # the parent directory is created
    vecs = unit_vectors(8, 4)
    s = SQLiteStore(path)
    s.upsert("m1", [rec("a", "s1", "x", vecs[0], name="a"), rec("b", "s2", "y", vecs[1])])
    s.upsert("m2", [rec("c", "s3", "x", vecs[2])])
    s.delete_items(["b"])
    version = s.version()
    expected = {ns: s.changes_since(ns, 0) for ns in ("m1", "m2")}
    s.close()

    s2 = SQLiteStore(path)
    try:
        assert s2.version() == version
        for ns, records in expected.items():
            got = s2.changes_since(ns, 0)
            assert [(r.item_id, r.sku, r.shop_id, r.metadata, r.version, r.deleted) for r in got] == [
                (r.item_id, r.sku, r.shop_id, r.metadata, r.version, r.deleted) for r in records
            ]
            for g, r in zip(got, records, strict=True):
                assert (g.vector is None) == (r.vector is None)
                if g.vector is not None and r.vector is not None:
                    assert g.vector.tobytes() == r.vector.tobytes()
        # Versions keep increasing after a reopen.
        assert s2.upsert("m1", [rec("d", "s4", "x", vecs[3])]) == version + 1
    finally:
        s2.close()


def test_full_replay_rebuilds_the_incremental_gallery(tmp_path: Path) -> None:
    """A replica that syncs after every write and one rebuilt from scratch answer the same."""
    path = tmp_path / "gallery.db"
    rng = np.random.default_rng(9)
    vecs = unit_vectors(9, 120)
    s = SQLiteStore(path)
    incremental = Gallery(DIM)
    other_ns = Gallery(DIM)

    def sync() -> None:
        incremental.apply(s.changes_since("m", incremental.version))
        other_ns.apply(s.changes_since("other", other_ns.version))

    for batch in range(12):
        records = [rec(f"item-{i}", f"sku-{i % 25}", f"shop-{i % 4}", vecs[i], batch=batch) for i in range(batch * 10, batch * 10 + 10)]
        s.upsert("m", records)
        sync()
        if batch % 3 == 2:
            # Re-embed some earlier items (new vectors, moved shop), delete an item and a SKU.
            redo = rng.choice(batch * 10, size=5, replace=False).tolist()
            s.upsert("m", [rec(f"item-{i}", f"sku-{i % 25}", "shop-9", unit_vectors(100 + i + batch, 1)[0]) for i in redo])
            sync()
            s.upsert("other", [rec(f"item-{batch}", "elsewhere", "shop-0", vecs[batch])])
            sync()
            with contextlib.suppress(ItemNotFound):  # the item may be gone already
                s.delete_items([f"item-{rng.integers(batch * 10)}"])
            sync()
            with contextlib.suppress(ItemNotFound):
                s.delete_sku(f"sku-{batch}", shop_id=f"shop-{batch % 4}")
            sync()
            s.delete_sku(f"sku-{batch + 10}")
            sync()
    s.close()

    s2 = SQLiteStore(path)
    rebuilt = Gallery(DIM)
    rebuilt.apply(s2.changes_since("m", 0))
    rebuilt.set_version(s2.version())
    incremental.set_version(s2.version())
    s2.close()

    assert rebuilt.stats() == incremental.stats()
    assert len(rebuilt) > 0
    queries = unit_vectors(99, 10)
    for shop in (None, "shop-0", "shop-1", "shop-2", "shop-3", "shop-9", "missing"):
        r_hits, r_version = rebuilt.search(queries, 8, shop_id=shop)
        i_hits, i_version = incremental.search(queries, 8, shop_id=shop)
        assert r_version == i_version
        for a, b in zip(r_hits, i_hits, strict=True):
            assert [(h.sku, h.item_id, h.shop_id, h.metadata) for h in a] == [(h.sku, h.item_id, h.shop_id, h.metadata) for h in b]
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)


def test_store_protocols_are_checked_at_runtime(store: SQLiteStore) -> None:
    from index.records import ChangeLog, Store

    assert isinstance(store, Store)
    assert not isinstance(store, ChangeLog)  # one writer process: nothing to follow


def test_sqlite_failures_raise_the_same_error_as_an_unreachable_redis(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "g.db")
    s.close()
    with pytest.raises(StoreUnavailable, match="sqlite"):
        s.version()
    with pytest.raises(StoreUnavailable):
        s.upsert("m", [rec("a", "s", None, unit_vectors(0, 1)[0])])
