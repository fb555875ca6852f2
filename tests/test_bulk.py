"""Bulk vectors in and out: the format's checks (all or nothing), chunked apply with searches
running, both stores' atomic bulk upsert, and the HTTP import/export round trip."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from index.bulk import ITEMS, MANIFEST, VECTORS, BulkItem, Manifest, bulk_records, export_tar, npy_header, parse_items, read_vectors
from index.errors import InvalidBulk
from index.gallery import Gallery
from index.halfstore import HalfRows
from index.records import Record, Store
from index.redis_store import _COMMIT_STAGED, RedisStore
from index.rwlock import RWLock
from index.sqlite_store import SQLiteStore
from model.checkpoint import LoadedEncoder
from service.app import create_app
from tests.conftest import RedisServer, jpeg, settings_for
from tests.serving_helpers import wait_until
from tools.democatalog import DemoProduct


def unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def npy(a: np.ndarray, pickled: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=pickled)  # pickled: a hostile upload that the reader must refuse
    return buf.getvalue()


def jsonl(items: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in items).encode()


def items_for(n: int, start: int = 0) -> list[dict[str, object]]:
    return [
        {"item_id": f"b{start + i}", "sku": f"sku{(start + i) // 2}", "shop_id": f"shop{i % 3}", "metadata": {"i": i}} for i in range(n)
    ]


# -- the format -----------------------------------------------------------------------------------


def test_bulk_records_normalise_and_keep_order() -> None:
    v = unit(5, 8) * 3.0
    recs = bulk_records(v, parse_items(jsonl(items_for(5)).splitlines(), 1024), 8)
    assert [r.item_id for r in recs] == [f"b{i}" for i in range(5)]
    assert np.allclose([np.linalg.norm(r.vector) for r in recs], 1.0, atol=1e-5)
    assert recs[3].metadata == {"i": 3} and recs[3].shop_id == "shop0"


@pytest.mark.parametrize(
    ("vectors", "lines", "message"),
    [
        (unit(3, 4), items_for(3), "dimension 4"),
        (unit(3, 8), items_for(2), "3 vectors but 2 items"),
        (unit(2, 8), [{"item_id": "a", "sku": "s"}, {"item_id": "a", "sku": "t"}], "appears twice"),
        (np.vstack([unit(1, 8), np.zeros((1, 8), np.float32)]), items_for(2), "row 1"),
        (np.vstack([unit(1, 8), np.full((1, 8), np.nan, np.float32)]), items_for(2), "not finite"),
    ],
)
def test_bulk_records_reject_the_whole_import(vectors: np.ndarray, lines: list[dict[str, object]], message: str) -> None:
    with pytest.raises(InvalidBulk, match=message):
        bulk_records(vectors, parse_items(jsonl(lines).splitlines(), 1024), 8)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json", "line 1: not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"item_id": "has space", "sku": "s"}', "item_id must be"),
        (b'{"item_id": "a"}', "sku must be"),
        (b'{"item_id": "a", "sku": "s", "metadata": [1]}', "metadata must be a JSON object"),
        (b'{"item_id": "a", "sku": "s", "metadata": {"x": NaN}}', "not valid JSON"),
        (b'{"item_id": "a", "sku": "s", "metadata": {"x": "' + b"y" * 100 + b'"}}', "exceeds 64 bytes"),
    ],
)
def test_bad_item_lines_are_named(line: bytes, message: str) -> None:
    with pytest.raises(InvalidBulk, match=message):
        parse_items([line], 64)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"random bytes",
        npy(np.zeros((2, 3), np.float64)),
        npy(np.zeros(3, np.float32)),
        npy(np.array([{"a": 1}], dtype=object), pickled=True),
        npy(np.zeros((2, 3), np.float32))[:-4],  # a row cut short
        npy_header(387_420_489, 3) + bytes(24),  # a valid header that claims far more rows than follow
    ],
)
def test_read_vectors_accepts_only_float32_matrices(data: bytes) -> None:
    with pytest.raises(InvalidBulk):
        read_vectors(io.BytesIO(data))


def test_export_tar_is_a_tar_of_the_three_files() -> None:
    v = unit(9000, 4)  # more rows than one streamed piece
    items = [BulkItem(f"i{i}", f"s{i}", None, {}) for i in range(len(v))]
    data = b"".join(export_tar(Manifest("m1", 4, len(v), 7), items, v))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == [MANIFEST, ITEMS, VECTORS]
        manifest = Manifest.from_json(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
        vectors = read_vectors(io.BytesIO(tar.extractfile(VECTORS).read()))  # type: ignore[union-attr]
        lines = tar.extractfile(ITEMS).read().splitlines()  # type: ignore[union-attr]
    assert manifest == Manifest("m1", 4, 9000, 7)
    assert np.array_equal(vectors, v)
    assert [it.item_id for it in parse_items(lines, 1024)] == [f"i{i}" for i in range(9000)]


# -- applying a big import while searches run --------------------------------------------------------


def test_rwlock_lets_waiting_readers_in_between_back_to_back_writes() -> None:
    lock = RWLock()
    entered = threading.Event()

    def reader() -> None:
        with lock.read():
            entered.set()

    t = threading.Thread(target=reader)
    with lock.write():
        t.start()
        wait_until(lambda: lock._waiting_readers == 1, 30, "the reader to wait")
    with lock.write():  # the next chunk of an import: the waiting search went first
        assert entered.is_set()
    t.join(30)


class CountingGallery(Gallery):
    """Records the version seen at each chunk and counts the write-lock holds."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.versions_during: list[int] = []

    def _apply_chunk(self, records: list[Record], may_build: bool = True) -> None:
        self.versions_during.append(self.version)
        super()._apply_chunk(records, may_build)


