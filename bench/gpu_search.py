"""Exact gallery search on the GPU with torch (matmul + top-k), checked against a CPU oracle.

The GPU machines' image has no faiss-gpu runtime, so this measures what the service's exact
search costs on the accelerator and how close fp16 scoring stays to fp32:

    python bench/gpu_search.py --n 1000000 --dim 512 --queries 256     # on a CUDA machine
    python bench/gpu_search.py --n 20000 --dim 64 --queries 16 --device cpu   # smoke test here

Prints JSON: latency of one query and of a batch, recall@10 of fp16 vs the fp32 top-10, and
agreement of the device's fp32 top-10 with a numpy float64 oracle on a subset.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--oracle-n", type=int, default=100_000, help="gallery rows checked against numpy")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.n, args.dim, generator=g), dim=1).to(device)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1).to(device)
    gallery16, queries16 = gallery.half(), queries.half()

    def search(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(q @ x.T, args.k, dim=1).indices

    top32 = search(queries, gallery)
    top16 = search(queries16, gallery16)
    recall16 = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / args.k for a, b in zip(top16, top32, strict=True)]))

    m = min(args.oracle_n, args.n)
    sub = gallery[:m].double().cpu().numpy()
    qs = queries[:16].double().cpu().numpy()
    oracle = np.argsort(-(qs @ sub.T), axis=1)[:, : args.k]
    dev = search(queries[:16], gallery[:m]).cpu().numpy()
    agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(oracle, dev, strict=True)]))

    repeat = 20 if device.type == "cuda" else 2
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "fp32_one_query_ms": round(timed(lambda: search(queries[:1], gallery), device, repeat) * 1e3, 3),
        "fp32_batch_ms": round(timed(lambda: search(queries, gallery), device, repeat) * 1e3, 3),
        "fp16_one_query_ms": round(timed(lambda: search(queries16[:1], gallery16), device, repeat) * 1e3, 3),
        "fp16_batch_ms": round(timed(lambda: search(queries16, gallery16), device, repeat) * 1e3, 3),
        "batch": args.queries,
        "fp16_recall_at_k_vs_fp32": round(recall16, 4),
        "fp32_vs_numpy_oracle_agreement": round(agree, 4),
        "gallery_gib_fp32": round(args.n * args.dim * 4 / 2**30, 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
