"""POST /v1/feedback and gallery enrichment through real HTTP: two replicas sharing a real Redis
(answer on one, feedback on the other), clear 4xx for bad ids, verdicts and SKUs, views that are
searchable, replicated, capped per SKU, exported with their source and removable in bulk; and on
the embedded store, frames kept only when configured and expired records answered 404."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.app import create_app
from service.settings import Settings
from tests.conftest import RedisServer, jpeg, settings_for
from tests.serving_helpers import gated_encoder, live_server, metric, wait_until

pytestmark = pytest.mark.integration

# Solid colours (BGR): the gated test encoder's embedding is the mean colour, so each is its own product.
CATALOG = {"RED": (30, 30, 220), "GREEN": (30, 200, 30), "BLUE": (220, 40, 40), "GREY": (128, 128, 128)}


def _image(bgr: tuple[int, int, int]) -> bytes:
    return jpeg(np.full((64, 64, 3), bgr, np.uint8))


def _recognize(url: str, bgr: tuple[int, int, int], **params: object) -> dict:
    r = httpx.post(f"{url}/v1/recognize/image", content=_image(bgr), params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _views(url: str, sku: str) -> list[str]:
    items = httpx.get(f"{url}/v1/gallery/items", params={"sku": sku, "limit": 500}, timeout=10).json()["items"]
    return sorted(i["item_id"] for i in items if i["source"] == "feedback" and i["sku"] == sku)


def _settings(tmp_path: Path, name: str, **overrides: object) -> Settings:
    return settings_for(tmp_path, gallery_path=str(tmp_path / f"{name}.db"), regions=False, max_batch_size=4, **overrides)


def test_feedback_and_enrichment_across_two_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    shared = {"redis_url": redis_server.url, "enrich": "corrected", "enrich_max_views": 2, "sync_wait_s": 5.0}
    loaded_a, _ = gated_encoder()
    loaded_b, _ = gated_encoder()
    app_a = create_app(_settings(tmp_path, "a", **shared), encoder=loaded_a)
    app_b = create_app(_settings(tmp_path, "b", **shared), encoder=loaded_b)
    with live_server(app_a) as a, live_server(app_b) as b:
        for sku, bgr in CATALOG.items():
            r = httpx.post(f"{a.url}/v1/gallery/items", files={"image": ("x.jpg", _image(bgr), "image/jpeg")}, data={"sku": sku})
            assert r.status_code == 201, r.text
        wait_until(lambda: httpx.get(f"{b.url}/v1/gallery/stats").json()["items"] == 4, 10, "replica b to see the catalog")

        # Answer on a, feedback on b: the record is in the shared store.
        query = (60, 60, 200)  # reddish: the answer's top-1 is RED
        answer = _recognize(a.url, query)
        assert answer["results"][0]["sku"] == "RED" and len(answer["request_id"]) == 32
        r = httpx.post(f"{b.url}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "wrong", "sku": "GREY"})
        assert r.status_code == 200, r.text
        body = r.json()
        view = body["view_item_id"]
        assert view == "fb-" + answer["request_id"] and body["replaced"] is None and body["sku"] == "GREY"
        # The view is searchable on both replicas: the same query now finds GREY through it.
        for url in (a.url, b.url):
            again = _recognize(url, query, min_gallery_version=body["gallery_version"])
            assert (again["results"][0]["sku"], again["results"][0]["item_id"], again["results"][0]["source"]) == ("GREY", view, "feedback")
        assert httpx.get(f"{a.url}/v1/gallery/items/{view}/thumbnail").status_code == 404  # never shown as a catalog image

        # A second verdict replaces the first; its view moves to the confirmed SKU (same item id).
        r = httpx.post(f"{a.url}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "correct"})
        assert r.status_code == 200 and r.json()["replaced"] == "wrong" and r.json()["view_item_id"] == view
        wait_until(lambda: _views(b.url, "RED") == [view] and _views(b.url, "GREY") == [], 10, "the view to move to RED")

        # The cap: three more corrections to GREY keep the newest two views (on both replicas).
        ids = []
        for shade in (100, 110, 120):
            got = _recognize(b.url, (shade, shade, shade + 40))
            rid = got["request_id"]
            verdict = {"verdict": "correct"} if got["results"][0]["sku"] == "GREY" else {"verdict": "wrong", "sku": "GREY"}
            r = httpx.post(f"{a.url}/v1/feedback", json={"request_id": rid, **verdict})
            assert r.status_code == 200 and r.json()["view_item_id"] == f"fb-{rid}", r.text
            ids.append(f"fb-{rid}")
            assert len(_views(a.url, "GREY")) <= 2
        wait_until(lambda: _views(b.url, "GREY") == sorted(ids[1:]), 10, "the cap to hold on replica b")
        assert metric(a.url, "rice_feedback_views_total", event="evicted") == 1

        # Exported with their source (and a bulk import of that export keeps it: index.bulk reads it).
        with tarfile.open(fileobj=io.BytesIO(httpx.get(f"{b.url}/v1/gallery/export", timeout=30).content)) as tar:
            member = tar.extractfile("items.jsonl")
            assert member is not None
            rows = [json.loads(line) for line in member.read().decode().splitlines()]
        assert sorted(r["item_id"] for r in rows if r.get("source") == "feedback") == sorted([view, *ids[1:]])

        # Removable in bulk on one replica, gone on the other; catalog images stay.
        r = httpx.delete(f"{b.url}/v1/gallery/items", params={"source": "feedback", "sku": "GREY"})
        assert r.status_code == 200 and sorted(r.json()["deleted"]) == sorted(ids[1:])
        wait_until(lambda: _views(a.url, "GREY") == [], 10, "replica a to drop the views")
        assert _views(a.url, "RED") == [view]
        assert httpx.get(f"{a.url}/v1/gallery/stats").json()["items"] == 5  # 4 catalog + RED's view
        r = httpx.delete(f"{a.url}/v1/gallery/items", params={"source": "feedback", "sku": "GREY"})
        assert r.status_code == 404

        # Clear 4xx for what a client can get wrong, through the one error table.
        rid = answer["request_id"]
        cases = [
            ({"request_id": "0" * 32, "verdict": "correct"}, 404, "not_found"),
            ({"request_id": rid, "verdict": "maybe"}, 422, "invalid_request"),
            ({"request_id": rid, "verdict": "wrong", "sku": "no such sku"}, 400, "bad_request"),
            ({"request_id": rid, "verdict": "wrong", "sku": "NOT-IN-GALLERY"}, 422, "unknown_sku"),
            ({"request_id": rid, "verdict": "correct", "sku": "GREEN"}, 400, "bad_request"),
            ({"request_id": rid, "verdict": "none_of_these", "sku": "GREEN"}, 400, "bad_request"),
            ({"request_id": "../etc", "verdict": "correct"}, 400, "bad_request"),
            ({"verdict": "correct"}, 422, "invalid_request"),
        ]
        for payload, status, code in cases:
            r = httpx.post(f"{b.url}/v1/feedback", json=payload)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (payload, r.text)
        # none_of_these removes the request's view.
        r = httpx.post(f"{b.url}/v1/feedback", json={"request_id": rid, "verdict": "none_of_these"})
        assert r.status_code == 200 and r.json()["removed"] == [view]
        assert metric(b.url, "rice_feedback_verdicts_total", shop="none", verdict="none_of_these") == 1


def test_frames_are_kept_only_when_configured_and_expired_ids_are_404(tmp_path: Path) -> None:
    defaults = Settings()  # what users run
    assert defaults.feedback_keep_frames is False and defaults.enrich == "off" and defaults.enrich_view == "closest"
    assert (defaults.feedback_record_ttl_s, defaults.feedback_max_records, defaults.feedback_retention_days) == (86400.0, 10_000, 30.0)
    loaded, _ = gated_encoder()
    with live_server(create_app(_settings(tmp_path, "plain"), encoder=loaded)) as srv:
        answer = _recognize(srv.url, (10, 200, 10))
        keeper = srv.server.config.app.state.feedback
        record = keeper.store.get_request(answer["request_id"], time.time())
        assert record.frames == [] and record.vector is not None and record.frame_emb is not None
        assert answer["results"] == []  # an empty gallery: "none of these" is the only right verdict
        r = httpx.post(f"{srv.url}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "correct"})
        assert r.status_code == 400 and "no results" in r.json()["error"]["message"]
        r = httpx.post(f"{srv.url}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "none_of_these"})
        assert r.status_code == 200 and r.json()["view_item_id"] is None and r.json()["gallery_version"] is None

    loaded, _ = gated_encoder()
    settings = _settings(tmp_path, "frames", feedback_keep_frames=True, feedback_record_ttl_s=0.5)
    with live_server(create_app(settings, encoder=loaded)) as srv:
        answer = _recognize(srv.url, (10, 200, 10))
        record = srv.server.config.app.state.feedback.store.get_request(answer["request_id"], time.time())
        assert len(record.frames) == 1
        frame = cv2.imdecode(np.frombuffer(record.frames[0], np.uint8), cv2.IMREAD_COLOR)
        assert frame is not None and frame.shape[2] == 3  # a real JPEG of the sampled frame
        expired = {"request_id": answer["request_id"], "verdict": "none_of_these"}
        wait_until(lambda: httpx.post(f"{srv.url}/v1/feedback", json=expired).status_code == 404, 10, "the record to expire")


def test_a_record_that_cannot_be_kept_never_fails_the_answer(tmp_path: Path) -> None:
    loaded, _ = gated_encoder()
    with live_server(create_app(_settings(tmp_path, "broken"), encoder=loaded)) as srv:
        srv.server.config.app.state.feedback.store.close()  # the store fails from now on (a real closed SQLite connection)
        answer = _recognize(srv.url, (10, 200, 10))  # still answered
        wait_until(lambda: metric(srv.url, "rice_feedback_record_errors_total") == 1, 10, "the failed write to be counted")
        r = httpx.post(f"{srv.url}/v1/feedback", json={"request_id": answer["request_id"], "verdict": "none_of_these"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"  # the store, through the error table
