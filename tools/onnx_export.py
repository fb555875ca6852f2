"""`rice export-onnx`: export (and verify) the ONNX encoder ahead of start-up.

The service exports on its first start with RICE_ENCODER_RUNTIME=auto|onnx; this command does it
beforehand (in an image build, or before a rollout), into the same cache the service reads
(RICE_ONNX_DIR, else `onnx` beside the gallery file), and can calibrate INT8 on real catalog photos
(`--images`) instead of the built-in synthetic frames. It prints each export's verification and
exits 1 when one is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def add_parser(sub: Any) -> None:
    """Register `rice export-onnx` on the CLI's subparsers."""
    x = sub.add_parser(
        "export-onnx",
        help="export and verify the ONNX encoder into the cache the service reads (RICE_ONNX_DIR)",
        description="Exports the served model to ONNX (fp32, and INT8 with static quantisation), verifies each against torch "
        "on a fixed batch (cosine >= 0.999 fp32, >= 0.99 INT8) and caches it by model version. Exit 1 if one is refused.",
    )
    x.add_argument("--checkpoint", help="RICE checkpoint (default: RICE_CHECKPOINT, else the ImageNet EfficientNet-Lite0)")
    x.add_argument("--precision", choices=["fp32", "int8", "all"], default="fp32", help="fp32, int8 (quantised), or all of them")
    x.add_argument("--dir", help="cache directory (default: RICE_ONNX_DIR, else 'onnx' beside the gallery file)")
    x.add_argument("--images", help="folder of catalog photos (searched recursively) to calibrate INT8 on")
    x.add_argument("--calibration-frames", type=int, default=32, help="most photos used for calibration")
    x.set_defaults(func=run)


def calibration_frames(folder: str, limit: int, pre: Any) -> np.ndarray:
    """Up to `limit` photos of the folder, spread over it, prepared as the service prepares frames."""
    import cv2

    from model.preprocess import prepare_frame

    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise OSError(2, "no images found", folder)
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int)]
    frames = []
    for p in picked:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is not None:
            frames.append(prepare_frame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pre))
    return np.stack(frames)  # [N, H, W, 3] uint8


def run(args: argparse.Namespace) -> int:
    from model.checkpoint import load_encoder
    from pipeline.engine import EncoderEngine
    from pipeline.onnx_runtime import cache_path, load_verified
    from service.settings import Settings
    from service.state import onnx_dir

    settings = Settings()
    loaded = load_encoder(args.checkpoint or settings.checkpoint)
    engine = EncoderEngine(loaded, "cpu", settings.torch_threads)  # the torch reference
    root = args.dir or onnx_dir(settings)
    calibration = calibration_frames(args.images, args.calibration_frames, loaded.config.preprocess) if args.images else None
    refused = 0
    for precision in ("fp32", "int8") if args.precision == "all" else (args.precision,):
        encoder = load_verified(
            engine.model,
            loaded.config.preprocess,
            engine.frame_shape,
            loaded.model_version,
            engine.encode,
            root,
            precision,
            threads=settings.torch_threads or 1,
            calibration=calibration,
            rebuild=True,
        )
        path = cache_path(root, loaded.model_version, precision)
        fallback = "the fp32 graph" if precision != "fp32" else "torch"
        print(f"{precision}: {'verified' if encoder else f'REFUSED (the service will run {fallback})'} {path}")
        refused += encoder is None
    return 1 if refused else 0
