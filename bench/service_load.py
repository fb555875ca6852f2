"""Serving benchmark: batching efficiency, latency below saturation, behaviour at 3x saturation.

Starts the real service (uvicorn, separate process, default EfficientNet-Lite0 encoder) and, in
the same run on the same machine:
1. raw encoder frames/s: EncoderEngine.encode on full batches of --batch frames, in this process
   while the service idles (same thread count as the service);
2. end-to-end frames/s: --clients concurrent clients upload clips in a closed loop;
   batching efficiency = (2) / (1) (goal >= 0.9);
3. latency p50/p99 at a fixed request rate of --below x the saturation rate measured in (2);
4. an open-loop burst at --over x saturation: share of 429s and p99 of the admitted requests.

    .venv/bin/python bench/service_load.py [--batch 16] [--clients 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from model.checkpoint import default_encoder
from pipeline.engine import EncoderEngine
from service.server import free_port
from tools.clipsynth import encode_video
from tools.service_process import wait_ready

ROOT = Path(__file__).resolve().parents[1]


def make_clip(frames: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return encode_video([np.roll(base, 2 * i, axis=1) for i in range(frames)], fps=15.0)


class RawEncoder:
    """The service's engine, built the same way, driven directly on full batches of real-looking frames."""

    def __init__(self, batch: int, threads: int) -> None:
        self.engine = EncoderEngine(default_encoder(), "cpu", threads)
        self.engine.warm_up(batch)
        # Random pixels, not zeros: on CPU some kernels run measurably faster on constant input.
        self.x = np.random.default_rng(0).integers(0, 255, (batch, *self.engine.frame_shape), dtype=np.uint8)

    def fps(self, seconds: float) -> float:
        """On a worker thread, like the service's encoder thread (torch on a busy CPU measured
        several times slower on the main thread, which would flatter the ratio)."""
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self._loop, seconds).result()

    def _loop(self, seconds: float) -> float:
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            self.engine.encode(self.x)
            n += len(self.x)
        return n / (time.perf_counter() - t)


async def closed_loop(url: str, clips: list[bytes], clients: int, num_frames: int, seconds: float) -> tuple[float, int]:
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
    return frames / (time.perf_counter() - t), frames


async def open_loop(url: str, clips: list[bytes], rate: float, num_frames: int, seconds: float) -> dict[str, float]:
    """Start requests at a fixed rate regardless of answers (as viewers do); latency of each."""
    results: list[tuple[int, float]] = []

    async def one(i: int, c: httpx.AsyncClient) -> None:
        t = time.perf_counter()
        r = await c.post("/v1/recognize", params={"num_frames": num_frames}, files={"file": ("c.mp4", clips[i % len(clips)])})
        results.append((r.status_code, time.perf_counter() - t))

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1000)) as c:
        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, c)))
        await asyncio.gather(*tasks)
    ok = np.array([s for code, s in results if code == 200])
    codes = [code for code, _ in results]
    return {
        "rate_rps": round(rate, 2),
        "requests": len(results),
        "ok": int((np.array(codes) == 200).sum()),
        "share_429": round(codes.count(429) / max(len(codes), 1), 3),
        "other_errors": sum(c not in (200, 429) for c in codes),
        "p50_ms": round(float(np.percentile(ok, 50)) * 1e3, 1) if len(ok) else float("nan"),
        "p99_ms": round(float(np.percentile(ok, 99)) * 1e3, 1) if len(ok) else float("nan"),
    }


def metric_sum(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        total += sum(s.value for s in fam.samples if s.name == name)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="service max batch size (and the raw encoder's batch)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--num-frames", type=int, default=8, help="frames per clip request")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, service and raw alike")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--below", type=float, default=0.5, help="fixed rate as a fraction of saturation")
    ap.add_argument("--over", type=float, default=3.0, help="overload rate as a multiple of saturation")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved raw/service rounds (median ratio reported)")
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    args = ap.parse_args()

    load = os.getloadavg()  # other work on the machine skews absolute numbers; ratios are interleaved
    port = free_port()
    env = {
        **os.environ,
        "RICE_GALLERY_PATH": ":memory:",
        "RICE_MAX_BATCH_SIZE": str(args.batch),
        "RICE_MAX_WAIT_MS": str(args.max_wait_ms),
        "RICE_TORCH_THREADS": str(args.threads),
        "RICE_DECODE_WORKERS": "2",
        "RICE_MAX_QUEUE_FRAMES": str(4 * args.batch),  # ~4 batches of waiting: bounded queue wait
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        clips = [make_clip(30, s) for s in range(4)]
        wait_ready(url, server, 180)
        raw_encoder = RawEncoder(args.batch, args.threads)
        asyncio.run(closed_loop(url, clips, args.clients, args.num_frames, 2.0))  # warm the path
        # Interleave short rounds of raw and end-to-end so drift in machine load hits both alike.
        raws, e2es = [], []
        b0, f0 = metric_sum(url, "rice_batch_size_count"), metric_sum(url, "rice_batch_size_sum")
        for _ in range(args.rounds):
            raws.append(raw_encoder.fps(args.seconds / args.rounds))
            e2es.append(asyncio.run(closed_loop(url, clips, args.clients, args.num_frames, args.seconds / args.rounds))[0])
        batches = metric_sum(url, "rice_batch_size_count") - b0
        mean_batch = (metric_sum(url, "rice_batch_size_sum") - f0) / max(batches, 1)
        ratios = [e / r for e, r in zip(e2es, raws, strict=True)]
        raw, e2e = float(np.median(raws)), float(np.median(e2es))
        saturation_rps = e2e / args.num_frames
        below = asyncio.run(open_loop(url, clips, args.below * saturation_rps, args.num_frames, args.seconds))
        over = asyncio.run(open_loop(url, clips, args.over * saturation_rps, args.num_frames, args.seconds))
        print(
            json.dumps(
                {
                    "settings": vars(args),
                    "raw_encoder_fps": round(raw, 1),
                    "service_fps": round(e2e, 1),
                    "batching_efficiency": round(float(np.median(ratios)), 3),
                    "per_round": [{"raw": round(r, 1), "service": round(e, 1)} for r, e in zip(raws, e2es, strict=True)],
                    "loadavg_at_start": load,
                    "mean_batch": round(mean_batch, 2),
                    "saturation_rps": round(saturation_rps, 2),
                    "below_saturation": below,
                    "over_saturation": over,
                },
                indent=1,
            )
        )
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
