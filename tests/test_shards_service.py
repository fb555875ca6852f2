"""Shop sharding through real HTTP: two replicas, shard 0 and shard 1 of 2, on one real Redis.

Writes for any shop are taken by either replica and land in the shop's shard (its own Redis
prefix); reads and recognition need the shop and are answered only by its shard (421 elsewhere);
bulk imports are split by shard; feedback enrichment routes its view by shop too."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from index.errors import JobNotFound
from index.redis_jobs import RedisJobStore
from index.redis_store import RedisStore
from index.shards import shard_of
from service.app import create_app
from service.settings import Settings
from tests.conftest import RedisServer, jpeg, settings_for
from tests.serving_helpers import gated_encoder, live_server, wait_until
from tools.client import RiceClient

pytestmark = pytest.mark.integration

# shard_of(shop, 2): shop-1 and shop-3 are on shard 0, shop-2 and shop-5 on shard 1 (tests/test_shards.py).
S0, S0B, S1, S1B = "shop-1", "shop-3", "shop-2", "shop-5"
RED, GREEN, BLUE = (30, 30, 220), (30, 200, 30), (220, 40, 40)  # BGR; the gated encoder embeds the mean colour


def _image(bgr: tuple[int, int, int]) -> bytes:
    return jpeg(np.full((64, 64, 3), bgr, np.uint8))


def _settings(tmp_path: Path, shard: int, redis_url: str, **overrides: object) -> Settings:
    return settings_for(
        tmp_path,
        gallery_path=str(tmp_path / f"s{shard}.db"),
        job_dir=str(tmp_path / "jobs"),
        regions=False,
        max_batch_size=4,
        redis_url=redis_url,
        shards=2,
        shard=shard,
        sync_wait_s=5.0,
        **overrides,
    )


def _add(url: str, sku: str, bgr: tuple[int, int, int], shop: str | None, headers: dict[str, str] | None = None) -> httpx.Response:
    data = {"sku": sku} | ({"shop_id": shop} if shop is not None else {})
    return httpx.post(
        f"{url}/v1/gallery/items", files={"image": ("x.jpg", _image(bgr), "image/jpeg")}, data=data, headers=headers, timeout=60
    )


def _recognize(url: str, bgr: tuple[int, int, int], headers: dict[str, str] | None = None, **params: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/recognize/image", content=_image(bgr), params=params, headers=headers, timeout=60)


def _skus(url: str, shop: str) -> list[str]:
    r = httpx.get(f"{url}/v1/gallery/items", params={"shop_id": shop, "limit": 500}, timeout=30)
    assert r.status_code == 200, r.text
    return sorted(i["sku"] for i in r.json()["items"])


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    message: str = r.json()["error"]["message"]
    return message


def _bulk(url: str, vectors: np.ndarray, rows: list[dict[str, Any]], model_version: str) -> httpx.Response:
    buf = io.BytesIO()
    np.save(buf, vectors.astype(np.float32))
    items = "".join(json.dumps(r) + "\n" for r in rows).encode()
    files = {"vectors": ("v.npy", buf.getvalue(), "application/octet-stream"), "items": ("i.jsonl", items, "application/x-ndjson")}
    return httpx.post(f"{url}/v1/gallery/bulk", files=files, data={"model_version": model_version}, timeout=60)


def test_the_shops_of_the_fixed_test_values_are_where_the_test_says() -> None:
    assert [shard_of(s, 2) for s in (S0, S0B, S1, S1B)] == [0, 0, 1, 1]


def test_two_shards_route_writes_refuse_misdirected_reads_and_split_bulk_imports(tmp_path: Path, redis_server: RedisServer) -> None:
    app0 = create_app(_settings(tmp_path, 0, redis_server.url, enrich="confirmed"), encoder=gated_encoder()[0])
    app1 = create_app(_settings(tmp_path, 1, redis_server.url, enrich="confirmed"), encoder=gated_encoder()[0])
    with live_server(app0) as a, live_server(app1) as b:
        u0, u1 = a.url, b.url
        info0, info1 = httpx.get(f"{u0}/v1/info").json(), httpx.get(f"{u1}/v1/info").json()
        assert (info0["shards"], info0["shard"], info1["shards"], info1["shard"]) == (2, 0, 2, 1)

        # A shop of shard 1 written through shard 0's replica lands in shard 1 only.
        r = _add(u0, "RED", RED, S1)
        assert r.status_code == 201, r.text
        created = r.json()
        assert (created["shard"], created["shop_id"]) == (1, S1)
        found = _recognize(u1, RED, headers={"X-Shop-Id": S1}, min_gallery_version=created["gallery_version"])
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["sku"] == "RED" and found.json()["results"][0]["shop_id"] == S1
        assert _skus(u1, S1) == ["RED"]
        assert httpx.get(f"{u0}/v1/gallery/stats").json()["items"] == 0  # shard 0's gallery never held it
        assert httpx.get(f"{u1}/v1/gallery/stats").json()["items"] == 1
        thumb = httpx.get(f"{u1}/v1/gallery/items/{created['item_id']}/thumbnail", params={"shop_id": S1})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"  # written into shard 1's store
        # In Redis: shard 1's prefix holds it, shard 0's and the unsharded prefix hold nothing.
        for prefix, version in (("rice:{gallery-s1}:", created["gallery_version"]), ("rice:{gallery-s0}:", 0), ("rice:{gallery}:", 0)):
            store = RedisStore(redis_server.url, prefix)
            try:
                assert store.version() == version, prefix
            finally:
                store.close()

        # A shop of shard 0 added on shard 0 (through the header): answered and visible there.
        r = _add(u0, "GREEN", GREEN, None, headers={"X-Shop-Id": S0})
        assert r.status_code == 201 and r.json()["shard"] == 0 and r.json()["shop_id"] == S0, r.text
        assert _recognize(u0, GREEN, shop_id=S0).json()["results"][0]["sku"] == "GREEN"

        # A non-ASCII shop id in the header is its UTF-8 text (nginx hashes the header's raw bytes).
        utf8 = {"X-Shop-Id": "店铺-7".encode()}  # shard 1
        r = httpx.post(f"{u0}/v1/gallery/items", files={"image": ("x.jpg", _image(BLUE))}, data={"sku": "BLUE"}, headers=utf8)
        assert r.status_code == 201 and (r.json()["shop_id"], r.json()["shard"]) == ("店铺-7", 1), r.text
        wait_until(lambda: _skus(u1, "店铺-7") == ["BLUE"], 30, "shard 1 to apply the write")
        assert httpx.get(f"{u1}/v1/gallery/items", headers=utf8).json()["items"][0]["shop_id"] == "店铺-7"
        _error(httpx.get(f"{u0}/v1/gallery/items", headers=utf8), 421, "wrong_shard")
        assert httpx.delete(f"{u0}/v1/gallery/skus/BLUE", headers=utf8).status_code == 200

        # Reads for a shop of the other shard: 421, naming both shards.
        message = _error(_recognize(u0, RED, shop_id=S1), 421, "wrong_shard")
        assert "shard 1" in message and "shard 0" in message and repr(S1) in message
        _error(httpx.get(f"{u0}/v1/gallery/items", params={"shop_id": S1}), 421, "wrong_shard")
        _error(httpx.get(f"{u1}/v1/gallery/export", headers={"X-Shop-Id": S0}), 421, "wrong_shard")
        _error(httpx.get(f"{u1}/v1/jobs/{'0' * 32}", params={"shop_id": S0}), 421, "wrong_shard")

        # No shop at all: 400 shop_required on every gallery and recognition route; the others work.
        shopless = [
            _recognize(u0, RED),
            httpx.post(f"{u0}/v1/recognize", content=b"x", timeout=30),
            httpx.post(f"{u0}/v1/recognize/timeline", content=b"x", timeout=30),
            httpx.post(f"{u0}/v1/jobs/timeline", content=b"x", timeout=30),
            httpx.get(f"{u0}/v1/jobs/{'0' * 32}"),
            httpx.delete(f"{u0}/v1/jobs/{'0' * 32}"),
            httpx.get(f"{u0}/v1/gallery/items"),
            httpx.get(f"{u0}/v1/gallery/items/x/thumbnail"),
            httpx.get(f"{u0}/v1/gallery/items/x/original"),
            httpx.get(f"{u0}/v1/gallery/export"),
            httpx.delete(f"{u0}/v1/gallery/items/x"),
            httpx.delete(f"{u0}/v1/gallery/skus/RED"),
            httpx.delete(f"{u0}/v1/gallery/items", params={"source": "feedback"}),
            _add(u0, "BLUE", BLUE, None),
        ]
        for r in shopless:
            message = _error(r, 400, "shop_required")
            assert "sharded deployment" in message and "shop_id" in message and "X-Shop-Id" in message
        for path in ("/livez", "/readyz", "/metrics", "/v1/info", "/v1/gallery/stats", "/docs", "/openapi.json", "/"):
            assert httpx.get(f"{u0}{path}", timeout=30).status_code == 200, path

        # The shop as query parameter or header; both given and different: 400; a form field that differs: 400.
        assert _recognize(u1, RED, shop_id=S1).status_code == 200
        assert _recognize(u1, RED, headers={"X-Shop-Id": S1}, shop_id=S1).status_code == 200
        _error(_recognize(u1, RED, headers={"X-Shop-Id": S1B}, shop_id=S1), 400, "bad_request")
        _error(_add(u1, "BLUE", BLUE, S0, headers={"X-Shop-Id": S1}), 400, "bad_request")

        # A bulk import of several shops through one replica is split by shard; a shop-less row is refused by number.
        mv = info0["model_version"]
        rows = [{"item_id": f"bulk-{i}", "sku": f"BULK{i}", "shop_id": shop} for i, shop in enumerate([S0, S1, S0B, S1B, S1])]
        vectors = np.random.default_rng(0).standard_normal((len(rows), 4)).astype(np.float32)
        r = _bulk(u1, vectors[:2], [rows[0], {"item_id": "bare", "sku": "BARE"}], mv)
        assert "row 2" in _error(r, 400, "bad_request")
        r = _bulk(u1, vectors, rows, mv)
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["imported"] == 5 and set(body["gallery_versions"]) == {"0", "1"}
        assert body["gallery_version"] == body["gallery_versions"]["1"]  # this replica's shard's
        wait_until(lambda: _skus(u0, S0) == ["BULK0", "GREEN"] and _skus(u0, S0B) == ["BULK2"], 30, "shard 0 to apply its part")
        wait_until(lambda: _skus(u1, S1) == ["BULK1", "BULK4", "RED"] and _skus(u1, S1B) == ["BULK3"], 30, "shard 1 to apply its part")
        assert httpx.get(f"{u0}/v1/gallery/stats").json()["items"] == 3 and httpx.get(f"{u1}/v1/gallery/stats").json()["items"] == 4

        # Feedback (any replica: records are shared) enriches the shop's shard, wherever it is taken.
        reddish = (60, 60, 200)  # not the catalog image itself: its view then outranks the catalog item
        answer = _recognize(u1, reddish, shop_id=S1).json()
        assert answer["results"][0]["sku"] == "RED"
        r = httpx.post(f"{u0}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "correct"}, timeout=30)
        assert r.status_code == 200, r.text
        view = r.json()["view_item_id"]
        again = _recognize(u1, reddish, shop_id=S1, min_gallery_version=r.json()["gallery_version"]).json()
        assert again["results"][0]["item_id"] == view and again["results"][0]["source"] == "feedback"
        assert httpx.get(f"{u0}/v1/gallery/stats").json()["items"] == 3  # not in shard 0
        # A later verdict taken on shard 0 removes the view from shard 1's store.
        r = httpx.post(f"{u0}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "none_of_these"}, timeout=30)
        assert r.status_code == 200 and r.json()["removed"] == [view], r.text
        wait_until(lambda: _skus(u1, S1) == ["BULK1", "BULK4", "RED"], 30, "shard 1 to drop the view")

        # Timeline jobs live in their shard's job store: shard 0's replicas know a shard-0 shop's job, shard 1's do not.
        r = httpx.post(f"{u0}/v1/jobs/timeline", content=b"not a video", headers={"X-Shop-Id": S0}, timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert httpx.get(f"{u0}/v1/jobs/{job_id}", params={"shop_id": S0}).status_code == 200
        _error(httpx.get(f"{u1}/v1/jobs/{job_id}", params={"shop_id": S1}), 404, "not_found")
        for prefix, known in (("rice:{jobs-s0}:", True), ("rice:{jobs-s1}:", False), ("rice:{jobs}:", False)):
            jobs = RedisJobStore(redis_server.url, prefix)
            try:
                if known:
                    assert jobs.get(job_id).job_id == job_id
                else:
                    with pytest.raises(JobNotFound):
                        jobs.get(job_id)
            finally:
                jobs.close()

        # Deletes route too: RED of shop-2 removed through shard 0's replica.
        r = httpx.delete(f"{u0}/v1/gallery/skus/RED", params={"shop_id": S1})
        assert r.status_code == 200 and r.json()["shard"] == 1 and r.json()["deleted"] == [created["item_id"]], r.text
        wait_until(lambda: _skus(u1, S1) == ["BULK1", "BULK4"], 30, "shard 1 to apply the delete")
        r = httpx.delete(f"{u1}/v1/gallery/items/bulk-0", headers={"X-Shop-Id": S0})
        assert r.status_code == 200 and r.json() == {"deleted": ["bulk-0"], "gallery_version": r.json()["gallery_version"], "shard": 0}
        wait_until(lambda: _skus(u0, S0) == ["GREEN"], 30, "shard 0 to apply the delete")
        with RiceClient(u0) as client:  # the Python client passes the shop where a sharded deployment needs it
            assert client.delete_item("bulk-2", shop_id=S0B).deleted == ["bulk-2"]
            green = _add(u1, "GREEN2", GREEN, S0).json()["item_id"]  # written into shard 0 through shard 1
            wait_until(lambda: "GREEN2" in _skus(u0, S0), 30, "shard 0 to apply the write")
            assert client.thumbnail(green, shop_id=S0)[:2] == b"\xff\xd8"  # a JPEG, from shard 0's store


def test_unsharded_default_answers_as_before(tmp_path: Path) -> None:
    """RICE_SHARDS=1 (default): no shop needed anywhere, writes answer shard 0, the header is the query parameter."""
    settings = settings_for(tmp_path, regions=False, max_batch_size=4)
    assert (settings.shards, settings.shard) == (1, 0)
    with live_server(create_app(settings, encoder=gated_encoder()[0])) as srv:
        r = _add(srv.url, "RED", RED, None)
        assert r.status_code == 201 and r.json()["shard"] == 0 and r.json()["shop_id"] is None
        assert _add(srv.url, "GREEN", GREEN, "shop-x").status_code == 201
        assert _recognize(srv.url, RED).json()["results"][0]["sku"] == "RED"
        assert _recognize(srv.url, RED, headers={"X-Shop-Id": "shop-x"}).json()["results"][0]["sku"] == "GREEN"  # only shop-x's
        _error(_recognize(srv.url, RED, headers={"X-Shop-Id": "shop-x"}, shop_id="shop-y"), 400, "bad_request")
        info = httpx.get(f"{srv.url}/v1/info").json()
        assert (info["shards"], info["shard"]) == (1, 0)
        r = _bulk(srv.url, np.ones((1, 4), np.float32), [{"item_id": "b", "sku": "B"}], info["model_version"])
        assert r.status_code == 201 and set(r.json()) == {"imported", "gallery_version"}  # no per-shard versions
