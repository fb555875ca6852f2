"""A corpus of bad uploads through a real HTTP server: each gets its own 4xx with an error body,
while valid requests sent at the same time succeed, and the process stays up and ready."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from model.checkpoint import LoadedEncoder
from service.app import create_app
from tests.conftest import jpeg, settings_for, wav_bytes
from tests.serving_helpers import live_server, metric
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration

MAX_UPLOAD = 400_000


def _flat(w: int, h: int, n: int) -> list[np.ndarray]:
    return [np.full((h, w, 3), (30 * i) % 255, np.uint8) for i in range(n)]


def _png(w: int, h: int) -> bytes:
    return cv2.imencode(".png", np.full((h, w, 3), 120, np.uint8))[1].tobytes()


Call = Callable[[httpx.Client], httpx.Response]


def _clip(data: bytes, name: str = "x.mp4", **params: object) -> Call:
    return lambda c: c.post("/v1/recognize", params=params, files={"file": (name, data, "video/mp4")})


def _corpus(good: bytes) -> dict[str, tuple[Call, int]]:
    rng = np.random.default_rng(7)
    png = _png(32, 32)
    ftyp_then_garbage = good[:32] + rng.bytes(20_000)
    damaged_moov = bytearray(good)
    moov = damaged_moov.find(b"moov")
    damaged_moov[moov - 4 : moov + 400] = rng.bytes(404)  # the index that says where frames are
    too_big = rng.bytes(MAX_UPLOAD + 100_000)

    def chunks() -> Iterator[bytes]:
        for _ in range(6):
            yield b"\x00" * 100_000

    return {
        "zero bytes": (_clip(b""), 422),
        "random bytes": (_clip(rng.bytes(30_000)), 415),
        "text": (_clip(b"this is not a video\n" * 50), 415),
        "html": (_clip(b"<!doctype html><html><body>hi</body></html>"), 415),
        "pdf": (_clip(b"%PDF-1.4\n" + rng.bytes(5000)), 415),
        "gzip": (_clip(gzip.compress(b"x" * 10_000)), 415),
        "truncated mp4": (_clip(good[: len(good) // 2]), 422),
        "mp4 header only": (_clip(good[:64]), 422),
        "mp4 ftyp then garbage": (_clip(ftyp_then_garbage), 422),
        "mp4 with a corrupt index": (_clip(bytes(damaged_moov)), 422),
        "matroska magic then garbage": (_clip(b"\x1a\x45\xdf\xa3" + rng.bytes(5000)), 422),
        "avi header then garbage": (_clip(b"RIFF\x00\x10\x00\x00AVI LIST" + rng.bytes(5000)), 422),
        "png sent as video": (_clip(png, "x.png"), 415),
        "jpeg sent as video": (_clip(jpeg(np.zeros((32, 32, 3), np.uint8)), "x.jpg"), 415),
        "wav audio only": (_clip(wav_bytes(), "x.wav"), 415),
        "mp3 audio only": (_clip(b"ID3\x04\x00\x00\x00\x00\x00\x00" + rng.bytes(5000), "x.mp3"), 415),
        "1x1 video": (_clip(encode_video(_flat(1, 1, 4), fourcc="MJPG", suffix=".avi"), "x.avi"), 422),
        "huge frame size": (_clip(encode_video(_flat(640, 480, 2))), 422),
        "too many frames": (_clip(encode_video(_flat(32, 32, 60))), 422),
        "too long": (_clip(encode_video(_flat(32, 32, 12), fps=0.5)), 422),
        "wrong content type (json body)": (
            lambda c: c.post("/v1/recognize", content=json.dumps({"file": "clip.mp4"}), headers={"content-type": "application/json"}),
            415,
        ),
        "missing field": (lambda c: c.post("/v1/recognize", files={"video": ("x.mp4", good, "video/mp4")}), 400),
        "no body": (lambda c: c.post("/v1/recognize"), 400),
        "too-large upload": (_clip(too_big), 413),
        "too-large chunked upload": (
            lambda c: c.post("/v1/recognize", content=chunks(), headers={"content-type": "video/mp4"}),
            413,
        ),
        "num_frames zero": (_clip(good, num_frames=0), 422),
        "num_frames too many": (_clip(good, num_frames=10_000), 422),
        "top_k not a number": (_clip(good, top_k="many"), 422),
        "video sent as image": (lambda c: c.post("/v1/recognize/image", files={"file": ("x.jpg", good)}), 415),
        "truncated png": (lambda c: c.post("/v1/recognize/image", files={"file": ("x.png", png[:40])}), 415),
        "2x2 image": (lambda c: c.post("/v1/recognize/image", files={"file": ("x.png", _png(2, 2))}), 422),
        "huge image": (lambda c: c.post("/v1/recognize/image", files={"file": ("x.png", _png(800, 800))}), 422),
        "audio as catalog image": (
            lambda c: c.post("/v1/gallery/items", files={"image": ("x.jpg", wav_bytes())}, data={"sku": "A"}),
            415,
        ),
    }


def test_bad_inputs_each_get_their_4xx_while_valid_requests_succeed(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    good = clip_of(products[0], seed=3, frames=12)
    settings = settings_for(
        tmp_path,
        max_upload_bytes=MAX_UPLOAD,
        max_frame_pixels=320 * 240,
        max_decoded_frames=50,
        max_duration_s=20.0,
        max_batch_size=8,
    )
    corpus = _corpus(good)
    assert len(corpus) >= 20
    with live_server(create_app(settings, encoder=encoder)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        valid_codes: list[int] = []
        traffic_errors: list[str] = []
        stop = threading.Event()

        def valid_traffic() -> None:
            try:
                with httpx.Client(base_url=srv.url, timeout=60) as vc:
                    while not stop.is_set() or not valid_codes:
                        r = vc.post("/v1/recognize", params={"num_frames": 2}, files={"file": ("ok.mp4", good, "video/mp4")})
                        valid_codes.append(r.status_code)
            except Exception as exc:  # a dead traffic thread must fail the test
                traffic_errors.append(repr(exc))

        worker = threading.Thread(target=valid_traffic)
        worker.start()
        wrong: list[tuple[str, int, str]] = []
        try:
            for name, (call, status) in corpus.items():
                r = call(c)
                if r.status_code != status or set(r.json().get("error", {})) != {"code", "message"}:
                    wrong.append((name, r.status_code, r.text[:200]))
        finally:
            stop.set()
            worker.join(timeout=60)
        assert wrong == [], wrong
        assert traffic_errors == [] and valid_codes and set(valid_codes) == {200}, (traffic_errors, valid_codes)
        assert c.get("/livez").status_code == 200 and c.get("/readyz").json()["ready"] is True
        assert metric(srv.url, "rice_unexpected_errors_total") == 0
        assert metric(srv.url, "rice_requests_total", route="/v1/recognize", method="POST", status="500") == 0
