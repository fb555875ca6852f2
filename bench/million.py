"""A million items per replica in bounded memory (issue 19): load N x D clustered unit vectors into a
Gallery (`Gallery.apply`, the path a bulk import and a replica boot take, in 50k-item batches), then
measure resident memory, load and index-build time, search latency (one query and batches of 8)
and recall@10 against exact search (numpy, float32, computed chunk by chunk while loading).

Each configuration runs in a fresh child process, so its VmRSS / VmHWM (peak) are its own:

    .venv/bin/python bench/million.py                       # the issue's table (~15-20 min on 2 cores)
    .venv/bin/python bench/million.py --runs 200000x1280:exact 200000x1280:ivf 200000x1280:compressed
    .venv/bin/python bench/million.py --runs 1000000x1280:compressed --queries 200

Modes: `exact` (float32 flat, the small-gallery path), `ivf` (float32 flat + IVF-Flat, the path
past RICE_ANN_THRESHOLD before this issue), `compressed` (the default past RICE_COMPRESS_THRESHOLD:
float16 rows + IVF-PQ shortlist re-scored exactly). The vectors are never all in memory as float32:
each 50k chunk is generated from its own seed, applied and dropped. Searches and the background
index build run on one faiss thread (the service's RICE_FAISS_THREADS default; on this loaded
2-core box OpenMP teams of 2 made PQ training 3x slower, 39 s vs 13 s at 65k x 256).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHUNK = 50_000


def status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def centres(dim: int, count: int = 4096) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal((count, dim), dtype=np.float32)


def chunk_vectors(c: np.ndarray, seed: int, n: int, noise: float = 0.35, step: int = 4096) -> np.ndarray:
    """n unit vectors around the centres (product embeddings cluster by kind), float32 only.

    Filled in place a few thousand rows at a time: the one-expression form (`c[idx] + noise * randn`)
    held three more arrays of the chunk's size at once (measured: 732 MB peak for a 245 MB chunk of
    50k x 1280), which the first 1M run's VmHWM counted against the gallery."""
    rng = np.random.default_rng(seed)
    v = np.empty((n, c.shape[1]), np.float32)
    for s in range(0, n, step):
        part = v[s : s + step]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part *= noise
        part += c[rng.integers(0, len(c), len(part))]
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return v


def reset_peak() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so each phase's peak is its own."""
    Path("/proc/self/clear_refs").write_text("5")


