"""What the console reads: the gallery listing (GET /v1/gallery/items walks the replica's index on
a thread) at N items, and the size of catalog thumbnails made at ingest.

    .venv/bin/python bench/console_reads.py --n 200000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from index.ann import AnnConfig
from index.gallery import Gallery
from index.records import Record
from model.config import PreprocessConfig
from model.preprocess import prepare_frame
from pipeline.thumbnail import thumbnail_jpeg
from tools.democatalog import make_products


def _ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000, help="gallery items")
    ap.add_argument("--skus-per-item", type=int, default=4, help="images per SKU")
    ap.add_argument("--shops", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    dim = 16  # listing never touches vectors: the dimension does not matter here
    rng = np.random.default_rng(0)
    g = Gallery(dim, AnnConfig(threshold=10**12))  # exact only: no background IVF build during the timing
    vecs = rng.standard_normal((args.n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    records = [
        Record(f"item-{i:07d}", f"SKU-{i // args.skus_per_item:07d}", f"shop-{i % args.shops}", vecs[i], {"name": f"product {i}"}, i + 1)
        for i in range(args.n)
    ]
    for s in range(0, args.n, 50_000):
        g.apply(records[s : s + 50_000])
    print(f"gallery: {len(g)} items, {args.n // args.skus_per_item} SKUs, {args.shops} shops")
    print(f"listing (median of {args.repeat}), one page of 50:")
    print(f"  unfiltered, first page         {_ms(lambda: g.list_items(offset=0, limit=50), args.repeat):8.1f} ms")
    print(f"  unfiltered, last page          {_ms(lambda: g.list_items(offset=args.n - 50, limit=50), args.repeat):8.1f} ms")
    print(f"  SKU text filter                {_ms(lambda: g.list_items(sku='sku-00012'), args.repeat):8.1f} ms")
    print(f"  one shop ({args.n // args.shops} items)          {_ms(lambda: g.list_items(shop_id='shop-7'), args.repeat):8.1f} ms")

    pre = PreprocessConfig()
    sizes = []
    for p in make_products(24, seed=1):
        frame = prepare_frame(p.image, pre, whole=True)  # what ingestion decodes a catalog image to
        sizes.append(len(thumbnail_jpeg(frame)))
    print(f"thumbnails of 24 generated catalog images: median {statistics.median(sizes) / 1024:.1f} kB, max {max(sizes) / 1024:.1f} kB")


if __name__ == "__main__":
    main()
