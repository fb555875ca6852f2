"""Fuzzing over real HTTP: seeded mutations of MP4, AVI/MJPEG, MKV, WebM, JPEG, PNG and WebP
uploads get only 2xx/4xx answers, the serving process never dies, and a valid clip still works
after every batch. The crashers that killed the service before decoding moved into worker
processes are regression cases, rebuilt from (source, seed) by tools/mediafuzz.py.

The longer run is `bench/fuzz.py` (docs/PERFORMANCE.md)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.app import create_app
from service.server import RunningServer
from tests.conftest import settings_for
from tests.serving_helpers import gated_encoder, live_server, metric
from tools.mediafuzz import Case, case, cases, source

pytestmark = pytest.mark.integration

FUZZ_SEED = 20261129
CI_CASES = 200
# Found by bench/fuzz.py and tools/mediafuzz.py's generator: each made OpenCV's FFmpeg decoder
# segfault inside the serving process (MJPEG in AVI: duplicated ranges and chunks, size fields,
# splices, garbage tails). (source, seed) rebuilds the exact bytes.
KNOWN_CRASHERS = (
    ("avi_mjpeg", 28),  # a duplicated range; the hdrl LIST size set to 2950491784; bit flips
    ("avi_mjpeg", 49),  # one duplicated range of 1002 bytes
    ("avi_mjpeg", 115),  # a chunk duplicated 3 times
    ("avi_mjpeg", 180),  # one duplicated range of 1368 bytes
    ("avi_mjpeg", 614),  # one chunk size field set to 2867219103
    ("avi_mjpeg", 848),  # one duplicated range of 172 bytes
    ("avi_mjpeg", 920),  # the clip spliced with its own tail
    ("avi_mjpeg", 1055),  # one duplicated range of 2022 bytes
    ("avi_mjpeg", 1460),  # one duplicated range of 1801 bytes
    ("avi_mjpeg", 1766),  # one duplicated range of 138 bytes
    ("avi_mjpeg", 2351),  # a chunk duplicated 3 times
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    loaded, _ = gated_encoder()  # fast fake encoder: this test is about decoding
    settings = settings_for(tmp_path_factory.mktemp("fuzz"), decode_workers=2)
    with live_server(create_app(settings, encoder=loaded)) as srv:
        yield srv


def _send(c: httpx.Client, fz: Case, i: int) -> httpx.Response:
    """Clips to the clip endpoint (uniform or keyframe sampling), images to image recognition or
    catalog ingest; every 7th case to the other kind's endpoint (a clip sent as an image and the reverse)."""
    as_clip = fz.is_clip != (i % 7 == 6)
    if as_clip:  # every third clip through the keyframe decoder (PyAV) instead of OpenCV's
        sampling = "keyframes" if i % 3 == 2 else "uniform"
        return c.post("/v1/recognize", params={"num_frames": 4, "sampling": sampling}, files={"file": ("upload", fz.data)})
    if i % 2:
        return c.post("/v1/gallery/items", files={"image": ("upload", fz.data)}, data={"sku": f"fuzz-{i}"})
    return c.post("/v1/recognize/image", files={"file": ("upload", fz.data)})


def _check(r: httpx.Response, fz: Case) -> str:
    assert r.status_code < 500, (str(fz), r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] and err["message"], (str(fz), r.text)
        return str(err["code"])
    return "ok"


def _valid_clip_works(c: httpx.Client) -> None:
    assert c.get("/livez").status_code == 200
    r = c.post("/v1/recognize", params={"num_frames": 4}, files={"file": ("ok.mp4", source("mp4_mp4v"))})
    assert r.status_code == 200 and r.json()["frames_used"] == 4, r.text


def test_known_crashers_only_cost_a_worker(server: RunningServer) -> None:
    crashes_before = metric(server.url, "rice_decode_worker_deaths_total", cause="crash")
    codes = Counter()
    with httpx.Client(base_url=server.url, timeout=120) as c:
        for name, seed in KNOWN_CRASHERS:
            fz = case(name, seed)
            codes[_check(_send(c, fz, 0), fz)] += 1
            _valid_clip_works(c)
    # They still crash this OpenCV build's decoder: the isolation really was exercised.
    assert codes["undecodable_media"] >= 1, codes
    assert metric(server.url, "rice_decode_worker_deaths_total", cause="crash") - crashes_before == codes["undecodable_media"]


def test_seeded_mutations_get_only_2xx_or_4xx_and_the_service_keeps_serving(server: RunningServer) -> None:
    all_cases = list(cases(CI_CASES, FUZZ_SEED))
    codes: Counter[str] = Counter()
    with httpx.Client(base_url=server.url, timeout=120) as c, ThreadPoolExecutor(3) as pool:
        for start in range(0, len(all_cases), 50):
            batch = list(enumerate(all_cases[start : start + 50], start))
            # three at a time: valid work runs beside the crashes, as in production
            for code in pool.map(lambda ic: _check(_send(c, ic[1], ic[0]), ic[1]), batch):
                codes[code] += 1
            _valid_clip_works(c)
    assert sum(codes.values()) == CI_CASES
    # the corpus is not trivially rejected: some mutations still decode, some are refused
    assert codes["ok"] >= 20 and sum(n for k, n in codes.items() if k != "ok") >= 20, codes
