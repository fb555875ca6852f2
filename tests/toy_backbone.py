"""A toy backbone, whole in one file: what adding a backbone takes (this file plus one registry line,
`REGISTRY["toy"] = "tests.toy_backbone:SPEC"`). A strided conv makes a 2x2 grid of patch tokens; the
embedding is their mean through a linear projection. Its settings live in EncoderConfig.options."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from model.backbones import BackboneSpec, parse_backbone_options
from model.config import EncoderConfig, PreprocessConfig


class ToyBackbone(nn.Module):
    """images [B, 3, S, S] -> (embedding [B, embed_dim], tokens [B, 4, token_dim])."""

    has_cls_token = False

    def __init__(self, embed_dim: int, token_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, token_dim, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.proj = nn.Linear(token_dim, embed_dim)
        self.embed_dim, self.token_dim = embed_dim, token_dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.stem(images).flatten(2).transpose(1, 2)  # [B, 4, token_dim]
        return self.proj(tokens.mean(dim=1)), tokens  # [B, embed_dim], [B, 4, token_dim]


def _build(cfg: EncoderConfig, pretrained: bool | None) -> nn.Module:
    return ToyBackbone(int(cfg.options.get("embed_dim", 8)), int(cfg.options.get("token_dim", 12)))


def _preprocess(image_size: int) -> PreprocessConfig:
    return PreprocessConfig(image_size, image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _from_args(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig("toy", preprocess=_preprocess(args.image_size), options=parse_backbone_options(args.backbone_options))


def _trainable(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    assert isinstance(module, ToyBackbone)
    return [module.stem], [module.proj]


def _zero_shot(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Stand-in "pretrained" weights: a fixed seed, so WiSE has a zero-shot end to interpolate with."""
    torch.manual_seed(1234)
    return _build(cfg, True).state_dict()


SPEC = BackboneSpec("toy", _build, _from_args, _preprocess, _trainable, zero_shot=_zero_shot)
