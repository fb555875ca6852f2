"""Timelines over real HTTP: the request endpoint and timeline jobs, on a generated 21 s recording
(product A, then nothing, then B, then C) whose true segments are known."""

from __future__ import annotations

import csv
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from index.jobs import SQLiteJobStore
from model.checkpoint import LoadedEncoder
from service.app import create_app
from tests.conftest import jpeg, settings_for
from tests.serving_helpers import live_server, metric, wait_until
from tools.cli import main
from tools.democatalog import DemoProduct
from tools.longclip import Part, TruthSegment, write_recording

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory, products: list[DemoProduct]) -> tuple[bytes, list[TruthSegment]]:
    a, b, c = products[4], products[7], products[5]
    path = tmp_path_factory.mktemp("rec") / "a_gap_b_c.mp4"
    truth = write_recording([Part(a.sku, 6), Part(None, 5), Part(b.sku, 5), Part(c.sku, 5)], products, path, seed=0, fps=10)
    return path.read_bytes(), truth


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder, products: list[DemoProduct]) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("srv")
    settings = settings_for(tmp, job_dir=str(tmp / "jobs"))
    with live_server(create_app(settings, encoder=encoder)) as running:
        wait_until(lambda: httpx.get(f"{running.url}/readyz", timeout=5).status_code == 200, 120, "readiness")
        for p in products:
            files = {"image": ("p.jpg", jpeg(p.image), "image/jpeg")}
            r = httpx.post(f"{running.url}/v1/gallery/items", files=files, data={"sku": p.sku, "item_id": p.sku}, timeout=60)
            assert r.status_code == 201, r.text
        yield running.url, tmp


def _check_timeline(body: dict[str, Any], truth: list[TruthSegment], windows: int = 11) -> None:
    segments = body["segments"]
    assert segments[0]["start_s"] == 0 and segments[-1]["end_s"] == pytest.approx(body["duration_s"]) == pytest.approx(21.0)
    assert all(x["end_s"] == y["start_s"] for x, y in itertools.pairwise(segments))  # in order, no holes
    shown = [s for s in segments if s["sku"] is not None]
    assert [s["sku"] for s in shown] == [t.sku for t in truth if t.sku is not None]  # A, B, C: the gap is no product
    assert all(s["match"] == (s["score"] >= body["match_threshold"]) for s in shown)  # the recognition rule
    for s, t in zip(shown, [t for t in truth if t.sku], strict=True):
        assert abs(s["start_s"] - t.start_s) <= 1.5 and abs(s["end_s"] - t.end_s) <= 1.5, (s, t)
    assert body["frames_used"] == 42 and body["windows"] == windows  # 2 frames a second; 2 s windows


def test_the_endpoint_and_a_job_find_a_then_b_then_c(server: tuple[str, Path], recording: tuple[bytes, list[TruthSegment]]) -> None:
    url, tmp = server
    data, truth = recording
    r = httpx.post(f"{url}/v1/recognize/timeline", files={"file": ("rec.mp4", data, "video/mp4")}, timeout=300)
    assert r.status_code == 200, r.text
    _check_timeline(r.json(), truth)
    assert not list((tmp / "jobs" / "requests").iterdir())  # the request's upload is gone
    r = httpx.post(f"{url}/v1/recognize/timeline", params={"stride_s": 1}, content=data, timeout=300)  # overlapping windows
    assert r.status_code == 200, r.text
    _check_timeline(r.json(), truth, windows=20)

    r = httpx.post(f"{url}/v1/jobs/timeline", content=data, params={"top_k": 2}, timeout=60)  # the raw body this time
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running"), r.text
    job_id = r.json()["job_id"]
    seen: list[float] = []

    def finished() -> bool:
        body = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        seen.append(body["progress"])
        return bool(body["status"] in ("done", "failed", "cancelled"))

    wait_until(finished, 300, "the job")
    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "done" and job["progress"] == 1.0 and job["error"] is None, job
    _check_timeline(job["result"], truth)
    assert all(len(s["alternatives"]) <= 1 for s in job["result"]["segments"] if s["sku"])  # top_k=2: the SKU + 1
    assert seen == sorted(seen)  # progress never goes back
    assert not list((tmp / "jobs").glob("*.upload"))  # a finished job's recording is deleted
    assert metric(url, "rice_jobs_finished_total", status="done") >= 1
    assert metric(url, "rice_timeline_recording_seconds_total") >= 42


