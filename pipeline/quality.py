"""Frame quality in the clip embedding: down-weight frames that disagree with the rest of the clip.

A livestream clip has frames without the product (before the seller raises it, while it leaves the
frame), motion-blurred frames and dark ones. Their embeddings lie away from the frames that show
the product, so each frame is weighted by its agreement with the clip's (robust) mean:
w_i = softmax(cos(f_i, m) / temperature), m re-estimated once with those weights. Frames too dark
to show anything (mean luma below `dark_luma`) get no weight at all unless every frame is dark.
"""

from __future__ import annotations

import numpy as np

from pipeline.stages import Kind, Query


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def agreement_weights(frame_emb: np.ndarray, temperature: float = 0.05, usable: np.ndarray | None = None) -> np.ndarray:
    """frame_emb [N, D] -> weights [N] summing to 1; `usable` [N] bool masks frames out (all-False = all usable)."""
    f = _unit(frame_emb.astype(np.float64))  # [N, D]
    mask = np.ones(len(f), bool) if usable is None or not usable.any() else usable
    w = mask / mask.sum()
    for _ in range(2):  # the plain mean, then the mean of the agreeing frames
        m = _unit(w @ f)  # [D]
        logits = np.where(mask, (f @ m) / temperature, -np.inf)  # [N]
        e = np.exp(logits - logits.max())
        w = e / e.sum()
    return w


def weighted_clip_vector(frame_emb: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of L2-normalised frame embeddings [N, D], L2-normalised -> [D] float32."""
    return _unit(weights @ _unit(frame_emb.astype(np.float64))).astype(np.float32)


class QualityPooling:
    """Replaces the clip vector by the agreement-weighted one (clips and timeline windows; a still has one frame)."""

    name = "quality"
    kinds: frozenset[Kind] = frozenset({"clip", "window"})

    def __init__(self, temperature: float = 0.05, dark_luma: float = 20.0) -> None:
        self.temperature, self.dark_luma = temperature, dark_luma

    async def __call__(self, q: Query) -> None:
        if q.frame_emb is None or q.frames is None or len(q.frame_emb) < 3:
            return
        # [N] mean of every 8th pixel's RGB: brightness, cheap enough for the event loop
        luma = q.frames[:, ::8, ::8].reshape(len(q.frames), -1).mean(axis=1)
        weights = agreement_weights(q.frame_emb, self.temperature, luma >= self.dark_luma)
        q.vector = weighted_clip_vector(q.frame_emb, weights)
