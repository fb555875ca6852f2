"""Timeline jobs over real HTTP: cancelling a running job stops its decoder process and frees its
slot, and clients' requests keep being answered while a job waits on the encoder."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.app import create_app
from tests.conftest import settings_for
from tests.serving_helpers import gated_encoder, live_server, wait_until
from tools.clipsynth import encode_video

pytestmark = pytest.mark.slow


def _decoder_children() -> list[int]:
    """Pids of this process's children running the recording decoder (pipeline.stream_decode)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        state = stat.rsplit(")", 1)[1].split()[0]
        if ppid == os.getpid() and b"pipeline.stream_decode" in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_cancelling_a_running_job_kills_its_decoder_and_frees_its_slot(tmp_path: Path) -> None:
    loaded, backbone = gated_encoder()
    settings = settings_for(tmp_path, job_dir=str(tmp_path / "jobs"), max_batch_size=4)
    frames = [np.full((48, 64, 3), (i * 3) % 255, np.uint8) for i in range(300)]  # 20 s at 15 fps
    recording = encode_video(frames, fps=15)
    with live_server(create_app(settings, encoder=loaded)) as running:
        url = running.url
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, "readiness")
        backbone.gate.clear()  # the encoder hangs: the job stays running
        try:
            job_id = httpx.post(f"{url}/v1/jobs/timeline", content=recording, timeout=30).json()["job_id"]
            wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["status"] == "running", 60, "the job to run")
            wait_until(lambda: len(_decoder_children()) == 1, 60, "the job's decoder process")
            r = httpx.delete(f"{url}/v1/jobs/{job_id}", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            app = running.server.config.app
            wait_until(lambda: not app.state.job_worker.running, 30, "the worker to drop the job")
            wait_until(lambda: not _decoder_children(), 30, "the decoder to be killed")
            assert not list((tmp_path / "jobs").glob("*.upload"))
        finally:
            backbone.gate.set()
        assert httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["status"] == "cancelled"  # stays cancelled
        r = httpx.post(f"{url}/v1/recognize", content=encode_video(frames[:20]), timeout=60)
        assert r.status_code == 200  # the service goes on
        # The slot is free again: a new job runs to the end.
        job_id = httpx.post(f"{url}/v1/jobs/timeline", content=encode_video(frames[:60], fps=15), timeout=30).json()["job_id"]
        wait_until(lambda: httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["status"] == "done", 60, "the next job")
