"""Decode efficiency: sampled decode of a clip vs OpenCV grab-only over the same clip.

grab-only is the floor for any decoder that must look at every frame (uniform sampling over a
clip whose length the container may not state): demux + decode, no colour conversion, no copies.
Our sampled decode adds retrieve() + colour conversion + resize/crop for the N kept frames only.
Efficiency = grab-only time / sampled time (goal >= 0.8).

    .venv/bin/python bench/decode_efficiency.py [--frames 300] [--size 640x360] [--num-frames 10 32]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time

import cv2
import numpy as np

from model.config import PreprocessConfig
from pipeline.decode import DecodeLimits, decode_clip
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


def best_of(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--num-frames", type=int, nargs="+", default=[10, 32])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one decode per pool thread in the service: measure that
    w, h = (int(v) for v in args.size.split("x"))
    data = make_clip(args.frames, w, h)
    pre, limits = PreprocessConfig(), DecodeLimits()
    assert grab_only(data) == args.frames
    grab = best_of(lambda: grab_only(data), args.repeats)
    rows = []
    for n in args.num_frames:
        sampled = best_of(lambda n=n: decode_clip(data, n, pre, limits), args.repeats)
        rows.append(
            {
                "num_frames": n,
                "sampled_ms": round(sampled * 1e3, 2),
                "grab_only_ms": round(grab * 1e3, 2),
                "efficiency": round(grab / sampled, 3),
            }
        )
    print(json.dumps({"clip": {"frames": args.frames, "size": args.size, "bytes": len(data)}, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
