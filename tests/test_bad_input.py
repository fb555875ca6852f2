"""Bad input gets a clear 4xx with {"error": {"code", "message"}}, never a 500, and the service
keeps serving valid requests afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.checkpoint import LoadedEncoder
from service.app import create_app
from tests.conftest import jpeg, settings_for, wav_bytes
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct


def _frames(w: int, h: int, n: int) -> list[np.ndarray]:
    return [np.full((h, w, 3), 40 * i % 255, np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def good_clip(products: list[DemoProduct], clip_of: Callable[..., bytes]) -> bytes:
    return clip_of(products[0], seed=5)


def _bad_clips(good: bytes) -> dict[str, tuple[bytes, int]]:
    png = cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 4096] = b"\x00" * 4096
    return {
        "empty": (b"", 422),
        "random bytes": (np.random.default_rng(0).bytes(50_000), 415),
        "text": (b"hello, this is not a video\n" * 100, 415),
        "truncated mp4": (good[: len(good) // 2], 422),
        "mp4 header only": (good[:64], 422),
        "png sent as video": (png, 415),
        "jpeg sent as video": (jpeg(np.zeros((32, 32, 3), np.uint8)), 415),
        "wav audio": (wav_bytes(), 415),
        "tiny 2x2 video": (encode_video(_frames(2, 2, 5)), 422),
        "html": (b"<html><body>not a clip</body></html>", 415),
    }


def test_bad_clips_get_4xx_and_service_keeps_working(client: TestClient, good_clip: bytes) -> None:
    for name, (data, status) in _bad_clips(good_clip).items():
        r = client.post("/v1/recognize", files={"file": ("x.mp4", data, "video/mp4")})
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert err["code"] and err["message"], name
    # the process is fine: a valid clip still works
    r = client.post("/v1/recognize", files={"file": ("ok.mp4", good_clip, "video/mp4")})
    assert r.status_code == 200 and r.json()["frames_used"] == 10


def test_corrupted_middle_of_mp4_is_handled(client: TestClient, good_clip: bytes) -> None:
    """Damage inside the media data (not the container): the decoder conceals it, and every
    sampled frame still comes back; the request must not fail or lose frames."""
    corrupt = bytearray(good_clip)
    mid = len(corrupt) // 2
    corrupt[mid : mid + 2000] = np.random.default_rng(1).bytes(2000)
    r = client.post("/v1/recognize", files={"file": ("x.mp4", bytes(corrupt), "video/mp4")})
    assert r.status_code == 200, r.text
    assert r.json()["frames_used"] == 10


def test_request_errors(client: TestClient, good_clip: bytes, products: list[DemoProduct]) -> None:
    cases = [
        ("no file at all", lambda: client.post("/v1/recognize"), 400),
        ("wrong field name", lambda: client.post("/v1/recognize", files={"video": ("x.mp4", good_clip, "video/mp4")}), 400),
        ("top_k zero", lambda: client.post("/v1/recognize?top_k=0", files={"file": ("x.mp4", good_clip)}), 422),
        ("top_k not a number", lambda: client.post("/v1/recognize?top_k=abc", files={"file": ("x.mp4", good_clip)}), 422),
        ("top_k too large", lambda: client.post("/v1/recognize?top_k=100000", files={"file": ("x.mp4", good_clip)}), 422),
        ("num_frames too large", lambda: client.post("/v1/recognize?num_frames=100000", files={"file": ("x.mp4", good_clip)}), 422),
        ("ingest without sku", lambda: client.post("/v1/gallery/items", files={"image": ("a.jpg", jpeg(products[0].image))}), 422),
        ("ingest without image", lambda: client.post("/v1/gallery/items", data={"sku": "A"}), 422),
        (
            "ingest a video as image",
            lambda: client.post("/v1/gallery/items", files={"image": ("a.jpg", good_clip)}, data={"sku": "A"}),
            415,
        ),
        ("ingest empty image", lambda: client.post("/v1/gallery/items", files={"image": ("a.jpg", b"")}, data={"sku": "A"}), 422),
        (
            "metadata not JSON",
            lambda: client.post(
                "/v1/gallery/items", files={"image": ("a.jpg", jpeg(products[0].image))}, data={"sku": "A", "metadata": "{nope"}
            ),
            400,
        ),
        (
            "metadata not an object",
            lambda: client.post(
                "/v1/gallery/items", files={"image": ("a.jpg", jpeg(products[0].image))}, data={"sku": "A", "metadata": "[1]"}
            ),
            400,
        ),
        (
            "metadata with NaN",
            lambda: client.post(
                "/v1/gallery/items", files={"image": ("a.jpg", jpeg(products[0].image))}, data={"sku": "A", "metadata": '{"x": NaN}'}
            ),
            400,
        ),
        (
            "sku with spaces",
            lambda: client.post("/v1/gallery/items", files={"image": ("a.jpg", jpeg(products[0].image))}, data={"sku": "a b"}),
            400,
        ),
        ("delete unknown item", lambda: client.delete("/v1/gallery/items/nope"), 404),
        ("delete unknown sku", lambda: client.delete("/v1/gallery/skus/nope"), 404),
        ("unknown route", lambda: client.get("/v1/nothing"), 404),
        ("wrong method", lambda: client.get("/v1/recognize"), 405),
        ("image endpoint with video", lambda: client.post("/v1/recognize/image", files={"file": ("x.jpg", good_clip)}), 415),
    ]
    for name, call, status in cases:
        r = call()
        assert r.status_code == status, (name, r.status_code, r.text)
        assert set(r.json()["error"]) == {"code", "message"}, name
    assert client.get("/v1/gallery/stats").json()["items"] == 0  # nothing half-written


def test_upload_size_limit(tmp_path: Path, encoder: LoadedEncoder, good_clip: bytes) -> None:
    with TestClient(create_app(settings_for(tmp_path, max_upload_bytes=len(good_clip) - 1), encoder=encoder)) as c:
        r = c.post("/v1/recognize", files={"file": ("x.mp4", good_clip, "video/mp4")})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert c.get("/livez").status_code == 200


def test_frame_size_and_length_limits(tmp_path: Path, encoder: LoadedEncoder) -> None:
    big = encode_video(_frames(640, 480, 3))
    long = encode_video(_frames(64, 64, 40), fps=10)
    with TestClient(
        create_app(settings_for(tmp_path, max_frame_pixels=320 * 240, max_decoded_frames=30, max_duration_s=3.0), encoder=encoder)
    ) as c:
        r = c.post("/v1/recognize", files={"file": ("x.mp4", big)})
        assert r.status_code == 422 and "pixels" in r.json()["error"]["message"]
        r = c.post("/v1/recognize", files={"file": ("x.mp4", long)})
        assert r.status_code == 422 and "frames" in r.json()["error"]["message"]


def test_chunked_multipart_over_the_limit_gets_413(tmp_path: Path, encoder: LoadedEncoder) -> None:
    """No Content-Length to check up front: the limit must hold while the body streams in."""
    import httpx

    from service.server import background_server

    def body() -> Iterator[bytes]:
        yield b'--XB\r\nContent-Disposition: form-data; name="file"; filename="x.mp4"\r\nContent-Type: video/mp4\r\n\r\n'
        for _ in range(40):  # 2.5 MB against a 1 MB limit
            yield b"\x00" * 65536
        yield b"\r\n--XB--\r\n"

    with background_server(settings_for(tmp_path, max_upload_bytes=1_000_000), encoder) as url:
        r = httpx.post(f"{url}/v1/recognize", content=body(), headers={"content-type": "multipart/form-data; boundary=XB"}, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = httpx.post(f"{url}/v1/recognize", content=iter([b"\x00" * 2_000_000]), headers={"content-type": "video/mp4"}, timeout=30)
        assert r.status_code == 413
        assert httpx.get(f"{url}/livez").status_code == 200
