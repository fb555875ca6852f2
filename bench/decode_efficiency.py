"""Decode efficiency: sampled decode of a clip vs OpenCV grab-only over the same clip.

grab-only is the floor for any decoder that must look at every frame (uniform sampling over a
clip whose length the container may not state): demux + decode, no colour conversion, no copies.
Our sampled decode adds retrieve() + colour conversion + resize/crop for the N kept frames only.
Efficiency = grab-only time / sampled time (goal >= 0.85), the median of per-round ratios: each
round times grab-only, sampled and sampled-in-a-worker once, in rotating order.

The service decodes in isolated worker processes (pipeline/decode_pool.py), so the sampled decode
is also measured through the pool, both ways, in the same run: one call at a time (latency, with
the pipe transfers of upload and frames) and --workers calls at once (throughput, decodes/s),
process workers against the in-process thread pool (RICE_DECODE_ISOLATION=thread) of the same size.

    .venv/bin/python bench/decode_efficiency.py [--frames 300] [--size 640x360] [--num-frames 10 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
from collections.abc import Callable

import cv2
import numpy as np

from model.config import PreprocessConfig
from pipeline.decode import DecodeLimits, decode_clip
from pipeline.decode_pool import DecodePool
from tools.clipsynth import encode_video


def make_clip(frames: int, w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    # Moving content, so the codec has real work (flat frames decode unrealistically fast).
    return encode_video([np.roll(base, 3 * i, axis=1) for i in range(frames)], fps=30.0)


def grab_only(data: bytes) -> int:
    stream = io.BytesIO(data)
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]
    n = 0
    while cap.grab():
        n += 1
    cap.release()
    return n


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def paired(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each function once per round, in rotating order, `repeats` rounds: on a shared, noisy
    machine the ratios of one round compare like with like."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            times[k].append(timed(fns[k]))
    return times


def pool_throughput(pool: DecodePool, data: bytes, n: int, pre: PreprocessConfig, limits: DecodeLimits, calls: int) -> float:
    """Decodes per second with `calls` decodes submitted at once."""

    async def burst() -> float:
        t = time.perf_counter()
        await asyncio.gather(*[pool.run(decode_clip, data, n, pre, limits) for _ in range(calls)])
        return calls / (time.perf_counter() - t)

    return asyncio.run(burst())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--num-frames", type=int, nargs="+", default=[10, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2, help="pool size for the through-the-pool rows")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved process/thread throughput rounds (median)")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one decode per pool worker in the service: measure that
    w, h = (int(v) for v in args.size.split("x"))
    data = make_clip(args.frames, w, h)
    pre, limits = PreprocessConfig(), DecodeLimits()
    assert grab_only(data) == args.frames
    processes = DecodePool(args.workers, isolation="process", cv_threads=1)  # as this process: like with like
    threads = DecodePool(args.workers, isolation="thread")
    try:
        pool_throughput(processes, data, 4, pre, limits, args.workers)  # the workers' first decode warms their caches
        rows = []
        for n in args.num_frames:

            async def in_worker(n: int = n) -> None:
                await processes.run(decode_clip, data, n, pre, limits)

            t = paired(
                {
                    "grab": lambda: grab_only(data),
                    "sampled": lambda n=n: decode_clip(data, n, pre, limits),  # type: ignore[misc]
                    "worker": lambda: asyncio.run(in_worker()),
                },
                args.repeats,
            )
            grab, sampled, worker = (float(np.median(t[k])) for k in ("grab", "sampled", "worker"))
            ratio = {k: float(np.median([g / x for g, x in zip(t["grab"], t[k], strict=True)])) for k in ("sampled", "worker")}
            proc_rates, thread_rates = [], []
            for _ in range(args.rounds):  # interleaved: drift in machine load hits both alike
                proc_rates.append(pool_throughput(processes, data, n, pre, limits, 4 * args.workers))
                thread_rates.append(pool_throughput(threads, data, n, pre, limits, 4 * args.workers))
            rows.append(
                {
                    "num_frames": n,
                    "sampled_ms": round(sampled * 1e3, 2),
                    "grab_only_ms": round(grab * 1e3, 2),
                    "efficiency": round(ratio["sampled"], 3),
                    "sampled_in_worker_ms": round(worker * 1e3, 2),
                    "efficiency_in_worker": round(ratio["worker"], 3),
                    "process_pool_decodes_per_s": round(float(np.median(proc_rates)), 2),
                    "thread_pool_decodes_per_s": round(float(np.median(thread_rates)), 2),
                    "process_over_thread": round(float(np.median(proc_rates)) / float(np.median(thread_rates)), 3),
                }
            )
    finally:
        processes.close()
        threads.close()
    print(
        json.dumps(
            {"clip": {"frames": args.frames, "size": args.size, "bytes": len(data)}, "workers": args.workers, "results": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