def child(n: int, dim: int, mode: str, nq: int) -> dict[str, object]:
    from index.ann import AnnConfig, set_search_threads
    from index.gallery import Gallery
    from index.records import Record

    cfg = {
        "exact": AnnConfig(enabled=False),
        "ivf": AnnConfig(compress_threshold=10**12),
        "compressed": AnnConfig(),
    }[mode]
    set_search_threads(1)  # the service's RICE_FAISS_THREADS default, set before the replica loads
    c = centres(dim)
    queries = chunk_vectors(c, 999_999, nq)
    base_mb = status_mb("VmRSS")
    g = Gallery(dim, cfg)
    top_s = np.full((nq, 10), -np.inf, np.float32)  # exact top-10 so far (scores, ids)
    top_i = np.zeros((nq, 10), np.int64)
    load_s = truth_s = 0.0
    # Peak RSS (VmHWM, MB) per phase, restarted at each phase's start: the bench's generation of a
    # chunk, the gallery's apply of it (both with the background build running beside them while
    # the load goes on), the build after the load, the searches. The process peak is their maximum.
    peaks = {"generate": 0.0, "apply": 0.0, "build": 0.0, "search": 0.0}
    for start in range(0, n, CHUNK):
        m = min(n, start + CHUNK) - start
        reset_peak()
        vecs = chunk_vectors(c, start, m)
        t = time.perf_counter()
        s = queries @ vecs.T  # [Q, m]
        both_s = np.concatenate([top_s, s], axis=1)
        both_i = np.concatenate([top_i, np.arange(start, start + m)[None].repeat(nq, 0)], axis=1)
        keep = np.argpartition(-both_s, 9, axis=1)[:, :10]
        top_s, top_i = np.take_along_axis(both_s, keep, 1), np.take_along_axis(both_i, keep, 1)
        truth_s += time.perf_counter() - t
        recs = [Record(f"i{start + i}", f"s{start + i}", f"shop{(start + i) % 5000}", vecs[i], version=1) for i in range(m)]
        peaks["generate"] = max(peaks["generate"], status_mb("VmHWM"))
        reset_peak()
        t = time.perf_counter()
        g.apply(recs)
        load_s += time.perf_counter() - t
        peaks["apply"] = max(peaks["apply"], status_mb("VmHWM"))
        del vecs, recs
    loaded_mb = status_mb("VmRSS")
    reset_peak()
    t = time.perf_counter()
    g.wait_for_index(3600)
    build_s = time.perf_counter() - t
    peaks["build"] = status_mb("VmHWM")
    reset_peak()
    truth = [{f"s{i}" for i in row} for row in top_i]

    def timed(batch: int) -> tuple[float, float, float]:
        times, found = [], 0.0
        for s in range(0, nq, batch):
            t = time.perf_counter()
            hits, _ = g.search(queries[s : s + batch], 10)
            times.append((time.perf_counter() - t) * 1e3)
            found += sum(len({h.sku for h in r} & truth[s + j]) / 10 for j, r in enumerate(hits))
        return float(np.percentile(times, 50)), float(np.percentile(times, 99)), found / nq

    g.search(queries[:8], 10)  # warm-up
    p50, p99, recall = timed(1)
    b50, b99, _ = timed(8)
    shop_t = []
    for i in range(min(nq, 100)):
        t = time.perf_counter()
        g.search(queries[i], 10, f"shop{i}")
        shop_t.append((time.perf_counter() - t) * 1e3)
    stats = g.stats()
    peaks["search"] = status_mb("VmHWM")
    half = g._half
    return {
        "n": n,
        "dim": dim,
        "mode": mode,
        "index": stats["index"],
        "items": stats["items"],
        "rss_mb": round(status_mb("VmRSS") - base_mb),  # the gallery's own, steady state
        "rss_total_mb": round(status_mb("VmRSS")),
        "peak_mb": round(max(peaks.values())),
        "peak_by_phase_mb": {k: round(v) for k, v in peaks.items()},
        "loaded_rss_mb": round(loaded_mb),
        "float16_rows_mb": round(half.nbytes / 2**20) if half is not None else 0,
        "load_s": round(load_s, 1),
        "items_per_s": round(n / load_s),
        "build_s": round(build_s, 1),
        "truth_s": round(truth_s, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "batch8_p50_ms": round(b50, 2),
        "batch8_p99_ms": round(b99, 2),
        "shop_p50_ms": round(float(np.percentile(shop_t, 50)), 2),
        "shop_p99_ms": round(float(np.percentile(shop_t, 99)), 2),
        "recall_at_10": round(recall, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["150000x1280:exact", "1000000x1280:compressed", "1000000x512:compressed"], help="NxD:mode")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        size, mode = a.child.split(":")
        n, dim = (int(x) for x in size.split("x"))
        print(json.dumps(child(n, dim, mode, a.queries)), flush=True)
        return
    print(
        "| N x D | mode (index) | RSS MB: gallery / process (peak) | load s (items/s) | build s "
        "| 1 query p50/p99 ms | 8 queries p50/p99 ms | shop p50/p99 ms | recall@10 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in a.runs:
        out = subprocess.run([sys.executable, __file__, "--child", run, "--queries", str(a.queries)], capture_output=True, text=True)
        if out.returncode:
            print(f"| {run} | failed: {out.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {r['n']:,} x {r['dim']} | {r['mode']} ({r['index']}) | {r['rss_mb']:,} / {r['rss_total_mb']:,} ({r['peak_mb']:,}) "
            f"| {r['load_s']} ({r['items_per_s']:,}) "
            f"| {r['build_s']} | {r['p50_ms']} / {r['p99_ms']} | {r['batch8_p50_ms']} / {r['batch8_p99_ms']} "
            f"| {r['shop_p50_ms']} / {r['shop_p99_ms']} | {r['recall_at_10']} |",
            flush=True,
        )
        print("  " + json.dumps(r), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
