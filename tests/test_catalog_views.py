"""Gallery-side views (pipeline.catalog_views, index.views): extra vectors of an item, one item to clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.gallery import Gallery
from index.records import Record
from index.sqlite_store import SQLiteStore
from index.views import MAX_VIEWS, base_id, is_view, view_ids
from model.checkpoint import LoadedEncoder
from pipeline.catalog_views import LADDER, catalog_views
from service.app import create_app
from service.settings import Settings
from tests.conftest import jpeg, settings_for
from tests.test_verify import product_image
from tools.reindex import run_reindex


def test_setting_default_is_off() -> None:
    assert Settings().catalog_views == 0


def test_views_shrink_the_product_over_its_blurred_surround() -> None:
    rng = np.random.default_rng(0)
    frame = np.full((224, 224, 3), 255, np.uint8)  # a packshot on white
    frame[40:184, 60:164] = rng.integers(0, 200, (144, 104, 3))
    views = catalog_views(frame, MAX_VIEWS)
    assert views.shape == (MAX_VIEWS, 224, 224, 3) and views.dtype == np.uint8 and len(LADDER) == MAX_VIEWS
    assert np.array_equal(views, catalog_views(frame, MAX_VIEWS))  # deterministic: replicas and reindex agree
    assert catalog_views(frame, 0).shape == (0, 224, 224, 3)
    small = views[1]  # the product at 0.35 of the side: its corners are surround (grey, not the white backdrop)
    assert small[:20, :20].mean() < 225 and np.abs(small[:20, :20].astype(int) - small[:20, :20].mean()).max() < 30
    with pytest.raises(ValueError):
        catalog_views(frame, MAX_VIEWS + 1)


def test_gallery_answers_a_view_as_its_item_and_never_lists_it() -> None:
    dim = 8
    eye = np.eye(dim, dtype=np.float32)
    g = Gallery(dim)
    recs = [Record("a", "sku-a", None, eye[0], {"t": 1}, 1), Record("b", "sku-b", None, eye[1], {}, 1)]
    recs += [Record(v, "sku-a", None, eye[2 + k], {"t": 1}, 1) for k, v in enumerate(view_ids("a", 2))]
    g.apply(recs)
    assert len(g) == 4 and g.stats()["items"] == 2  # four vectors, two items
    assert g.has("a#v1") and not g.has("a#v3")
    total, listed = g.list_items()
    assert total == 2 and [h.item_id for h in listed] == ["a", "b"]
    _, items, vectors = g.export()
    assert [i[0] for i in items] == ["a", "b"] and vectors.shape == (2, dim)
    hits, _ = g.search(eye[3], 2)  # only view 2 of item a matches
    assert hits[0][0].sku == "sku-a" and hits[0][0].item_id == "a" and hits[0][0].score == pytest.approx(1.0)
    g.apply([Record(v, "sku-a", None, None, {}, 2, deleted=True) for v in view_ids("a", 2)])
    assert len(g) == 2 and g.stats()["items"] == 2
    assert base_id("x#v3") == "x" and base_id("x") == "x" and is_view("x#v1") and not is_view("x")


@pytest.mark.integration
def test_views_are_written_replaced_and_deleted_with_their_item(tmp_path: Path, encoder: LoadedEncoder) -> None:
    def add(c: TestClient, seed: int, item_id: str) -> None:
        files = {"image": ("p.jpg", jpeg(product_image(seed, 360, 280)), "image/jpeg")}
        r = c.post("/v1/gallery/items", files=files, data={"sku": f"sku-{seed}", "item_id": item_id})
        assert r.status_code == 201, r.text

    with TestClient(create_app(settings_for(tmp_path, catalog_views=2), encoder=encoder)) as c:
        add(c, 1, "one")
        add(c, 2, "two")
        gallery = c.app.state.serving.current.replica.gallery  # type: ignore[attr-defined]
        assert len(gallery) == 6 and c.get("/v1/gallery/stats").json()["items"] == 2
        assert gallery.has("one#v2") and not gallery.has("one#v3")
        listed = c.get("/v1/gallery/items").json()
        assert sorted(i["item_id"] for i in listed["items"]) == ["one", "two"] and listed["total"] == 2
        r = c.post("/v1/recognize/image", params={"top_k": 2}, files={"file": ("q.jpg", jpeg(product_image(1, 360, 280)), "image/jpeg")})
        assert {h["item_id"] for h in r.json()["results"]} <= {"one", "two"}  # never a view id
        deleted = c.delete("/v1/gallery/items/one").json()
        assert deleted["deleted"] == ["one"] and len(gallery) == 3 and not gallery.has("one#v1")
    # the same gallery served with fewer views: replacing the item drops its extra views
    with TestClient(create_app(settings_for(tmp_path, catalog_views=1), encoder=encoder)) as c:
        gallery = c.app.state.serving.current.replica.gallery  # type: ignore[attr-defined]
        assert gallery.has("two#v2")
        add(c, 2, "two")
        assert gallery.has("two#v1") and not gallery.has("two#v2") and len(gallery) == 2
        assert c.delete("/v1/gallery/skus/sku-2").json()["deleted"] == ["two"]  # a SKU goes with its views
        assert len(gallery) == 0


@pytest.mark.integration
def test_reindex_makes_views_again_and_never_embeds_one_as_an_item(tmp_path: Path, encoder: LoadedEncoder) -> None:
    with TestClient(create_app(settings_for(tmp_path, catalog_views=2), encoder=encoder)) as c:
        for seed, item_id in ((1, "one"), (2, "two")):
            files = {"image": ("p.jpg", jpeg(product_image(seed, 360, 280)), "image/jpeg")}
            assert c.post("/v1/gallery/items", files=files, data={"sku": f"sku-{seed}", "item_id": item_id}).status_code == 201
    store = SQLiteStore(str(tmp_path / "gallery.db"))
    report = run_reindex(None, [], store, settings_for(tmp_path, catalog_views=2), [], None)
    assert report.gallery_items == 2 and report.embedded == 2 and report.missing == [] and report.failed == {}
    live: dict[str, Record] = {}
    for r in store.changes_since(report.model_version, 0):
        live[r.item_id] = r
    assert sorted(i for i, r in live.items() if not r.deleted) == ["one", "one#v1", "one#v2", "two", "two#v1", "two#v2"]
    assert live["two#v2"].sku == "sku-2" and live["two#v2"].vector is not None
    assert not np.allclose(live["two#v2"].vector, live["two"].vector)  # a view is its own vector
