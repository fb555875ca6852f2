"""End to end through a real HTTP server on localhost: ingest catalog images, upload clips written
as real MP4 files, get the right SKU back; the gallery survives a restart; deletes and shop filter."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from model.checkpoint import LoadedEncoder
from service.server import background_server
from tests.conftest import jpeg, settings_for
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration


def _ingest(client: httpx.Client, products: list[DemoProduct]) -> int:
    version = 0
    for p in products:
        r = client.post(
            "/v1/gallery/items",
            files={"image": (f"{p.sku}.jpg", jpeg(p.image), "image/jpeg")},
            data={"sku": p.sku, "shop_id": p.shop_id, "metadata": json.dumps({"name": p.name})},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["sku"] == p.sku and body["shop_id"] == p.shop_id
        assert body["gallery_version"] > version  # every write gets a new, larger version
        version = body["gallery_version"]
    return version


def _top(client: httpx.Client, clip: bytes, **params: object) -> dict:
    r = client.post("/v1/recognize", params=params, files={"file": ("clip.mp4", clip, "video/mp4")})
    assert r.status_code == 200, r.text
    return r.json()


def test_clips_are_recognised_and_gallery_survives_restart(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    clips = {p.sku: clip_of(p, seed=i) for i, p in enumerate(products)}
    settings = settings_for(tmp_path)

    with background_server(settings, encoder) as url, httpx.Client(base_url=url, timeout=60) as c:
        version = _ingest(c, products)
        first = {}
        for p in products:
            body = _top(c, clips[p.sku], top_k=3)
            assert body["frames_used"] == 10
            assert body["gallery_version"] == version
            assert body["model_version"] == encoder.model_version
            assert {"decode", "encode", "search", "total"} <= set(body["timings_ms"])
            assert len(body["results"]) == 3
            scores = [r["score"] for r in body["results"]]
            assert scores == sorted(scores, reverse=True)
            first[p.sku] = body["results"]
        # Clearly visible products: the right SKU ranks first for every clip.
        assert {sku: res[0]["sku"] for sku, res in first.items()} == {p.sku: p.sku for p in products}
        assert first[products[0].sku][0]["metadata"] == {"name": products[0].name}

        # The verdict: a match against the model's threshold, or the request's own min_score.
        threshold = c.get("/v1/info").json()["match_threshold"]
        body = _top(c, clips[products[0].sku], top_k=3)
        top = body["results"][0]["score"]
        assert body["match_threshold"] == threshold and body["match"] is (top >= threshold)
        assert _top(c, clips[products[0].sku], min_score=min(top + 0.01, 1.0))["match"] is False
        strict = _top(c, clips[products[0].sku], min_score=top - 0.01)
        assert strict["match"] is True and strict["match_threshold"] == pytest.approx(top - 0.01)
        assert c.post("/v1/recognize", params={"min_score": 2}, files={"file": ("c.mp4", b"x")}).status_code == 422

    # A new process on the same gallery file answers the same.
    with background_server(settings, encoder) as url, httpx.Client(base_url=url, timeout=60) as c:
        stats = c.get("/v1/gallery/stats").json()
        assert stats["items"] == len(products) and stats["gallery_version"] == version
        for p in products[:3]:
            assert _top(c, clips[p.sku], top_k=3)["results"] == first[p.sku]


def test_shop_filter_and_deletes(client, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:  # type: ignore[no-untyped-def]
    _ingest(client, products)
    target = products[0]
    clip = clip_of(target, seed=11)
    other_shop = next(p.shop_id for p in products if p.shop_id != target.shop_id)

    body = _top(client, clip, top_k=10, shop_id=target.shop_id)
    assert body["results"][0]["sku"] == target.sku
    assert {r["shop_id"] for r in body["results"]} == {target.shop_id}
    assert len(body["results"]) == sum(p.shop_id == target.shop_id for p in products)

    body = _top(client, clip, top_k=10, shop_id=other_shop)
    assert target.sku not in [r["sku"] for r in body["results"]]
    assert _top(client, clip, shop_id="no-such-shop")["results"] == []

    # A second image of the same SKU: still one result per SKU.
    r = client.post(
        "/v1/gallery/items",
        files={"image": ("b.jpg", jpeg(target.image[::-1].copy()), "image/jpeg")},
        data={"sku": target.sku, "shop_id": target.shop_id, "item_id": "second"},
    )
    assert r.status_code == 201
    skus = [x["sku"] for x in _top(client, clip, top_k=10)["results"]]
    assert len(skus) == len(set(skus)) == len(products)

    # Delete one image, then the whole SKU; it disappears from results; a second delete is a 404.
    r = client.delete("/v1/gallery/items/second")
    assert r.status_code == 200 and r.json()["deleted"] == ["second"]
    assert client.delete("/v1/gallery/items/second").status_code == 404
    r = client.delete(f"/v1/gallery/skus/{target.sku}")
    assert r.status_code == 200 and len(r.json()["deleted"]) == 1
    body = _top(client, clip, top_k=10)
    assert target.sku not in [x["sku"] for x in body["results"]]
    assert body["gallery_version"] == r.json()["gallery_version"]
    r = client.delete(f"/v1/gallery/skus/{target.sku}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/gallery/stats").json()["skus"] == len(products) - 1


def test_upsert_by_item_id_replaces(client, products: list[DemoProduct]) -> None:  # type: ignore[no-untyped-def]
    a, b = products[0], products[1]
    for p in (a, b):
        r = client.post(
            "/v1/gallery/items", files={"image": ("x.jpg", jpeg(p.image), "image/jpeg")}, data={"sku": p.sku, "item_id": "same"}
        )
        assert r.status_code == 201
    stats = client.get("/v1/gallery/stats").json()
    assert stats["items"] == 1 and stats["skus"] == 1
    r = client.post("/v1/recognize/image", files={"file": ("q.jpg", jpeg(b.image), "image/jpeg")})
    assert r.status_code == 200 and [x["sku"] for x in r.json()["results"]] == [b.sku]


def test_info_health_and_metrics(client) -> None:  # type: ignore[no-untyped-def]
    info = client.get("/v1/info").json()
    assert info["model_version"].startswith("effnet-lite0-imagenet-")
    assert "no checkpoint" in info["model_source"]
    assert info["embedding_dim"] == 1280 and info["limits"]["max_num_frames"] >= 10
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"ready": True, "reasons": []}
    text = client.get("/metrics").text
    assert "rice_stage_seconds" in text and "rice_gallery_items 0.0" in text