def test_bad_recordings_get_clear_errors_from_the_endpoint_and_jobs(server: tuple[str, Path]) -> None:
    url, _ = server
    junk = b"\x00garbage" * 1000
    r = httpx.post(f"{url}/v1/recognize/timeline", content=junk, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media"
    r = httpx.post(f"{url}/v1/recognize/timeline", params={"window_s": 1, "stride_s": 2}, content=junk, timeout=60)
    assert r.status_code == 400 and "stride_s" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/recognize/timeline", params={"top_k": 10_000}, content=junk, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["message"] == "query.top_k: Input should be less than or equal to 100"
    assert httpx.post(f"{url}/v1/recognize/timeline", timeout=60).status_code == 400  # no upload at all
    r = httpx.get(f"{url}/v1/jobs/no-such-job", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.delete(f"{url}/v1/jobs/no-such-job", timeout=10).status_code == 404

    job_id = httpx.post(f"{url}/v1/jobs/timeline", content=junk, timeout=60).json()["job_id"]
    wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"] == "failed", 120, "the job to fail")
    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["error"]["code"] == "unsupported_media" and job["result"] is None
    assert httpx.get(f"{url}/livez", timeout=10).status_code == 200


def test_a_dead_replicas_job_is_picked_up_when_its_lease_runs_out(
    server: tuple[str, Path], recording: tuple[bytes, list[TruthSegment]]
) -> None:
    _url, tmp = server
    data, truth = recording
    upload = tmp / "jobs" / "orphan.upload"
    upload.write_bytes(data)
    store = SQLiteJobStore(tmp / "gallery.db")  # the same store the service uses, as another replica sees it
    try:
        store.create("orphan", {"window_s": 2.0}, str(upload), time.time())
        claimed = store.claim("replica-that-dies", 1.0, time.time(), 3)  # it claims the job, then never heartbeats
        assert claimed is not None and claimed.status == "running"
        wait_until(lambda: store.get("orphan").status == "done", 300, "another replica to finish the job")
        job = store.get("orphan")
        assert job.attempts == 2 and job.owner is None and job.result is not None
        assert [s["sku"] for s in job.result["segments"] if s["sku"]] == [t.sku for t in truth if t.sku]
    finally:
        store.close()


def test_rice_timeline_runs_jobs_and_writes_table_csv_and_json(
    server: tuple[str, Path], recording: tuple[bytes, list[TruthSegment]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    data, truth = recording
    rec = tmp_path / "live.mp4"
    rec.write_bytes(data)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    out_csv, out_json = tmp_path / "t.csv", tmp_path / "t.json"
    code = main(["timeline", str(rec), str(junk), "--url", url, "--csv", str(out_csv), "--json", str(out_json), "--poll-s", "0.1"])
    assert code == 1  # the junk file's job failed
    printed = capsys.readouterr()
    assert "live.mp4 (21.0 s" in printed.out and "junk.mp4: job failed" in printed.err
    assert "100%" in printed.err  # the progress bar, fed by the job's progress, reached the end
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["sku"] for r in rows if r["sku"]] == [t.sku for t in truth if t.sku] and rows[0]["start_s"] == "0.0"
    answers = json.loads(out_json.read_text())
    assert [a["status"] for a in answers] == ["done", "failed"] and answers[0]["result"]["duration_s"] == 21.0
