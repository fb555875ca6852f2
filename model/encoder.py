"""The shared image encoder: images -> (global embedding, patch tokens), and the clip embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import EncoderConfig
from model.efficientnet import HEAD_CHANNELS, EfficientNetLite0, load_imagenet_lite0


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite0 as a RICE backbone: pooled (optionally projected) embedding + 7x7 tokens."""

    def __init__(self, embed_dim: int | None, pretrained: bool) -> None:
        super().__init__()
        self.net = load_imagenet_lite0() if pretrained else EfficientNetLite0()
        self.proj = nn.Linear(HEAD_CHANNELS, embed_dim) if embed_dim else None
        self.embed_dim = embed_dim or HEAD_CHANNELS
        self.token_dim = HEAD_CHANNELS

    @torch.no_grad()
    def set_identity_proj(self) -> None:
        """Projection = identity: the model then embeds exactly as the zero-shot ImageNet features
        do (where --identity-proj training starts, and the zero-shot end of WiSE-FT)."""
        if self.proj is None or self.proj.in_features != self.proj.out_features:
            raise ValueError("an identity projection needs embed_dim 1280")
        self.proj.weight.copy_(torch.eye(self.proj.in_features))
        self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net(images)  # [B, 1280, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, 1280]
        pooled = tokens.mean(dim=1)  # [B, 1280]
        emb = self.proj(pooled) if self.proj is not None else pooled  # [B, D]
        return emb, tokens


def build_backbone(cfg: EncoderConfig, pretrained: bool | None = None) -> nn.Module:
    """Construct the backbone named by the config. `pretrained` overrides the config's flag
    (a checkpoint's own weights replace the ImageNet ones anyway, so loading is skipped then)."""
    if cfg.backbone == "efficientnet_lite0":
        use_pretrained = cfg.efficientnet.pretrained if pretrained is None else pretrained
        return EfficientNetBackbone(cfg.efficientnet.embed_dim, use_pretrained)
    if cfg.backbone == "vit":
        from model.vit import VisionTransformer

        return VisionTransformer(cfg.vit)
    raise ValueError(f"unknown backbone {cfg.backbone!r}; expected 'efficientnet_lite0' or 'vit'")


def clip_embedding(frame_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of L2-normalised frame embeddings, L2-normalised again.

    frame_emb [B, T, D], mask [B, T] (1 = real frame, 0 = padding) -> [B, D]
    """
    frames = F.normalize(frame_emb.float(), dim=-1)  # [B, T, D]
    m = mask.to(frames.dtype).unsqueeze(-1)  # [B, T, 1]
    summed = (frames * m).sum(dim=1)  # [B, D]
    count = m.sum(dim=1).clamp_min(1.0)  # [B, 1]
    return F.normalize(summed / count, dim=-1)
