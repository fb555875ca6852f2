"""The shared image encoder: images -> (global embedding, patch tokens), and the clip embedding.

Backbones are built through the registry in `model.backbones`; `build_backbone` and
`EfficientNetBackbone` are re-exported here for existing callers. Clip pooling lives here once, in a
torch form (training, evaluation) and a numpy form (serving), which agree.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.backbones import build_backbone
from model.efficientnet import EfficientNetBackbone

__all__ = ["EfficientNetBackbone", "build_backbone", "clip_embedding", "pool_clip"]


def clip_embedding(frame_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of L2-normalised frame embeddings, L2-normalised again.

    frame_emb [B, T, D], mask [B, T] (1 = real frame, 0 = padding) -> [B, D]
    """
    frames = F.normalize(frame_emb.float(), dim=-1)  # [B, T, D]
    m = mask.to(frames.dtype).unsqueeze(-1)  # [B, T, 1]
    summed = (frames * m).sum(dim=1)  # [B, D]
    count = m.sum(dim=1).clamp_min(1.0)  # [B, 1]
    return F.normalize(summed / count, dim=-1)


def pool_clip(frame_emb: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """numpy twin of `clip_embedding`: masked mean of L2-normalised frame embeddings, L2-normalised.

    frame_emb [T, D] -> [D], or [B, T, D] -> [B, D]; mask [T] / [B, T] (1 = real frame), default all
    real. Returns float32. A clip with no real frame gives zeros rather than NaN.
    """
    x = np.asarray(frame_emb, dtype=np.float32)
    single = x.ndim == 2
    if single:
        x = x[None]  # [1, T, D]
    m = np.ones(x.shape[:2], np.float32) if mask is None else np.asarray(mask, np.float32).reshape(x.shape[:2])  # [B, T]
    frames = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # [B, T, D]
    mean = (frames * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1, keepdims=True), 1.0)  # [B, D]
    out = (mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32)
    return out[0] if single else out
