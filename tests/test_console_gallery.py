"""What the console reads from the stores: thumbnails (shared by every model's copy of an item,
gone with the item, replicated through Redis) and live items per namespace (the model-switch
warning), identical on the embedded SQLite store and on Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from index.records import Namespaces, Record, Store, Thumbnails
from index.redis_store import RedisStore
from index.sqlite_store import SQLiteStore
from model.checkpoint import LoadedEncoder
from service.server import background_server
from service.settings import Settings
from tests.conftest import RedisServer, jpeg, settings_for
from tools.client import RequestRejected, RiceClient
from tools.democatalog import DemoProduct


def _rec(item_id: str, sku: str, dim: int = 4) -> Record:
    v = np.ones(dim, np.float32) / np.sqrt(dim)
    return Record(item_id, sku, "shop-1", v)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s: Store = SQLiteStore(tmp_path / "g.db")
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url)
    try:
        yield s
    finally:
        s.close()


def test_thumbnails_and_namespace_counts(store: Store) -> None:
    assert isinstance(store, Thumbnails) and isinstance(store, Namespaces)
    store.upsert("model-a", [_rec("i1", "S1"), _rec("i2", "S2")])
    store.upsert("model-b", [_rec("i1", "S1", dim=8)])
    store.put_thumbnail("i1", b"jpeg-1")
    store.put_thumbnail("i2", b"jpeg-2")
    store.put_thumbnail("i2", b"jpeg-2b")  # replaced
    assert store.thumbnail("i1") == b"jpeg-1" and store.thumbnail("i2") == b"jpeg-2b" and store.thumbnail("nope") is None
    assert store.namespace_counts() == {"model-a": 2, "model-b": 1}

    _, ids = store.delete_items(["i2"])
    store.delete_thumbnails(ids)
    assert store.thumbnail("i2") is None and store.namespace_counts()["model-a"] == 1

    # a thumbnail stays while any namespace still holds its item live
    store.upsert("model-c", [_rec("i1", "S1")])
    store.delete_thumbnails(["i1"])
    assert store.thumbnail("i1") == b"jpeg-1"
    _, ids = store.delete_sku("S1")
    store.delete_thumbnails(ids)
    assert store.thumbnail("i1") is None
    assert {ns: n for ns, n in store.namespace_counts().items() if n} == {}


@pytest.mark.integration
def test_thumbnails_are_replicated_through_redis(
    tmp_path: Path, redis_server: RedisServer, encoder: LoadedEncoder, products: list[DemoProduct]
) -> None:
    def settings(name: str) -> Settings:
        return settings_for(tmp_path / name, port=0, redis_url=redis_server.url)

    with (
        background_server(settings("a"), encoder) as a,
        background_server(settings("b"), encoder) as b,
        RiceClient(a) as writer,
        RiceClient(b) as reader,
    ):
        added = writer.add_item(jpeg(products[0].image), products[0].sku, products[0].shop_id, "shared-1")
        # read-your-writes on the other replica, then its listing and the thumbnail written through replica a
        reader.recognize(jpeg(products[0].image), min_gallery_version=added.gallery_version, filename="q.jpg")
        assert [i.item_id for i in reader.list_items().items] == ["shared-1"]
        assert reader.thumbnail("shared-1") == writer.thumbnail("shared-1")
        deleted = writer.delete_item("shared-1")
        reader.recognize(jpeg(products[0].image), min_gallery_version=deleted.gallery_version, filename="q.jpg")
        assert reader.list_items().total == 0
        with pytest.raises(RequestRejected):
            reader.thumbnail("shared-1")


def test_listing_pages_are_in_sku_order_whatever_their_offset() -> None:
    """Early pages come from a bounded heap, late ones from a full sort: both give the same order."""
    from index.gallery import Gallery

    g = Gallery(4)
    rng = np.random.default_rng(0)
    skus = [f"S{int(x):04d}" for x in rng.integers(0, 500, 400)]
    g.apply([Record(f"i{i:03d}", sku, f"shop-{i % 3}", np.ones(4, np.float32) / 2, {}, i + 1) for i, sku in enumerate(skus)])
    expected = sorted((sku, f"i{i:03d}") for i, sku in enumerate(skus))
    pages = [g.list_items(offset=o, limit=10) for o in range(0, 400, 10)]
    assert all(total == 400 for total, _ in pages)
    assert [(h.sku, h.item_id) for _, hits in pages for h in hits] == expected
    total, hits = g.list_items(sku="s00", shop_id="shop-1", offset=2, limit=5)
    matching = [(s, i) for s, i in expected if s.lower().startswith("s00") and int(i[1:]) % 3 == 1]
    assert total == len(matching) and [(h.sku, h.item_id) for h in hits] == matching[2:7]