def test_big_batch_applies_in_chunks_and_the_version_moves_last() -> None:
    v = unit(1000, 16)
    g = CountingGallery(16, apply_chunk=128)
    g.apply([Record("old", "old", None, v[0], version=3)])
    g.apply([Record(f"i{i}", f"s{i}", None, v[i], version=4) for i in range(1000)])
    assert g.versions_during == [0] + [3] * 8  # 1 + ceil(1000 / 128) holds; version 4 only at the end
    assert g.version == 4 and len(g) == 1001
    hits, version = g.search(v[500], 1)
    assert version == 4 and hits[0][0].item_id == "i500"
    with pytest.raises(ValueError):  # one bad record: nothing of the batch applied
        g.apply([Record("x", "x", None, v[1], version=5), Record("y", "y", None, np.ones(3, np.float32), version=5)])
    assert len(g) == 1001 and g.version == 4


def test_an_import_crossing_the_threshold_builds_the_index_once_over_all_of_it() -> None:
    from index.ann import AnnConfig

    g = Gallery(8, AnnConfig(threshold=500, nlist=16), apply_chunk=100)
    v = unit(2000, 8, seed=4)
    g.apply([Record(f"i{i}", f"s{i}", None, v[i], version=1) for i in range(2000)])  # 20 chunks
    assert g.wait_for_index(120) and g.approximate
    assert g._ann_size == 2000  # not a build started at chunk 5 over 500 items


def test_placer_path_searches_the_copy_and_keeps_it_current() -> None:
    """The GPU code path (a placed copy of the index, refreshed after writes), exercised on the CPU."""
    placed: list[int] = []

    def placer(index: faiss.Index) -> faiss.Index:
        placed.append(index.ntotal)
        return faiss.clone_index(index)  # what index_cpu_to_all_gpus does, minus the device

    v = unit(300, 16, seed=1)
    g, oracle = Gallery(16, placer=placer), Gallery(16)
    for gal in (g, oracle):
        gal.apply([Record(f"i{i}", f"s{i}", None, v[i], version=1) for i in range(300)])
        gal.apply([Record("i7", "", None, None, version=2, deleted=True)])
    assert placed == [300, 300]  # placed after each write (the delete zeroes a row in place)
    a, _ = g.search(v[:20], 5)
    b, _ = oracle.search(v[:20], 5)
    assert [[h.item_id for h in r] for r in a] == [[h.item_id for h in r] for r in b]
    assert all(h.item_id != "i7" for r in a for h in r)
    g.apply([Record("new", "new", None, v[7], version=3)])  # lands in the freed slot of the copy too
    hits, _ = g.search(v[7], 1)
    assert hits[0][0].item_id == "new"


# -- both stores: one version, all or nothing -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "g.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisStore(server.url, part_rows=64)  # small parts: a few hundred rows take several
    yield s
    s.close()


