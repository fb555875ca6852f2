"""WiSE-FT interpolation: alpha=0 is exactly the zero-shot encoder, alpha=1 the fine-tuned one,
and in between the weights (hence embeddings) move continuously."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import LoadedEncoder, load_encoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from train.wise import interpolate, zero_shot_state


def test_interpolation_ends_are_zero_shot_and_fine_tuned(tmp_path: Path, encoder: LoadedEncoder) -> None:
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=1280, pretrained=True))
    from model.encoder import build_backbone

    tuned = build_backbone(cfg)
    tuned.load_state_dict(zero_shot_state(cfg))
    with torch.no_grad():  # a "fine-tuning" that moved the projection and the last block
        torch.manual_seed(0)
        tuned.proj.weight.add_(0.05 * torch.randn_like(tuned.proj.weight))
        tuned.net.head[0].weight.mul_(1.1)
    save_checkpoint(tmp_path / "ft.pt", tuned, cfg)
    interpolate(tmp_path / "ft.pt", 0.0, tmp_path / "a0.pt")
    interpolate(tmp_path / "ft.pt", 1.0, tmp_path / "a1.pt")
    interpolate(tmp_path / "ft.pt", 0.5, tmp_path / "a05.pt")

    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        zero = encoder.backbone.eval()(x)[0]  # the service's zero-shot encoder (no projection)
        e0, e1, e05 = (load_encoder(tmp_path / n).backbone.eval()(x)[0] for n in ("a0.pt", "a1.pt", "a05.pt"))
        ft = tuned.eval()(x)[0]
    assert torch.allclose(e0, zero, atol=1e-4)  # identity projection on the ImageNet features
    assert torch.allclose(e1, ft, atol=1e-4)
    assert not torch.allclose(e05, e0, atol=1e-3) and not torch.allclose(e05, e1, atol=1e-3)
