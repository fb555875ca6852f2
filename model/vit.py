"""CLIP-compatible vision transformer (ViT-B/32 by default) and an importer for CLIP weight files.

Parameter names follow openai/CLIP `VisionTransformer` exactly, so an OpenAI or open_clip state
dict loads after stripping the `visual.` prefix. Only torch is imported here.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import zipfile
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from model.backbones import BackboneSpec
from model.config import CLIP_MEAN, CLIP_STD, EncoderConfig, PreprocessConfig, ViTConfig


class QuickGELU(nn.Module):
    """The GELU approximation OpenAI's CLIP weights were trained with (open_clip's `-quickgelu` models
    too). open_clip's LAION-trained ViT-B-32 was trained with exact GELU: use ViTConfig(gelu="exact")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block; names match CLIP's (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2)."""

    def __init__(self, width: int, heads: int, gelu: str = "quick") -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        act: nn.Module = QuickGELU() if gelu == "quick" else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", act), ("c_proj", nn.Linear(width * 4, width))])
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, gelu: str = "quick") -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, gelu) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """images [B, 3, S, S] -> (proj(ln_post(CLS)) [B, embed_dim], last hidden states [B, 1 + (S/P)^2, width])."""

    has_cls_token = True

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.gelu)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, cfg.embed_dim))
        self.embed_dim = cfg.embed_dim
        self.token_dim = cfg.width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(images)  # [B, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, T, width]
        x = self.transformer(self.ln_pre(x))  # [B, T, width]
        emb = self.ln_post(x[:, 0]) @ self.proj  # [B, embed_dim]
        return emb, x

    def last_blocks(self, n: int) -> list[ResidualAttentionBlock]:
        """Copies of the last `n` transformer blocks (the RICE v2 decoder starts from them)."""
        return [copy.deepcopy(b) for b in list(self.transformer.resblocks)[-n:]]  # type: ignore[misc]


class CLIPImportError(ValueError):
    """The weight file is not a CLIP ViT state dict of the expected architecture."""


def _visual_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keep the vision tower's tensors, without the `visual.` / `module.` prefixes."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):  # open_clip training checkpoints
        state = state["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("visual."):
            out[key[len("visual.") :]] = value
    if not out:  # a file that already holds only the vision tower
        out = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


def vit_config_from_clip_state(state: dict[str, Any]) -> ViTConfig:
    """Infer the ViT architecture (width, layers, patch, image size, embed dim) from a CLIP state dict."""
    v = _visual_state(state)
    try:
        width, _, patch, _ = v["conv1.weight"].shape
        tokens = v["positional_embedding"].shape[0]
        embed_dim = v["proj"].shape[1]
    except KeyError as exc:
        raise CLIPImportError(f"not a CLIP ViT state dict: missing {exc}") from exc
    layers = len({m.group(1) for k in v if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    grid = math.isqrt(tokens - 1)
    # CLIP ViTs use 64-d heads (B/32: 768 / 12).
    return ViTConfig(grid * patch, patch, width, layers, max(width // 64, 1), embed_dim)


def convert_clip_state(state: dict[str, Any], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """Map an OpenAI CLIP / open_clip state dict onto `model`'s keys, checking every name and shape.

    Raises CLIPImportError listing the missing keys and shape mismatches.
    """
    v = _visual_state(state)
    expected = model.state_dict()
    missing = [k for k in expected if k not in v]
    wrong = [f"{k}: file {tuple(v[k].shape)} vs model {tuple(t.shape)}" for k, t in expected.items() if k in v and v[k].shape != t.shape]
    if missing or wrong:
        lines = [f"missing {k}" for k in missing[:10]] + wrong[:10]
        raise CLIPImportError(f"CLIP weights do not fit ViT {model.cfg}: " + "; ".join(lines))
    return {k: v[k].float() for k in expected}


def _is_torchscript(path: str | os.PathLike[str]) -> bool:
    """A TorchScript archive is a zip holding compiled code (`<name>/code/...`) beside its constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def load_clip_weights(model: VisionTransformer, path: str | os.PathLike[str]) -> None:
    """Load OpenAI CLIP (TorchScript archive or state dict) or open_clip weights into `model`."""
    state: Any
    if _is_torchscript(path):
        # OpenAI's release files (ViT-B-32.pt) are TorchScript archives; loading one runs no Python pickles.
        # torch.load(weights_only=True) would hand it to torch.jit.load on some versions and raise on others.
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CLIPImportError(f"{path}: expected a state dict, got {type(state).__name__}")
    model.load_state_dict(convert_clip_state(state, model), strict=True)


# --- registry entry (model.backbones) ------------------------------------------------------------


def _build(cfg: EncoderConfig, pretrained: bool | None) -> nn.Module:
    return VisionTransformer(cfg.vit)  # pretrained weights come from a file: see _prepare


def _preprocess(image_size: int) -> PreprocessConfig:
    return PreprocessConfig(image_size, image_size, CLIP_MEAN, CLIP_STD)


def _from_args(args: argparse.Namespace) -> EncoderConfig:
    width, layers, heads, patch, size, dim = (int(x) for x in args.vit.split(","))
    vit = ViTConfig(size, patch, width, layers, heads, dim, getattr(args, "gelu", "quick"))
    return EncoderConfig("vit", vit=vit, preprocess=_preprocess(size))


def _trainable(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    assert isinstance(module, VisionTransformer)
    return list(module.transformer.resblocks), [module.ln_post, module.proj]


def _prepare(module: nn.Module, args: argparse.Namespace) -> None:
    assert isinstance(module, VisionTransformer)
    if getattr(args, "clip_weights", None):
        load_clip_weights(module, args.clip_weights)


SPEC = BackboneSpec("vit", _build, _from_args, _preprocess, _trainable, _prepare)
