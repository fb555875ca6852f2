"""The default encoder: real ImageNet weights, shapes, clip embedding, checkpoints."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import CheckpointError, LoadedEncoder, load_encoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from model.efficientnet import convert_lite0_state_dict, packaged_weights_path
from model.encoder import build_backbone, clip_embedding
from model.normalize import normalize
from model.preprocess import prepare_frame
from tools.democatalog import DemoProduct


def test_packaged_weights_load_and_match_products_across_views(encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    """Real ImageNet weights: every product photo, zoomed, shifted and relit, is nearest to its own
    catalog image. (A wrong key mapping or padding would break this.)"""
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    assert len(convert_lite0_state_dict(state)) == len(state) - 2  # everything but the classifier
    pre = encoder.config.preprocess

    def embed(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(torch.from_numpy(np.stack([prepare_frame(i, pre) for i in images])), pre)
        with torch.no_grad():
            emb, tokens = encoder.backbone.eval()(x)
        return F.normalize(emb, dim=-1), tokens

    def other_view(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        m = cv2.getRotationMatrix2D((w / 2 + 10, h / 2 - 8), 8, 1.15)
        return cv2.convertScaleAbs(cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT), alpha=0.8, beta=20)

    gallery, tokens = embed([p.image for p in products])
    queries, _ = embed([other_view(p.image) for p in products])
    assert gallery.shape == (len(products), 1280) and tokens.shape == (len(products), 49, 1280)
    assert (queries @ gallery.T).argmax(1).tolist() == list(range(len(products)))


def test_clip_embedding_is_masked_mean_of_normalised_frames() -> None:
    frames = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = clip_embedding(frames, mask)
    f = F.normalize(frames, dim=-1)
    assert torch.allclose(out[0], F.normalize(f[0, :2].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(out[1], F.normalize(f[1].mean(0), dim=0), atol=1e-6)
    frames[0, 2:] = 1e6  # padded frames must not matter
    assert torch.allclose(clip_embedding(frames, mask)[0], out[0], atol=1e-6)


def test_checkpoint_round_trip_and_rejection(tmp_path: Path) -> None:
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=64, pretrained=False))
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    version = save_checkpoint(tmp_path / "a.pt", backbone, cfg)
    loaded = load_encoder(tmp_path / "a.pt")
    assert loaded.model_version == version and loaded.config == cfg
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone.eval()(x)[0], loaded.backbone.eval()(x)[0])
    # same weights -> same version; different weights -> different version
    assert save_checkpoint(tmp_path / "b.pt", backbone, cfg) == version
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)
    assert save_checkpoint(tmp_path / "c.pt", backbone, cfg) != version
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError):
        load_encoder(tmp_path / "missing.pt")
