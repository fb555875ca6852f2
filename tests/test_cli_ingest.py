"""`rice ingest` against a real server: interrupted and re-run, nothing duplicated, nothing missed;
bad files reported without stopping. `rice recognize` prints the right SKU."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import cv2
import httpx
import pytest
from fastapi import Request, Response

from model.checkpoint import LoadedEncoder
from service.app import create_app
from service.server import background_server
from tests.conftest import settings_for
from tests.serving_helpers import live_server, wait_until
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct, render_clip
from tools.ingest import read_catalog

pytestmark = pytest.mark.integration
RICE = [sys.executable, "-m", "tools.cli"]
# `python -m tools.cli ...` with SIGINT raising KeyboardInterrupt whatever disposition it inherited.
_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = ['rice', *sys.argv[1:]]; runpy.run_module('tools.cli', run_name='__main__')"
)


def _catalog(root: Path, products: list[DemoProduct]) -> int:
    """One folder per SKU with three views each, plus two bad files. Returns the number of good images."""
    good = 0
    for p in products:
        d = root / p.sku
        d.mkdir(parents=True)
        for k, img in enumerate([p.image, p.image[:, ::-1], cv2.GaussianBlur(p.image, (5, 5), 0)]):
            cv2.imwrite(str(d / f"view{k}.jpg"), img)
            good += 1
    (root / products[0].sku / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / products[1].sku / "empty.png").write_bytes(b"")
    return good


def test_ingest_is_resumable_and_reports_bad_files(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    root = tmp_path / "catalog"
    good = _catalog(root, products)
    state = tmp_path / "state.jsonl"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The server holds every upload after the 4th until the test has interrupted the client: the
    # interruption lands mid-run however slow or fast this machine is (no sleeps, no races).
    app = create_app(settings_for(tmp_path, max_batch_size=4), encoder=encoder)
    release = threading.Event()
    uploads = 0

    @app.middleware("http")
    async def hold_after_four(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        nonlocal uploads
        if request.method == "POST" and request.url.path == "/v1/gallery/items":
            uploads += 1
            if uploads > 4:
                await asyncio.to_thread(release.wait, 120)
        return await call_next(request)

    with live_server(app) as running, httpx.Client(base_url=running.url) as c:
        url = running.url
        wait_until(lambda: c.get("/readyz").status_code == 200, 120, "readiness")
        cmd = [*RICE, "ingest", str(root), "--url", url, "--workers", "1", "--state", str(state), "--quiet", "--json"]
        # First run: interrupt it (SIGINT, as Ctrl-C) once four files are done; the fifth is held.
        # As in a terminal, Ctrl-C must raise KeyboardInterrupt even when this test runs as a background
        # job, whose children inherit an ignored SIGINT (then Python installs no handler for it at all).
        interruptible = [sys.executable, "-c", _WITH_CTRL_C, *cmd[len(RICE) :]]
        proc = subprocess.Popen(interruptible, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_until(lambda: state.exists() and len(state.read_text().splitlines()) >= 4, 120, "four journalled uploads")
        proc.send_signal(signal.SIGINT)
        release.set()  # the held upload may finish; the client stops before the queued rest
        proc.wait(timeout=60)
        done_before = sum(json.loads(line)["status"] == "ok" for line in state.read_text().splitlines() if line.endswith("}"))
        assert 0 < done_before < good, "the interruption must land mid-run for this test to mean anything"

        # Second run finishes the job; the journal makes it skip what was done.
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        summary = json.loads(out.stdout)
        assert out.returncode == 1  # some files failed
        assert summary["skipped"] >= done_before
        assert summary["skipped"] + summary["ingested"] == good
        assert sorted(Path(p).name for p in summary["failures"]) == ["broken.jpg", "empty.png"]

        stats = c.get("/v1/gallery/stats").json()
        assert stats["items"] == good and stats["skus"] == len(products)  # nothing duplicated, nothing missed

        # A third run without the journal re-sends everything as upserts: still no duplicates.
        out = subprocess.run(
            [*cmd[:-4], "--state", str(tmp_path / "fresh.jsonl"), "--quiet", "--json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert json.loads(out.stdout)["ingested"] == good
        assert out.returncode == 1  # the two bad files are still there, and still reported
        assert c.get("/v1/gallery/stats").json()["items"] == good


def test_catalog_csv_and_recognize_cli(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    import numpy as np

    (tmp_path / "img").mkdir()
    rows = ["path,sku,shop_id"]
    for p in products:
        cv2.imwrite(str(tmp_path / "img" / f"{p.sku}.jpg"), p.image)
        rows.append(f"img/{p.sku}.jpg,{p.sku},{p.shop_id}")
    (tmp_path / "catalog.csv").write_text("\n".join(rows) + "\n")
    items = read_catalog(tmp_path / "catalog.csv")
    assert [(i.sku, i.shop_id) for i in items] == [(p.sku, p.shop_id) for p in products]
    target = products[2]
    clip = tmp_path / "clips" / "live.mp4"
    clip.parent.mkdir()
    clip.write_bytes(encode_video(render_clip(target, np.random.default_rng(2), num_frames=20, scale=(0.8, 0.95), occlusion=False)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with background_server(settings_for(tmp_path), encoder) as url:
        out = subprocess.run(
            [*RICE, "ingest", str(tmp_path / "catalog.csv"), "--url", url, "--quiet", "--state", str(tmp_path / "s.jsonl")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        out = subprocess.run(
            [*RICE, "recognize", str(clip.parent), "--url", url, "--top-k", "3", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer[0]["results"][0]["sku"] == target.sku


def test_a_network_error_fails_one_file_not_the_run(tmp_path: Path, products: list[DemoProduct]) -> None:
    from tools.ingest import Journal, run_ingest

    root = tmp_path / "catalog"
    for p in products[:4]:
        (root / p.sku).mkdir(parents=True)
        cv2.imwrite(str(root / p.sku / "a.jpg"), p.image)
    items = read_catalog(root)

    def flaky(image, data):  # type: ignore[no-untyped-def]
        if image.sku == products[1].sku:
            raise httpx.ConnectError("connection refused")
        return 201, {}

    journal = Journal(tmp_path / "j.jsonl")
    report = run_ingest(items, flaky, journal, workers=2)
    journal.close()
    assert report.ingested == 3 and len(report.failed) == 1
    assert "ConnectError" in next(iter(report.failed.values()))
    # the network is back: a second run retries just the failed file
    journal = Journal(tmp_path / "j.jsonl")
    again = run_ingest(items, lambda image, data: (201, {}), journal)
    journal.close()
    assert (again.ingested, again.skipped, again.failed) == (1, 3, {})
