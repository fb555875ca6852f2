"""Request records and verdicts in both stores (SQLite, a real Redis): the same behaviour, exact
vectors, expiry, the record cap, replacement of a verdict, and the `source` of gallery items."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from index.errors import RequestNotFound
from index.feedback import Feedback, FeedbackStore, RequestRecord, SQLiteFeedbackStore
from index.records import Record
from index.redis_feedback import RedisFeedbackStore
from index.redis_store import RedisStore
from index.sqlite_store import SQLiteStore
from tests.conftest import RedisServer
from tests.serving_helpers import wait_until


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    if request.param == "sqlite":
        s: FeedbackStore = SQLiteFeedbackStore(tmp_path / "g.db", max_records=3)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisFeedbackStore(server.url, max_records=3)
    yield s
    s.close()


def _record(i: int, created: float, dim: int = 8, frames: list[bytes] | None = None) -> RequestRecord:
    rng = np.random.default_rng(i)
    emb = rng.standard_normal((5, dim)).astype(np.float32)
    vec = emb.mean(0) / np.linalg.norm(emb.mean(0))
    answer = [{"sku": f"sku-{i}", "score": 0.5, "item_id": f"item-{i}"}]
    return RequestRecord(f"req-{i}", "clip", "m1", "shop-a", created, answer, vec, emb, frames or [])


def test_a_record_comes_back_exactly_and_expires(store: FeedbackStore) -> None:
    now = time.time()
    regions = np.random.default_rng(9).standard_normal((2, 8)).astype(np.float32)
    rec = replace(_record(1, now, frames=[b"\xff\xd8jpeg-one", b"\xff\xd8two"]), regions=regions)
    store.put_request(rec, ttl_s=0.5)
    got = store.get_request("req-1", now)
    assert got.vector is not None and rec.vector is not None and got.frame_emb is not None and rec.frame_emb is not None
    assert np.array_equal(got.vector, rec.vector) and np.array_equal(got.frame_emb, rec.frame_emb)  # raw float32, bit-exact
    assert got.frames == rec.frames and got.answer == rec.answer and got.top1 == "sku-1" and got.shop_id == "shop-a"
    assert got.regions is not None and np.array_equal(got.regions, regions)
    with pytest.raises(RequestNotFound):
        store.get_request("req-unknown", now)

    def gone() -> bool:
        try:
            store.get_request("req-1", time.time())
        except RequestNotFound:
            return True
        return False

    wait_until(gone, 10, "the record to expire")


def test_at_most_max_records_are_kept_oldest_out(store: FeedbackStore) -> None:
    now = time.time()
    for i in range(5):
        store.put_request(_record(i, now + i), ttl_s=3600)
    store.purge(now + 5)  # the SQLite store trims on every 64th write or here; Redis on every write
    alive = []
    for i in range(5):
        try:
            store.get_request(f"req-{i}", now + 5)
            alive.append(i)
        except RequestNotFound:
            pass
    assert alive == [2, 3, 4]


def test_a_second_verdict_replaces_the_first_and_verdicts_expire(store: FeedbackStore) -> None:
    now = time.time()
    rec = _record(7, now)
    assert store.put_feedback(Feedback("req-7", "correct", "sku-7", now, rec), retention_s=3600) is None
    old = store.put_feedback(Feedback("req-7", "wrong", "sku-x", now + 1, rec), retention_s=0.5)
    assert old is not None and old.verdict == "correct"
    fb = store.get_feedback("req-7", now + 1)
    assert fb is not None and (fb.verdict, fb.sku) == ("wrong", "sku-x")
    assert fb.record.vector is not None and rec.vector is not None and np.array_equal(fb.record.vector, rec.vector)
    assert [f.request_id for f in store.feedback_since(0, now + 1)] == ["req-7"]
    wait_until(lambda: store.get_feedback("req-7", time.time()) is None, 10, "the verdict to expire")
    assert list(store.feedback_since(0, time.time())) == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_item_source_survives_the_store_and_its_log(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    v = np.eye(4, dtype=np.float32)
    recs = [Record("cat-1", "A", None, v[0]), Record("fb-1", "A", None, v[1], {"request_id": "r"}, source="feedback")]
    if kind == "sqlite":
        s: SQLiteStore | RedisStore = SQLiteStore(tmp_path / "g.db")
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url)
    try:
        s.upsert("m", recs)
        assert {r.item_id: r.source for r in s.changes_since("m", 0)} == {"cat-1": "catalog", "fb-1": "feedback"}
        if isinstance(s, RedisStore):  # what followers apply
            entries = s.read_log("m", 0, 0, 10)
            assert {r.item_id: r.source for e in entries for r in e.records} == {"cat-1": "catalog", "fb-1": "feedback"}
    finally:
        s.close()


def test_a_gallery_file_from_before_the_source_column_opens_with_catalog_items(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE items (namespace TEXT NOT NULL, item_id TEXT NOT NULL, sku TEXT NOT NULL, shop_id TEXT, "
        "metadata TEXT NOT NULL DEFAULT '{}', dim INTEGER NOT NULL DEFAULT 0, vector BLOB, version INTEGER NOT NULL, "
        "deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (namespace, item_id));"
    )
    db.execute("INSERT INTO items VALUES ('m', 'old', 'A', NULL, '{}', 2, ?, 1, 0)", (np.ones(2, "<f4").tobytes(),))
    db.commit()
    db.close()
    s = SQLiteStore(path)
    try:
        assert [(r.item_id, r.source) for r in s.changes_since("m", 0)] == [("old", "catalog")]
    finally:
        s.close()


def test_closest_picks_the_vector_nearest_to_the_skus_catalog_images_never_a_view() -> None:
    from index.gallery import Gallery

    g = Gallery(3)
    e = np.eye(3, dtype=np.float32)
    g.apply([Record("cat-a", "A", "s1", e[0], version=1), Record("cat-b", "B", "s1", e[1], version=1)])
    g.apply([Record("fb-x", "A", "s1", e[2], source="feedback", version=2)])  # a view: not what "closest" aims at
    clip, region0, region1 = np.array([0.5, 0.5, 0.7]), np.array([0.9, 0.1, 0.4]), np.array([0.1, 0.9, 0.4])
    vectors = np.stack([v / np.linalg.norm(v) for v in (clip, region0, region1)]).astype(np.float32)
    assert g.closest(vectors, "A")[0] == 1 and g.closest(vectors, "B")[0] == 2  # type: ignore[index]
    assert g.closest(vectors, "A", "other-shop") is None and g.closest(vectors, "C") is None
    assert [h.item_id for h in g.views("A", "feedback", "s1")] == ["fb-x"] and "fb-x" in g


def test_the_bulk_format_carries_the_source_and_refuses_an_unknown_one() -> None:
    from index.bulk import BulkItem, parse_items
    from index.errors import InvalidBulk

    lines = [BulkItem("a", "A", None, {}).to_json().encode(), BulkItem("fb-1", "A", None, {}, "feedback").to_json().encode()]
    assert "source" not in lines[0].decode()  # catalog rows read as before
    assert [it.source for it in parse_items(lines, 1024)] == ["catalog", "feedback"]
    with pytest.raises(InvalidBulk, match="source must be one of catalog, feedback"):
        parse_items([b'{"item_id": "x", "sku": "A", "source": "scraped"}'], 1024)


def test_expired_sqlite_rows_are_deleted_not_only_hidden(tmp_path: Path) -> None:
    import sqlite3

    s = SQLiteFeedbackStore(tmp_path / "g.db")
    now = time.time()
    s.put_request(_record(1, now - 10), ttl_s=1)  # expired already
    s.put_request(_record(2, now), ttl_s=3600)
    s.put_feedback(Feedback("req-1", "correct", "sku-1", now - 10, _record(1, now - 10)), retention_s=1)
    s.close()
    SQLiteFeedbackStore(tmp_path / "g.db").close()  # opening purges
    db = sqlite3.connect(tmp_path / "g.db")
    assert db.execute("SELECT request_id FROM feedback_requests").fetchall() == [("req-2",)]
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone() == (0,)
