"""Encoder runtimes side by side: torch eager vs ONNX Runtime fp32 vs ONNX Runtime INT8, one run.

1. frames/s: the served encoder (`pipeline.engine.EncoderEngine`, default EfficientNet-Lite0) on
   batches of 1, 8 and 32 prepared frames, each runtime in turn within every round (so a load
   change on the machine hits all three alike), the median of --rounds per runtime and batch size;
   ratios to torch. The ONNX graphs are exported and verified against torch as the service does
   (cosine >= 0.999 fp32, >= 0.99 INT8), into a temporary cache; the least cosine to torch on the
   benchmark frames is reported too.
2. end to end (with --service-seconds): one `rice serve` process per runtime (default pipeline,
   empty gallery, as bench/service_load.py), --clients closed-loop clients uploading 30-frame clips
   (num_frames 8) to each service in turn, --rounds rounds; clips/s, median, and ratios to torch;
3. R@1 (with --root and --skus): `rice grocery-check` (tools.grocery_check) once per runtime, chosen with
   RICE_ENCODER_RUNTIME / RICE_ONNX_PRECISION as a user would, on the same --skus products.

Frames are catalog photos of the Grocery Store Dataset when --root (or $GROCERY_ROOT) is given,
else synthetic product-like frames.

    PYTHONPATH=. .venv/bin/python bench/encoder_runtimes.py --root $GROCERY_ROOT [--threads 2] [--skus 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import default_encoder
from pipeline.engine import EncoderEngine
from pipeline.onnx_runtime import synthetic_frames

RUNTIMES = {"torch": ("torch", "fp32"), "onnx-fp32": ("onnx", "fp32"), "onnx-int8": ("onnx", "int8")}


def catalog_frames(root: str | None, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    if not root:
        return synthetic_frames(n, shape, seed=11)
    from model.config import PreprocessConfig
    from tools.onnx_export import calibration_frames
    from train.grocery import read_grocery

    data = read_grocery(root)
    with tempfile.TemporaryDirectory() as tmp:  # calibration_frames reads a folder: link the iconic images into one
        for i, p in enumerate(data.products[:n]):
            (Path(tmp) / f"{i}{p.catalog_image.suffix}").symlink_to(p.catalog_image.resolve())
        return calibration_frames(tmp, n, PreprocessConfig())


def frames_per_s(encode: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, seconds: float) -> float:
    """Frames/s of `encode` on `batch`, calling it for about `seconds` (at least twice)."""
    calls, t0 = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - t0 < seconds:
        encode(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - t0)


def service_table(args: argparse.Namespace, cache: str) -> None:
    """Clips/s through the HTTP service, one service process per runtime, measured in turn each round."""
    import asyncio
    from contextlib import ExitStack

    from bench.service_load import closed_loop, make_clip
    from tools.service_process import serve

    clips = [make_clip(30, s) for s in range(4)]
    num_frames = 8
    with ExitStack() as stack:
        urls = {}
        for name, (rt, prec) in RUNTIMES.items():
            env = {"RICE_ENCODER_RUNTIME": rt, "RICE_ONNX_PRECISION": prec, "RICE_ONNX_DIR": cache}
            env |= {"RICE_GALLERY_PATH": ":memory:", "RICE_TORCH_THREADS": str(args.threads), "RICE_MAX_BATCH_SIZE": "16"}
            urls[name] = stack.enter_context(serve(env))[0]
        for url in urls.values():
            asyncio.run(closed_loop(url, clips, args.clients, num_frames, 2.0))  # warm each path
        rates: dict[str, list[float]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                fps, _ = asyncio.run(closed_loop(url, clips, args.clients, num_frames, args.service_seconds / args.rounds))
                rates[name].append(fps / num_frames)
    print(f"\nservice end to end, {args.clients} clients, 30-frame clips (num_frames {num_frames}), median of {args.rounds} rounds")
    print("| runtime | clips/s | vs torch | rounds |")
    print("|---|---|---|---|")
    base = statistics.median(rates["torch"])
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.2f} | {statistics.median(r) / base:.2f}x | {', '.join(f'{x:.2f}' for x in r)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("GROCERY_ROOT"), help="Grocery Store Dataset folder (default $GROCERY_ROOT)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (RICE_TORCH_THREADS), all runtimes")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every runtime once per batch size")
    p.add_argument("--seconds", type=float, default=1.5, help="time per runtime, batch size and round")
    p.add_argument("--service-seconds", type=float, default=0, help="end-to-end time per service (all rounds); 0 = skip")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--skus", type=int, default=0, help="R@1 on N products spread over the catalog (0 = no R@1 part)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = default_encoder()
    cache = tempfile.mkdtemp(prefix="rice-onnx-")
    engines = {
        name: EncoderEngine(loaded, "cpu", args.threads, runtime=rt, onnx_precision=prec, onnx_dir=cache)
        for name, (rt, prec) in RUNTIMES.items()
    }
    for name, engine in engines.items():
        assert engine.runtime == name, f"{name} was refused by verification (see the log); it serves {engine.runtime}"
    sizes = [int(b) for b in args.batches.split(",")]
    frames = catalog_frames(args.root, max(sizes), engines["torch"].frame_shape)
    frames = np.concatenate([frames] * (-(-max(sizes) // len(frames))))[: max(sizes)]  # [32, 224, 224, 3]
    ref = engines["torch"].encode(frames)
    cosine = {name: float((e.encode(frames) * ref).sum(1).min()) for name, e in engines.items()}
    for e in engines.values():
        e.warm_up(max(sizes))
    fps: dict[tuple[str, int], list[float]] = {(n, b): [] for n in engines for b in sizes}
    # On a worker thread, as the batcher's encoder thread runs it: on a busy CPU torch measured
    # several times slower on the main thread (docs/PERFORMANCE.md, "Service end to end on CPU").
    with ThreadPoolExecutor(1) as worker:
        for _ in range(args.rounds):
            for b in sizes:
                for name, e in engines.items():
                    fps[(name, b)].append(worker.submit(frames_per_s, e.encode, frames[:b], args.seconds).result())
    table = {
        name: {b: round(statistics.median(fps[(name, b)]), 1) for b in sizes} | {"least_cosine_to_torch": round(cosine[name], 5)}
        for name in engines
    }
    print(
        f"frames/s, median of {args.rounds} rounds, {args.threads} threads ({os.cpu_count()} CPUs), frames: "
        f"{'catalog photos' if args.root else 'synthetic'}"
    )
    print("| runtime | " + " | ".join(f"batch {b}" for b in sizes) + " | least cosine to torch |")
    print("|---|" + "---|" * (len(sizes) + 1))
    base = table["torch"]
    for name, row in table.items():
        cells = [f"{row[b]:.1f} ({row[b] / base[b]:.2f}x)" for b in sizes]
        print(f"| {name} | " + " | ".join(cells) + f" | {row['least_cosine_to_torch']:.5f} |")
    if args.service_seconds:
        service_table(args, cache)
    if args.root and args.skus:
        from tools.grocery_check import run_grocery_check
        from train.grocery import read_grocery

        catalog = read_grocery(args.root).products
        skus = {prod.sku for prod in catalog[:: max(1, len(catalog) // args.skus)][: args.skus]}  # spread over the groups
        print(f"\ngrocery-check (val clips, {args.skus} products), same run")
        print("| runtime | clip R@1 | clip R@5 | photo R@1 | queries | seconds |")
        print("|---|---|---|---|---|---|")
        for name, (rt, prec) in RUNTIMES.items():
            os.environ.update(RICE_ENCODER_RUNTIME=rt, RICE_ONNX_PRECISION=prec, RICE_ONNX_DIR=cache)
            os.environ["RICE_TORCH_THREADS"] = str(args.threads)
            r = run_grocery_check(args.root, skus=skus)
            clip, photo = r["clip"], r["single_photo"]
            print(f"| {name} | {clip['R@1']:.3f} | {clip['R@5']:.3f} | {photo['R@1']:.3f} | {r['queries']} | {r['seconds']} |")
            print(json.dumps({"runtime": name, "clip": clip, "single_photo": photo}), flush=True)


if __name__ == "__main__":
    main()
