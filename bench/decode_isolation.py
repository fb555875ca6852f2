"""What isolating decoders in worker processes costs the service: frames/s end to end with
RICE_DECODE_ISOLATION=process (the default) against =thread (decoders inside the server), side by
side in one run.

Starts two real services (uvicorn, separate processes, default EfficientNet-Lite0 encoder, the
same settings but the isolation) and runs --rounds short closed-loop rounds against each in turn
(interleaved, alternating which goes first, so drift in machine load hits both alike): --clients
clients upload clips and ask for --num-frames frames each. Reports each service's median frames/s
and the median of the per-round ratios process/thread (goal: process within 5% of thread, i.e.
ratio >= 0.95); on a shared machine the per-round ratio is the figure to trust.

    .venv/bin/python bench/decode_isolation.py [--clients 6] [--rounds 12] [--seconds 5] [--size 640x360]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from service.server import free_port
from tools.clipsynth import encode_video
from tools.service_process import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def make_clip(frames: int, w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return encode_video([np.roll(base, 3 * i, axis=1) for i in range(frames)], fps=30.0)


async def closed_loop(url: str, clips: list[bytes], clients: int, num_frames: int, seconds: float) -> float:
    frames = 0
    deadline = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        nonlocal frames
        while time.perf_counter() < deadline:
            r = await c.post("/v1/recognize", params={"num_frames": num_frames}, files={"file": ("c.mp4", clips[i % len(clips)])})
            r.raise_for_status()
            frames += r.json()["frames_used"]

    t = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 4)) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    return frames / (time.perf_counter() - t)


def start(isolation: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "RICE_GALLERY_PATH": ":memory:",
        "RICE_DECODE_ISOLATION": isolation,
        "RICE_DECODE_WORKERS": str(args.workers),
        "RICE_MAX_BATCH_SIZE": str(args.batch),
        "RICE_TORCH_THREADS": str(args.threads),
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env), f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--frames", type=int, default=90, help="frames per uploaded clip")
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode workers (or threads), both services")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both services")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="per round and service")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    clips = [make_clip(args.frames, w, h, s) for s in range(4)]
    servers = {kind: start(kind, args) for kind in ("process", "thread")}
    try:
        for server, url in servers.values():
            wait_ready(url, server)
        for _, url in servers.values():  # warm both paths (worker caches, encoder)
            asyncio.run(closed_loop(url, clips, args.clients, args.num_frames, 2.0))
        rates: dict[str, list[float]] = {"process": [], "thread": []}
        for r in range(args.rounds):
            for kind in ("process", "thread") if r % 2 == 0 else ("thread", "process"):
                url = servers[kind][1]
                rates[kind].append(asyncio.run(closed_loop(url, clips, args.clients, args.num_frames, args.seconds)))
        med = {k: float(np.median(v)) for k, v in rates.items()}
        ratios = [p / t for p, t in zip(rates["process"], rates["thread"], strict=True)]
        print(
            json.dumps(
                {
                    "settings": vars(args),
                    "loadavg": os.getloadavg(),
                    "frames_per_s": {k: round(v, 1) for k, v in med.items()},
                    "process_over_thread": round(float(np.median(ratios)), 3),
                    "process_over_thread_of_medians": round(med["process"] / med["thread"], 3),
                    "per_round": {k: [round(x, 1) for x in v] for k, v in rates.items()},
                },
                indent=1,
            )
        )
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
