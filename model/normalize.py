"""Pixel normalisation: the one used by training, evaluation and serving.

Kept apart from `model.preprocess` (OpenCV and numpy only) so the decode worker processes, which
prepare frames but never normalise them, do not load torch.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import PreprocessConfig


class Normalize(nn.Module):
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] normalised with the config's mean and std.

    The one normalisation of training, evaluation and serving. The constants are buffers (scaled to
    0..255, so the uint8 input needs no division), moved with the module: the serving engine keeps it
    on its device, where a CUDA graph can capture it without host copies."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, cfg: PreprocessConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames.permute(0, 3, 1, 2).float() - self.mean) / self.std  # [B, 3, H, W]


def normalize(frames: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """`Normalize` for one call (training and evaluation batches)."""
    return Normalize(cfg).to(frames.device)(frames)
