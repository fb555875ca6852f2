"""Batching efficiency on an accelerator: raw encoder frames/s vs frames/s through the Batcher.

One self-contained script for the GPU machine (torch + numpy + opencv only; no FastAPI, faiss or
Redis): for each backbone (EfficientNet-Lite0, and ViT-B/32 when model/vit.py exists) and batch
size it measures
  raw:     EncoderEngine.encode on full batches, back to back (the service's unit of work:
           uint8 host frames -> pinned H2D copy -> normalise -> fp16 autocast -> L2 -> host);
  batched: the same engine behind pipeline.batcher.Batcher, fed by --submitters concurrent
           coroutines each submitting clips of --clip-frames frames in a closed loop;
and prints JSON with frames/s and efficiency = batched / raw (goal >= 0.9). Weights are random
(speed does not depend on them), so no weight files are needed.

GPU (the lead runs this; < 3 min on an H100):
    python bench/service_gpu_encoder.py
CPU smoke test with tiny sizes:
    python bench/service_gpu_encoder.py --device cpu --dtype fp32 --image-size 64 --batch 8 --seconds 1 --vit-tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import LoadedEncoder
from model.config import EncoderConfig, PreprocessConfig, ViTConfig
from model.encoder import build_backbone
from pipeline.batcher import Batcher, BatcherConfig
from pipeline.engine import EncoderEngine


def engine_for(backbone: str, args: argparse.Namespace) -> EncoderEngine:
    pre = replace(PreprocessConfig(), resize=args.image_size, crop=args.image_size)
    vit = ViTConfig(image_size=args.image_size)
    if args.vit_tiny:
        vit = ViTConfig(image_size=args.image_size, patch_size=16, width=64, layers=2, heads=2, embed_dim=32)
    cfg = EncoderConfig(backbone=backbone, vit=vit, preprocess=pre)
    model = build_backbone(cfg, pretrained=False)
    loaded = LoadedEncoder(model, cfg, f"bench-{backbone}", "random weights")
    return EncoderEngine(loaded, args.device, dtype=args.dtype, cuda_graphs=args.cuda_graphs)


def raw_fps(engine: EncoderEngine, frames: np.ndarray, seconds: float) -> float:
    """On a fresh worker thread, as the Batcher's encoder thread runs: on a busy CPU, torch on the
    main thread measured several times slower than on a worker thread, which would flatter the ratio."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_raw_loop, engine, frames, seconds).result()


def _raw_loop(engine: EncoderEngine, frames: np.ndarray, seconds: float) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        engine.encode(frames)  # returns host numpy: includes the device sync
        n += len(frames)
    return n / (time.perf_counter() - t)


async def batched_fps(engine: EncoderEngine, batch: int, clip: np.ndarray, submitters: int, seconds: float) -> tuple[float, float]:
    sizes: list[int] = []
    b = Batcher(
        engine.encode,
        BatcherConfig(max_batch=batch, max_wait_ms=2.0, max_queue_frames=1 << 20, depth=2),
        on_batch=lambda n, _s: sizes.append(n),
    )
    b.start()
    done = 0
    deadline = time.perf_counter() + seconds

    async def submitter() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            out = await b.submit(clip)
            done += len(out)

    t = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    elapsed = time.perf_counter() - t
    await b.stop()
    return done / elapsed, float(np.mean(sizes)) if sizes else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--clip-frames", type=int, default=10, help="frames per submitted request (the service default num_frames)")
    ap.add_argument("--submitters", type=int, default=0, help="concurrent requests; 0 = enough for 3 full batches")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--vit-tiny", action="store_true", help="a 2-layer ViT instead of B/32 (CPU smoke tests)")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "vit"])
    ap.add_argument("--cuda-graphs", action="store_true", help="capture the encoder as CUDA graphs (the service's default on CUDA)")
    args = ap.parse_args()

    rows = []
    for name in args.backbones:
        engine = engine_for(name, args)
        for batch in args.batch:
            engine.warm_up(batch, rounds=3)
            frames = np.random.default_rng(0).integers(0, 255, (batch, *engine.frame_shape), dtype=np.uint8)
            clip = frames[: args.clip_frames].copy()
            submitters = args.submitters or max(2, 3 * batch // args.clip_frames)
            # graphs (if on) must embed exactly what eager mode does
            with torch.inference_mode():
                eager = engine._forward(torch.from_numpy(frames).to(engine.device)).cpu().numpy()
            max_diff = float(np.abs(engine.encode([frames[: batch // 2], frames[batch // 2 :]]) - eager).max())
            raw = raw_fps(engine, frames, args.seconds)
            through, mean_batch = asyncio.run(batched_fps(engine, batch, clip, submitters, args.seconds))
            rows.append(
                {
                    "backbone": name,
                    "batch": batch,
                    "submitters": submitters,
                    "clip_frames": args.clip_frames,
                    "raw_fps": round(raw, 1),
                    "batcher_fps": round(through, 1),
                    "efficiency": round(through / raw, 3),
                    "mean_batch": round(mean_batch, 1),
                    "cuda_graphs": bool(engine._graphs),
                    "max_abs_diff_vs_eager": max_diff,
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(
        json.dumps(
            {"device": device, "torch": torch.__version__, "dtype": args.dtype, "image_size": args.image_size, "results": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
