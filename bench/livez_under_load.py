"""Does a big gallery stall the event loop? /livez latency under clip load, small vs large gallery.

For each gallery size (default 8 and 150,000 items of the served model's dimension, written straight
into the embedded SQLite store before the server starts), in one run:
1. start the real service (`rice serve`, its own process, default EfficientNet-Lite0 encoder);
2. --clients concurrent clients upload 10-frame clips in a closed loop for --seconds;
3. meanwhile one prober calls /livez every 20 ms.
Prints clips/s, clip p50/p99 and /livez p50/p99 per size, and the ratios large/small. Searches run
on threads and share the gallery's read lock, so /livez must stay fast (goal: p99 < 50 ms at 150k).

    .venv/bin/python bench/livez_under_load.py [--sizes 8 150000] [--clients 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from index.records import Record
from index.sqlite_store import SQLiteStore
from model.checkpoint import default_encoder
from pipeline.engine import EncoderEngine
from tools.clipsynth import encode_video
from tools.service_process import serve

ROOT = Path(__file__).resolve().parents[1]


def make_clip(frames: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return encode_video([np.roll(base, 2 * i, axis=1) for i in range(frames)], fps=15.0)


def fill_gallery(path: Path, namespace: str, dim: int, n: int, chunk: int = 20_000) -> None:
    """n random unit vectors, 4 images per SKU, 10 shops, in the model's namespace."""
    store = SQLiteStore(path)
    rng = np.random.default_rng(0)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        v = rng.standard_normal((m, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        recs = [Record(f"i{start + i}", f"sku{(start + i) // 4}", f"shop{(start + i) % 10}", v[i]) for i in range(m)]
        store.upsert(namespace, recs)
    store.close()


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


async def load(
    url: str,
    clips: list[bytes],
    clients: int,
    seconds: float,
    expect: Sequence[str] | None = None,
    params: dict[str, str | int] | None = None,
) -> dict[str, float]:
    """Closed-loop clip clients plus a /livez prober; with `expect` (the right SKU of each clip), also
    the share of answers that rank it first."""
    clip_lat: list[float] = []
    livez_lat: list[float] = []
    right: list[bool] = []
    deadline = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        j = i
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            k = j % len(clips)
            r = await c.post("/v1/recognize", params={"num_frames": 10, **(params or {})}, files={"file": ("c.mp4", clips[k])})
            r.raise_for_status()
            clip_lat.append(time.perf_counter() - t)
            if expect is not None:
                results = r.json()["results"]
                right.append(bool(results) and results[0]["sku"] == expect[k])
            j += clients

    async def prober(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            (await c.get("/livez")).raise_for_status()
            livez_lat.append(time.perf_counter() - t)
            await asyncio.sleep(0.02)

    t0 = time.perf_counter()
    async with (
        httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients + 2)) as c,
        httpx.AsyncClient(base_url=url, timeout=30) as probe,  # its own connection: never queued behind uploads
    ):
        await asyncio.gather(prober(probe), *(client(i, c) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {
        "clips_per_s": len(clip_lat) / wall,
        "clip_p50_ms": pct(clip_lat, 50),
        "clip_p99_ms": pct(clip_lat, 99),
        "livez_p50_ms": pct(livez_lat, 50),
        "livez_p99_ms": pct(livez_lat, 99),
        "livez_probes": len(livez_lat),
        **({"right_sku_first": sum(right) / len(right)} if right else {}),
    }


def run_size(n: int, args: argparse.Namespace, namespace: str, dim: int, clips: list[bytes], tmp: Path) -> dict[str, float]:
    db = tmp / f"gallery-{n}.db"
    t = time.perf_counter()
    fill_gallery(db, namespace, dim, n)
    print(f"gallery of {n} items written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    with serve({"RICE_GALLERY_PATH": str(db)}) as (url, _):
        asyncio.run(load(url, clips, args.clients, 3))  # warm-up
        result = asyncio.run(load(url, clips, args.clients, args.seconds))
        return {"gallery_items": n, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 150_000])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args()
    enc = default_encoder()
    namespace, dim = enc.model_version, EncoderEngine(enc, "cpu").dim
    clips = [make_clip(20, s) for s in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_size(n, args, namespace, dim, clips, Path(tmp)) for n in args.sizes]
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        print(f"clips/s large/small: {large['clips_per_s'] / small['clips_per_s']:.2f}")
        print(f"/livez p99: {small['livez_p99_ms']:.1f} ms (small) vs {large['livez_p99_ms']:.1f} ms (large)")


if __name__ == "__main__":
    main()
