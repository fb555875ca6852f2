"""Gallery search: exact (flat) vs approximate (IVF) at N x D: build time, latency single and
batched, recall@10 against exact for each nprobe, memory per million vectors, and concurrent
searches through the search batcher vs one search per request on the same threads.

    .venv/bin/python bench/gallery_search.py --n 100000
    .venv/bin/python bench/gallery_search.py --n 100000 --dim 1280 --nprobes 8 16 32 64 --concurrency 8
    .venv/bin/python bench/gallery_search.py --n 1000000 --queries 200
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from index.ann import AnnConfig, set_search_threads
from index.gallery import Gallery
from index.records import Record
from pipeline.search_batcher import SearchBatcher


def clustered(rng: np.random.Generator, n: int, dim: int, centers: int = 4096, noise: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres (product embeddings cluster by kind), built in chunks."""
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        v = c[rng.integers(0, centers, m)] + noise * rng.standard_normal((m, dim)).astype(np.float32)
        out[s : s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    """Resident memory now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def fill(g: Gallery, vecs: np.ndarray) -> float:
    t = time.perf_counter()
    for s in range(0, len(vecs), 50_000):
        g.apply([Record(f"i{i}", f"s{i}", f"shop{i % 5000}", vecs[i], version=1) for i in range(s, min(len(vecs), s + 50_000))])
    return time.perf_counter() - t


def latency(g: Gallery, queries: np.ndarray, batch: int, shop: str | None = None) -> tuple[float, float, list[list[str]]]:
    times, ids = [], []
    for s in range(0, len(queries), batch):
        t = time.perf_counter()
        hits, _ = g.search(queries[s : s + batch], 10, shop)
        times.append((time.perf_counter() - t) * 1e3)
        ids += [[h.item_id for h in r] for r in hits]
    return float(np.percentile(times, 50)), float(np.percentile(times, 99)), ids


def search_during_import(g: Gallery, queries: np.ndarray, vecs: np.ndarray) -> tuple[float, list[float]]:
    """Apply `vecs` as one new version (a bulk import) while a thread searches without pause; returns
    (import seconds, search latencies in ms that overlapped the import)."""
    import threading

    lat: list[float] = []
    done = threading.Event()

    def searcher() -> None:
        i = 0
        while not done.is_set():
            t = time.perf_counter()
            g.search(queries[i % len(queries)], 10)
            lat.append((time.perf_counter() - t) * 1e3)
            i += 1

    thread = threading.Thread(target=searcher)
    thread.start()
    t = time.perf_counter()
    g.apply([Record(f"new{i}", f"new{i}", None, vecs[i], version=2) for i in range(len(vecs))])
    seconds = time.perf_counter() - t
    done.set()
    thread.join()
    return seconds, lat


async def concurrent_qps(g: Gallery, queries: np.ndarray, clients: int, threads: int, batched: bool) -> float:
    """Queries/s with `clients` concurrent requesters, each one query at a time, on `threads` search
    threads: through the SearchBatcher, or one search call per request (the service before it)."""
    batcher = SearchBatcher(g.search, threads)
    pool = ThreadPoolExecutor(threads)
    loop = asyncio.get_running_loop()
    todo = list(range(len(queries)))

    async def client() -> None:
        while todo:
            q = queries[todo.pop()]
            if batched:
                await batcher.search(q, 10, None)
            else:
                await loop.run_in_executor(pool, g.search, q[None], 10, None)

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - t
    batcher.close()
    pool.shutdown()
    return len(queries) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--nprobes", type=int, nargs="+", default=[32], help="IVF lists scanned per query: one row each")
    ap.add_argument("--concurrency", type=int, default=0, help="also compare N concurrent requesters, batched vs not")
    ap.add_argument("--import-rows", type=int, default=0, help="also: searches while a bulk import of this many rows is applied")
    ap.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads per faiss call, as RICE_FAISS_THREADS")
    args = ap.parse_args()
    set_search_threads(args.faiss_threads)
    rng = np.random.default_rng(0)
    vecs = clustered(rng, args.n, args.dim)
    # Queries look like gallery items seen again (another photo of a catalogued product): item + noise.
    qrng = np.random.default_rng(1)
    q = vecs[qrng.integers(0, args.n, args.queries)] + 0.05 * qrng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries = q / np.linalg.norm(q, axis=1, keepdims=True)
    base = rss_mb()

    exact = Gallery(args.dim, AnnConfig(enabled=False))
    fill_s = fill(exact, vecs)
    mem_exact = rss_mb() - base
    print(f"n={args.n} dim={args.dim}: exact fill {fill_s:.1f} s ({args.n / fill_s:,.0f} vectors/s), +{mem_exact:,.0f} MB RSS")

    approx = Gallery(args.dim, AnnConfig(threshold=1, nprobe=args.nprobes[0]))
    before = rss_mb()
    t = time.perf_counter()
    fill(approx, vecs)
    approx.wait_for_index(3600)
    build_s = time.perf_counter() - t
    nlist = approx.ann_config.lists_for(args.n)
    print(f"approx fill + IVF build {build_s:.1f} s, nlist={nlist}, +{rss_mb() - before:,.0f} MB RSS")

    rows = []
    for nprobe in [0, *args.nprobes]:  # 0: the exact gallery
        g = exact if nprobe == 0 else approx
        name = "exact" if nprobe == 0 else f"IVF nprobe {nprobe}"
        approx.ann_config = replace(approx.ann_config, nprobe=nprobe or 1)  # read by every search: one built index, many nprobes
        p50, p99, ids = latency(g, queries, 1)
        b50, b99, _ = latency(g, queries, 64)
        s50, s99, _ = latency(g, queries, 1, "shop7")
        rows.append((name, p50, p99, b50, b99, s50, s99, ids))
    exact_ids = rows[0][-1]
    print(f"nlist {nlist}; recall@10 against exact; latencies in ms (p50 / p99)")
    print("| N x D | index | single query | batch of 64 | one shop (of 5000) | recall@10 |")
    print("|---|---|---|---|---|---|")
    for name, p50, p99, b50, b99, s50, s99, ids in rows:
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ids, exact_ids, strict=True)])
        print(
            f"| {args.n:,} x {args.dim} | {name} | {p50:.2f} / {p99:.2f} | {b50:.1f} / {b99:.1f} | {s50:.2f} / {s99:.2f} | {recall:.3f} |"
        )
    if args.concurrency:
        for name, g in (("exact", exact), (f"IVF nprobe {approx.ann_config.nprobe}", approx)):
            plain = asyncio.run(concurrent_qps(g, queries, args.concurrency, 2, batched=False))
            batched = asyncio.run(concurrent_qps(g, queries, args.concurrency, 2, batched=True))
            print(
                f"{name}: {args.concurrency} concurrent requesters, 2 threads: {plain:.1f} q/s one per call, "
                f"{batched:.1f} q/s batched ({batched / plain:.2f}x)"
            )
    if args.import_rows:
        extra = clustered(np.random.default_rng(2), args.import_rows, args.dim)
        before_p50, before_p99, _ = latency(exact, queries, 1)
        seconds, lat = search_during_import(exact, queries, extra)
        print(
            f"bulk import of {args.import_rows:,} rows into the exact gallery of {args.n:,}: applied in {seconds:.1f} s; "
            f"{len(lat)} searches meanwhile, p50 {np.percentile(lat, 50):.1f} / p99 {np.percentile(lat, 99):.1f} / "
            f"max {max(lat):.1f} ms (before: p50 {before_p50:.1f} / p99 {before_p99:.1f} ms)"
        )
    print(f"memory per million vectors (exact gallery, RSS growth): {mem_exact / args.n * 1e6 / 1024:.2f} GB")


if __name__ == "__main__":
    main()