def test_store_bulk_upsert_is_one_version(store: Store) -> None:
    store.upsert("m", [Record("x", "x", None, unit(1, 8)[0])])
    recs = bulk_records(unit(300, 8, seed=2), parse_items(jsonl(items_for(300)).splitlines(), 1024), 8)
    v = store.upsert("m", recs)
    assert v == 2 == store.version()
    changes = store.changes_since("m", 1)
    assert len(changes) == 300 and {r.version for r in changes} == {2}
    by_id = {r.item_id: r for r in changes}
    assert all(np.array_equal(by_id[r.item_id].vector, r.vector) and by_id[r.item_id].metadata == r.metadata for r in recs)  # type: ignore[arg-type]
    if isinstance(store, RedisStore):
        entries = store.read_log("m", 1, 0, count=2)  # count cuts the import's 5 parts: the rest is read too
        assert [e.version for e in entries] == [2] and len(entries[0].records) == 300
        assert store.read_log("m", 2, 0, count=10) == []  # nothing after the whole import
        stray = store._r.keys(store.prefix + "stage:*")
        assert stray == []  # staged parts are gone once committed


def test_redis_commit_of_an_incomplete_stage_writes_nothing(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url)
    try:
        store.upsert("m", [Record("x", "x", None, unit(1, 8)[0])])
        script = store._r.register_script(_COMMIT_STAGED)
        with pytest.raises(redis.exceptions.ResponseError, match="incomplete or expired"):
            script(args=[store.prefix, "m", "e", 0, "0", 8, store.prefix + "stage:gone:", 2])
        assert store.version() == 1 and len(store.changes_since("m", 0)) == 1
    finally:
        store.close()


# -- over HTTP -------------------------------------------------------------------------------------------


def bulk_post(c: TestClient, vectors: bytes, items: bytes, model_version: str) -> tuple[int, dict[str, object]]:
    r = c.post(
        "/v1/gallery/bulk",
        files={"vectors": ("v.npy", vectors, "application/octet-stream"), "items": ("i.jsonl", items, "application/x-ndjson")},
        data={"model_version": model_version},
    )
    return r.status_code, r.json()


