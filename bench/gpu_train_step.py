"""RICE training-step throughput (ICL + PMD + PFR, forward + backward + AdamW) on an accelerator.

Synthetic inputs (speed does not depend on the pixels), random weights, the losses and heads of
model/rice.py and the backbones of model/encoder.py; bf16 autocast with fp32 master weights, as
train/train.py runs on CUDA. One short script for the GPU machine (torch + numpy only):

    python bench/gpu_train_step.py                        # ViT-B/32 and EfficientNet-Lite0 on CUDA
    python bench/gpu_train_step.py --device cpu --tiny    # smoke test here

Prints JSON per backbone: steps/s, clips/s, frames/s through the backbone, peak memory, losses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import EfficientNetConfig, EncoderConfig, ViTConfig
from model.encoder import build_backbone
from model.rice import RICE, RICEConfig


def bench(name: str, cfg: EncoderConfig, batch: int, frames: int, steps: int, device: torch.device, size: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = RICE(build_backbone(cfg, pretrained=False), RICEConfig(decoder_width=256, decoder_heads=8)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.2)
    clips = torch.randn(batch, frames, 3, size, size, device=device)
    mask = torch.ones(batch, frames, device=device)
    mask[: batch // 2, frames // 2 :] = 0  # half the clips cut short, as the cut-tail augmentation does
    images = torch.randn(batch, 3, size, size, device=device)
    skus = torch.arange(batch, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> dict[str, float]:
        opt.zero_grad(set_to_none=True)
        with amp:
            out = model(clips, mask, images, skus)
        out["loss"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in out.items()}

    for _ in range(2):  # warm-up: kernel selection, allocator growth
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        losses = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    real_frames = int(mask.sum()) + batch
    return {
        "backbone": name,
        "batch_clips": batch,
        "frames_per_clip": frames,
        "step_s": round(dt, 4),
        "clips_per_s": round(batch / dt, 1),
        "backbone_images_per_s": round(real_frames / dt, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "losses": {k: round(v, 4) for k, v in losses.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="tiny ViT, 64 px, batch 4 (CPU smoke test)")
    args = ap.parse_args()
    device = torch.device(args.device)
    size, batch, frames, steps = (64, 4, 3, 2) if args.tiny else (224, args.batch, args.frames, args.steps)
    vit = ViTConfig(size, 32, 64, 2, 4, 32) if args.tiny else ViTConfig()
    runs = [
        ("vit-b32", EncoderConfig("vit", vit=vit)),
        ("efficientnet-lite0", EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=512, pretrained=False))),
    ]
    results = [bench(name, cfg, batch, frames, steps, device, size) for name, cfg in runs]
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
