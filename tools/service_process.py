"""A real service in its own process (benchmarks, soak and fuzz runs), and reading its memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.server import free_port

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process now, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 600) -> None:
    """Block until the service at `url` answers /readyz 200; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("service did not become ready")
        time.sleep(0.2)


@contextmanager
def serve(
    env: dict[str, str], ready_timeout_s: float = 600, log_level: str = "warning", quiet: bool = False
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`rice serve` in its own process with these RICE_* variables (plus a free port); yields (url, process)
    once ready, and stops it after. `quiet` drops its stderr (a fuzz run's decode errors would flood it)."""
    port = free_port()
    full = {**os.environ, **env, "RICE_PORT": str(port), "RICE_LOG_LEVEL": log_level, "PYTHONPATH": str(ROOT)}
    stderr = subprocess.DEVNULL if quiet else None
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve"], cwd=ROOT, env=full, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, ready_timeout_s)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)