@pytest.mark.integration
@pytest.mark.slow
def test_http_export_then_bulk_import_elsewhere_finds_the_right_sku(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    with TestClient(create_app(settings_for(tmp_path / "a"), encoder=encoder)) as a:
        for p in products[:4]:
            r = a.post("/v1/gallery/items", files={"image": ("p.jpg", jpeg(p.image))}, data={"sku": p.sku, "shop_id": p.shop_id})
            assert r.status_code == 201
        exported = a.get("/v1/gallery/export")
        assert exported.status_code == 200 and exported.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        manifest = Manifest.from_json(tar.extractfile(MANIFEST).read())  # type: ignore[union-attr]
        vectors = tar.extractfile(VECTORS).read()  # type: ignore[union-attr]
        items = tar.extractfile(ITEMS).read()  # type: ignore[union-attr]
    assert manifest.count == 4 and manifest.gallery_version == 4

    with TestClient(create_app(settings_for(tmp_path / "b"), encoder=encoder)) as b:
        dim = manifest.dim
        assert bulk_post(b, vectors, items, "another-model")[0] == 409
        assert bulk_post(b, npy(unit(2, dim + 1)), jsonl(items_for(2)), manifest.model_version)[0] == 400
        bad = items_for(3)
        bad[2]["sku"] = "no spaces allowed"
        status, body = bulk_post(b, npy(unit(3, dim)), jsonl(bad), manifest.model_version)
        assert status == 400 and body["error"]["code"] == "bad_request" and "line 3" in body["error"]["message"]  # type: ignore[index]
        assert b.get("/v1/gallery/stats").json()["items"] == 0  # the first two rows were not written either

        r = b.post(  # items as a plain form field instead of a file
            "/v1/gallery/bulk",
            files={"vectors": ("v.npy", vectors, "application/octet-stream")},
            data={"model_version": manifest.model_version, "items": items.decode()},
        )
        assert (r.status_code, r.json()) == (201, {"imported": 4, "gallery_version": 1})
        status, body = bulk_post(b, npy(unit(2000, dim, seed=5)), jsonl(items_for(2000)), manifest.model_version)
        assert (status, body) == (201, {"imported": 2000, "gallery_version": 2})
        assert b.get("/v1/gallery/stats").json()["items"] == 2004
        r = b.post("/v1/recognize", files={"file": ("c.mp4", clip_of(products[1], seed=3))}, params={"min_gallery_version": 2})
        assert r.status_code == 200 and r.json()["results"][0]["sku"] == products[1].sku
        exported_b = b.get("/v1/gallery/export")
    with tarfile.open(fileobj=io.BytesIO(exported_b.content)) as tar:
        again = read_vectors(io.BytesIO(tar.extractfile(VECTORS).read()))  # type: ignore[union-attr]
        assert Manifest.from_json(tar.extractfile(MANIFEST).read()).count == 2004  # type: ignore[union-attr]
    original = read_vectors(io.BytesIO(vectors))
    assert any(np.allclose(again[i], original[0], atol=1e-6) for i in range(len(again)))


def test_http_bulk_has_its_own_size_limit(tmp_path: Path, encoder: LoadedEncoder) -> None:
    settings = settings_for(tmp_path, max_bulk_bytes=10_000, max_upload_bytes=1_000_000)
    with TestClient(create_app(settings, encoder=encoder)) as c:
        mv = c.get("/v1/info").json()["model_version"]
        status, body = bulk_post(c, npy(unit(200, 1280)), jsonl(items_for(200)), mv)  # 1 MB
        assert status == 413 and body["error"]["code"] == "payload_too_large"


@pytest.mark.integration
def test_a_following_replica_applies_a_staged_import_as_one_version(redis_server: RedisServer) -> None:
    """Writer and follower on separate connections: the parts come back as one change, applied whole."""
    from index.replica import GalleryReplica

    writer = RedisStore(redis_server.url, part_rows=50)
    follower_store = RedisStore(redis_server.url, part_rows=50)
    replica = GalleryReplica(follower_store, "m", 8)
    assert replica.follower is not None
    replica.follower.batch = 3  # fewer entries per read than the import has parts
    replica.start()
    try:
        writer.upsert("m", [Record("first", "first", None, unit(1, 8)[0])])
        recs = bulk_records(unit(420, 8, seed=6), parse_items(jsonl(items_for(420)).splitlines(), 1024), 8)
        version = writer.upsert("m", recs)  # 9 parts
        writer.upsert("m", [Record("after", "after", None, unit(1, 8, seed=9)[0])])
        wait_until(lambda: replica.gallery.version >= version + 1, 30, "the follower to apply the import and the write after it")
        assert len(replica.gallery) == 422 and replica.follower.resyncs == 0
        hits, _ = replica.search(recs[100].vector[None], 1, None)  # type: ignore[index]
        assert hits[0][0].item_id == "b100"
    finally:
        replica.stop()
        writer.close()
        follower_store.close()


@pytest.mark.integration
def test_http_export_of_a_compressed_gallery_streams_the_float16_rows(
    tmp_path: Path, encoder: LoadedEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past RICE_COMPRESS_THRESHOLD the export reads the float16 rows a chunk at a time (never a
    full float32 copy: 5.1 GB at 1M x 1280); what it streams is the imported rows to float16 precision."""

    def no_full_copy(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the export built a full float32 copy")

    monkeypatch.setattr(HalfRows, "__array__", no_full_copy)
    settings = settings_for(tmp_path, compress_threshold=1_000)
    with TestClient(create_app(settings, encoder=encoder)) as c:
        dim, model = c.get("/v1/gallery/stats").json()["dim"], c.get("/v1/info").json()["model_version"]
        rows = unit(6_000, dim, seed=11)
        assert bulk_post(c, npy(rows), jsonl(items_for(6_000)), model)[0] == 201
        assert c.get("/v1/gallery/stats").json()["items"] == 6_000
        assert c.app.state.serving.current.replica.gallery.compressed  # type: ignore[attr-defined]
        exported = c.get("/v1/gallery/export")
        assert exported.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(exported.content)) as tar:
        got = read_vectors(io.BytesIO(tar.extractfile(VECTORS).read()))  # type: ignore[union-attr]
        order = [int(json.loads(line)["item_id"][1:]) for line in tar.extractfile(ITEMS).read().splitlines()]  # type: ignore[union-attr]
    assert got.shape == (6_000, dim) and sorted(order) == list(range(6_000))
    np.testing.assert_allclose(got, rows[order], atol=1e-3)  # float16 keeps ~3 decimal digits of a unit vector's entries
