"""The encoder engine: picks the device and dtype, warms the model up, encodes uint8 frames."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from model.checkpoint import LoadedEncoder
from model.preprocess import normalize

log = logging.getLogger("rice.engine")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class EncoderEngine:
    """Runs the backbone in inference mode; fp16 autocast on CUDA. Call from one thread at a time."""

    def __init__(self, loaded: LoadedEncoder, device: str = "auto", torch_threads: int = 0) -> None:
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.model = loaded.backbone.to(self.device).eval()
        self.config = loaded.config
        self.model_version = loaded.model_version
        self.source = loaded.source
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        crop = self.config.preprocess.crop
        self.frame_shape = (crop, crop, 3)
        self.dim = self._probe_dim()
        self.warmed = False

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            x = torch.zeros((1, *self.frame_shape), dtype=torch.uint8)
            return int(self.encode(x.numpy()).shape[1])

    def warm_up(self, batch_size: int) -> float:
        """Run a full-size batch once so the first request doesn't pay for lazy init; returns seconds."""
        t = time.perf_counter()
        self.encode(np.zeros((batch_size, *self.frame_shape), dtype=np.uint8))
        self.warmed = True
        return time.perf_counter() - t

    def encode(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB -> float32 [B, D], L2-normalised."""
        with torch.inference_mode():
            x = torch.from_numpy(frames).to(self.device, non_blocking=True)
            x = normalize(x, self.config.preprocess)  # [B, 3, H, W]
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
                emb, _ = self.model(x)
            return F.normalize(emb.float(), dim=-1).cpu().numpy()
