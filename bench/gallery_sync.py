"""Sync lag and ingestion rate through Redis: a writer acknowledged by Redis, two replicas
(GalleryReplica + Follower, each on its own connection) following the stream on loopback.

    .venv/bin/python bench/gallery_sync.py --writes 1000
Starts a private redis-server (AOF, appendfsync always) on a free port in a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from index.records import Record
from index.redis_store import RedisStore
from index.replica import GalleryReplica
from tests.conftest import RedisServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ingest", type=int, default=20_000, help="vectors for the ingestion-rate measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            run(server.url, args)
        finally:
            server.stop()


def run(url: str, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.writes, args.dim)).astype(np.float32)
    writer = RedisStore(url, log_maxlen=0)
    replicas = [GalleryReplica(RedisStore(url), "m", args.dim) for _ in range(2)]
    for r in replicas:
        r.start()
    lags: list[list[float]] = [[], []]
    acks = []
    for i in range(args.writes):
        t0 = time.perf_counter()
        v = writer.upsert("m", [Record(f"i{i}", f"s{i}", "shop", vecs[i])])
        t1 = time.perf_counter()
        acks.append((t1 - t0) * 1e3)
        seen = [False, False]
        while not all(seen):  # spin: measure when each replica's searches can see version v
            for j, r in enumerate(replicas):
                if not seen[j] and r.gallery.version >= v:
                    seen[j] = True
                    lags[j].append((time.perf_counter() - t1) * 1e3)
    print(f"{args.writes} single-item writes of {args.dim}-d vectors, Redis AOF appendfsync=always, loopback")
    print(f"write acknowledged: p50 {np.percentile(acks, 50):.2f} ms, p99 {np.percentile(acks, 99):.2f} ms")
    for j in range(2):
        print(f"ack -> visible on replica {j + 1}: p50 {np.percentile(lags[j], 50):.2f} ms, p99 {np.percentile(lags[j], 99):.2f} ms")

    # Ingestion: batches of 100 into Redis; then a fresh replica booting from the state, and the
    # two running replicas following the same writes through the stream.
    big = rng.standard_normal((args.ingest, args.dim)).astype(np.float32)
    t = time.perf_counter()
    for s in range(0, args.ingest, 100):
        v = writer.upsert("m", [Record(f"b{i}", f"s{i}", f"shop{i % 100}", big[i]) for i in range(s, min(args.ingest, s + 100))])
    into_redis = time.perf_counter() - t
    for r in replicas:
        while r.gallery.version < v:
            time.sleep(0.001)
    followed = time.perf_counter() - t
    print(
        f"ingest {args.ingest} vectors in batches of 100: into Redis {args.ingest / into_redis:,.0f} vectors/s; "
        f"written and applied by both following replicas {args.ingest / followed:,.0f} vectors/s"
    )
    t = time.perf_counter()
    fresh = GalleryReplica(RedisStore(url), "m", args.dim)
    fresh.start()
    boot = time.perf_counter() - t
    n = len(fresh.gallery)
    print(f"replica boot from the Redis state: {n} vectors in {boot:.2f} s ({n / boot:,.0f} vectors/s)")
    for r in [*replicas, fresh]:
        r.stop()


if __name__ == "__main__":
    main()
