"""The encoder engine: picks the device and dtype, warms the model up, encodes uint8 frames.

Everything that decides how fast a batch runs lives here: device, compute dtype (autocast),
inference mode, memory format, host-to-device copies and CPU thread counts. The batcher calls
`encode` from its single encoder thread.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import LoadedEncoder
from model.preprocess import normalize

log = logging.getLogger("rice.engine")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else as torch spells it ('cpu', 'cuda:1')."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA (tensor cores), fp32 on CPU (bf16 only pays off on CPUs with
    AVX512-BF16/AMX, so it is opt-in there)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected auto, fp32, fp16 or bf16")
    return DTYPES[name]


class EncoderEngine:
    """Runs the backbone in inference mode under autocast. Call `encode` from one thread at a time."""

    def __init__(self, loaded: LoadedEncoder, device: str = "auto", torch_threads: int = 0, dtype: str = "auto") -> None:
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = loaded.backbone.to(self.device).eval()
        if self.device.type == "cuda":
            # normalize() yields NHWC-strided tensors; channels_last convs read them without a copy
            # and are the fast path for fp16 tensor-core kernels.
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack it
        self.config = loaded.config
        self.model_version = loaded.model_version
        self.source = loaded.source
        crop = self.config.preprocess.crop
        self.frame_shape = (crop, crop, 3)
        self.warmed = False
        self.dim = self._probe_dim()

    @property
    def autocast(self) -> bool:
        return self.dtype != torch.float32

    def _probe_dim(self) -> int:
        return int(self.encode(np.zeros((1, *self.frame_shape), dtype=np.uint8)).shape[1])

    def warm_up(self, batch_size: int, rounds: int = 2) -> float:
        """Run full-size batches (and a single frame) so the first requests don't pay for lazy
        init, kernel selection or allocator growth; returns the seconds it took."""
        t = time.perf_counter()
        for _ in range(rounds):
            self.encode(np.zeros((batch_size, *self.frame_shape), dtype=np.uint8))
        self.encode(np.zeros((1, *self.frame_shape), dtype=np.uint8))
        self.warmed = True
        return time.perf_counter() - t

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB -> float32 [B, D], L2-normalised."""
        with torch.inference_mode():
            x = torch.from_numpy(frames)
            if self.device.type == "cuda":
                # Pinned memory makes the copy asynchronous and ~2x faster; uint8 travels (4x less than float).
                x = x.pin_memory().to(self.device, non_blocking=True)
            x = normalize(x, self.config.preprocess)  # [B, 3, H, W]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                emb, _ = self.model(x)
            return F.normalize(emb.float(), dim=-1).cpu().numpy()
