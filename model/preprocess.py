"""Frame preprocessing shared by training, evaluation and serving.

Split in two so the expensive part runs where it is cheap: `prepare_frame` in the decode workers
(uint8, small; OpenCV and numpy only, no torch), `model.normalize` on the encoder's device.
"""

from __future__ import annotations

import cv2
import numpy as np

from model.config import PreprocessConfig
from model.media import IMAGE_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "prepare_frame", "sample_indices"]


def sample_indices(total: int, n: int) -> list[int]:
    """`n` frame indices spread uniformly (linspace, first and last included) over `total` frames;
    every frame when total <= n. Training and serving sample clips the same way."""
    if total <= n:
        return list(range(total))
    return [round(x) for x in np.linspace(0, total - 1, n)]


def resize_center_crop(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [crop, crop, 3]: shorter side to `resize`, then the centre square."""
    h, w = rgb.shape[:2]
    scale = resize / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    out = cv2.resize(rgb, (nw, nh), interpolation=interp)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    return np.ascontiguousarray(out[top : top + crop, left : left + crop])


def squash_center_crop(rgb: np.ndarray, resize: int, crop: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] -> [crop, crop, 3]: the whole frame to resize x resize (aspect not kept),
    then the centre square, as the RICE authors' `Resize([256, 256])` + `CenterCrop(224)`."""
    size = max(resize, crop)
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    out = cv2.resize(rgb, (size, size), interpolation=interp)
    top = (size - crop) // 2
    return np.ascontiguousarray(out[top : top + crop, top : top + crop])


def fit_frame(rgb: np.ndarray, resize: int, crop: int, frame_fit: str = "crop") -> np.ndarray:
    """[H, W, 3] -> [crop, crop, 3] by the config's frame fit ("crop" or "squash", see PreprocessConfig)."""
    if frame_fit == "squash":
        return squash_center_crop(rgb, resize, crop)
    return resize_center_crop(rgb, resize, crop)


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """Letterbox [H, W, 3] to a square, filling with the image's own border colour."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    s = max(h, w)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    fill = np.median(border, axis=0).astype(np.uint8)
    out = np.empty((s, s, 3), dtype=np.uint8)
    out[:] = fill
    top, left = (s - h) // 2, (s - w) // 2
    out[top : top + h, left : left + w] = rgb
    return out


def train_size(cfg: PreprocessConfig) -> int:
    """The square training random-crops `cfg.crop` from: the eval resize when it is larger than the
    crop (Resize 256 / crop 224, the authors'), else crop * 256/224 (configs that resize to the crop)."""
    return cfg.resize if cfg.resize > cfg.crop else round(cfg.crop * 256 / 224)


def image_frame_fit(cfg: PreprocessConfig) -> str:
    """How a catalog image is fit after `prepare_frame`'s letterbox step: squashed images use "squash"."""
    return "squash" if cfg.image_fit == "squash" else cfg.frame_fit


def prepare_frame(bgr: np.ndarray, cfg: PreprocessConfig, whole: bool = False) -> np.ndarray:
    """An OpenCV BGR frame -> RGB uint8 [crop, crop, 3] ready for `normalize` (fit by cfg.frame_fit).

    whole=True prepares a catalog image by cfg.image_fit: "letterbox" pads it to a square first
    (catalog images show the whole product, and cropping a tall package cuts off its top and bottom:
    +20 points top-1 on the demo catalog's close-up clips with the ImageNet encoder); "squash"
    treats it exactly like a squashed frame, as the authors prepare LPR4M shop images.
    """
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if whole and cfg.image_fit == "letterbox":
        rgb = pad_to_square(rgb)
    return fit_frame(rgb, cfg.resize, cfg.crop, image_frame_fit(cfg) if whole else cfg.frame_fit)
