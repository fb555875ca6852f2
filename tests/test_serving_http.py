"""Serving under load through a real uvicorn server: batches form across requests and give each
request the embedding it gets alone; a disconnected client's frames are dropped; overload is a
429 with Retry-After; readiness follows a stalled batcher and recovers; shutdown drains."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from model.checkpoint import LoadedEncoder
from service.app import create_app
from tests.conftest import jpeg, settings_for
from tests.serving_helpers import gated_encoder, live_server, metric, wait_until
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration

SCORE_TOLERANCE = 1e-4  # cosine scores; fp32 kernels may sum in another order at another batch size


def _png(level: int) -> bytes:
    """A flat colour image: the gated fake encoder can tell requests apart by it."""
    return cv2.imencode(".png", np.full((32, 32, 3), level, np.uint8))[1].tobytes()


def _post_image(url: str, level: int, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v1/recognize/image", files={"file": ("x.png", _png(level), "image/png")}, timeout=timeout)


def test_concurrent_clips_share_batches_and_match_their_solo_answers(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    # Counts each request's 4 frames per batch: without the region stage's second submission of crops
    # (its batching is the same batcher's; tests/test_regions.py covers the stage through the app).
    settings = settings_for(tmp_path, max_batch_size=16, max_wait_ms=100, regions=False)
    clips = [clip_of(p, seed=i, frames=8) for i, p in enumerate(products[:4])]
    with live_server(create_app(settings, encoder=encoder)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        for p in products[:4]:
            r = c.post("/v1/gallery/items", files={"image": ("a.jpg", jpeg(p.image), "image/jpeg")}, data={"sku": p.sku})
            assert r.status_code == 201, r.text

        def ask(clip: bytes) -> dict[str, float]:
            r = httpx.post(f"{srv.url}/v1/recognize", params={"top_k": 4, "num_frames": 4}, files={"file": ("c.mp4", clip)}, timeout=120)
            assert r.status_code == 200, r.text
            return {x["sku"]: x["score"] for x in r.json()["results"]}

        alone = [ask(clip) for clip in clips]

        def counts() -> tuple[float, float]:
            """(batches, batches of more than 4 frames, i.e. holding frames of several requests)."""
            n = metric(srv.url, "rice_batch_size_count")
            return n, n - metric(srv.url, "rice_batch_size_bucket", le="4.0")

        before = counts()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, clips + clips))
        batches, shared = (a - b for a, b in zip(counts(), before, strict=True))
        assert before[1] == 0  # alone, no batch ever held more than one request's 4 frames
        assert shared >= 1 and batches < 8, f"8 requests x 4 frames: {batches} batches, {shared} shared"
        for solo, got in zip(alone + alone, together, strict=True):
            assert solo.keys() == got.keys()
            assert max(abs(solo[k] - got[k]) for k in solo) < SCORE_TOLERANCE
        assert metric(srv.url, "rice_stage_seconds_count", stage="queue_wait") >= 12


def _raw_request_then_disconnect(url: str, body_level: int) -> socket.socket:
    """Send a complete multipart request on a raw socket and return it (the caller closes it)."""
    host, port = url.removeprefix("http://").split(":")
    data = _png(body_level)
    boundary = "rice-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/recognize/image HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head + body)
    return sock


def test_disconnected_clients_queued_frames_are_dropped(tmp_path: Path) -> None:
    loaded, backbone = gated_encoder()
    settings = settings_for(tmp_path, max_batch_size=1, max_wait_ms=0, pipeline_depth=1)
    with live_server(create_app(settings, encoder=loaded)) as srv:
        backbone.gate.clear()  # the encoder wedges on the next batch
        backbone.seen.clear()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post_image, srv.url, 10)
            wait_until(lambda: len(backbone.seen) == 0 and metric(srv.url, "rice_inflight_requests") >= 1, what="first request")
            wait_until(lambda: metric(srv.url, "rice_queue_frames") == 0, what="first request in the encoder")
            sock = _raw_request_then_disconnect(srv.url, 200)
            wait_until(lambda: metric(srv.url, "rice_queue_frames") == 1, what="second request queued")
            sock.close()  # the viewer leaves
            wait_until(lambda: metric(srv.url, "rice_cancelled_frames_total") == 1, what="frames dropped")
            assert metric(srv.url, "rice_cancelled_requests_total") == 1
            assert metric(srv.url, "rice_queue_frames") == 0
            backbone.gate.set()
            assert first.result().status_code == 200
        assert _post_image(srv.url, 90).status_code == 200  # the service carries on
        # The encoder saw the first request and the later one, never the abandoned frame.
        levels = [v for batch in backbone.seen for v in batch]
        assert len(levels) == 2, levels


def test_overload_answers_429_with_retry_after(tmp_path: Path) -> None:
    loaded, backbone = gated_encoder()
    settings = settings_for(tmp_path, max_batch_size=1, max_wait_ms=0, max_queue_frames=2, pipeline_depth=1)
    with live_server(create_app(settings, encoder=loaded)) as srv, ThreadPoolExecutor(3) as pool:
        backbone.gate.clear()
        admitted = [pool.submit(_post_image, srv.url, 10)]
        wait_until(lambda: metric(srv.url, "rice_inflight_requests") >= 1 and metric(srv.url, "rice_queue_frames") == 0)
        admitted += [pool.submit(_post_image, srv.url, 20), pool.submit(_post_image, srv.url, 30)]
        wait_until(lambda: metric(srv.url, "rice_queue_frames") == 2, what="queue full")
        r = _post_image(srv.url, 40)
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
        assert metric(srv.url, "rice_rejected_total", queue="encoder") == 1
        assert metric(srv.url, "rice_requests_total", route="/v1/recognize/image", method="POST", status="429") == 1
        backbone.gate.set()
        assert [f.result().status_code for f in admitted] == [200, 200, 200]


def test_readiness_fails_while_the_batcher_is_stalled_and_recovers(tmp_path: Path) -> None:
    loaded, backbone = gated_encoder()
    settings = settings_for(tmp_path, stall_after_s=0.3)
    with live_server(create_app(settings, encoder=loaded)) as srv, ThreadPoolExecutor(1) as pool:
        assert httpx.get(f"{srv.url}/readyz").json() == {"ready": True, "reasons": []}
        backbone.gate.clear()
        pending = pool.submit(_post_image, srv.url, 10)
        wait_until(lambda: httpx.get(f"{srv.url}/readyz").status_code == 503, timeout_s=3, what="not ready")
        r = httpx.get(f"{srv.url}/readyz")
        assert r.json() == {"ready": False, "reasons": ["batcher_stalled"]}
        assert httpx.get(f"{srv.url}/livez").status_code == 200  # alive: a restart is not what is needed
        assert metric(srv.url, "rice_ready") == 0
        backbone.gate.set()
        assert pending.result().status_code == 200
        wait_until(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200, timeout_s=3, what="ready again")


def test_graceful_shutdown_drains_in_flight_requests(tmp_path: Path) -> None:
    loaded, backbone = gated_encoder()
    settings = settings_for(tmp_path)
    with live_server(create_app(settings, encoder=loaded)) as srv, ThreadPoolExecutor(2) as pool:
        backbone.gate.clear()
        inflight = [pool.submit(_post_image, srv.url, 10), pool.submit(_post_image, srv.url, 20)]
        wait_until(lambda: metric(srv.url, "rice_inflight_requests") >= 2, what="requests in flight")
        srv.server.should_exit = True  # what SIGTERM does
        threading.Timer(0.3, backbone.gate.set).start()
        assert [f.result().status_code for f in inflight] == [200, 200]
        srv.thread.join(timeout=10)
        assert not srv.thread.is_alive()
