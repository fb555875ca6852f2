"""Livestream-like scenes from product photos: the product small, medium or large in the frame,
partly covered by a hand, over a defocused shelf with distractor products, filmed by a hand-held
camera (`tools.clipsynth.camera_motion_clip`), sometimes with frames before the product is raised.

Product scale types follow LPR4M's (the share of the frame the product's box covers):

| scale | box side / frame side | box area / frame area |
|---|---|---|
| small | 0.30-0.48 | 0.09-0.23 (<= 25%) |
| medium | 0.52-0.68 | 0.27-0.46 |
| large | 0.75-0.92 | 0.56-0.85 |

Everything is drawn from the caller's `numpy.random.Generator`: a seed gives the same clip.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from tools.clipsynth import camera_motion_clip

SCALES: dict[str, tuple[float, float]] = {"small": (0.30, 0.48), "medium": (0.52, 0.68), "large": (0.75, 0.92)}
# Skin tones (BGR) from light to dark: the hand must not be one colour the model could learn to ignore.
_SKIN_BGR = np.array([[173, 199, 241], [140, 180, 224], [105, 150, 198], [75, 115, 160], [50, 80, 120]], np.float32)


@dataclass(frozen=True)
class SceneSpec:
    """What a clip shows, for the benchmark's report."""

    scale: str
    product_side: float  # box side / frame side
    hand: bool
    distractors: int
    empty_frames: int  # leading frames without the product (the seller has not raised it yet)


def product_patch(photo: np.ndarray, keep: float = 0.8) -> np.ndarray:
    """The central square of a product photo: the grocery photos centre the held product, so the
    centre `keep` of the shorter side is mostly product (with some of the seller's hand and shelf)."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * keep)
    top, left = (h - side) // 2, (w - side) // 2
    return photo[top : top + side, left : left + side]


def _soft_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A rounded rectangle with feathered edges [h, w] in 0..1: pasted patches have no hard seams."""
    mask = np.zeros((h, w), np.float32)
    r = int(min(h, w) * rng.uniform(0.08, 0.25))
    cv2.rectangle(mask, (r, 0), (w - 1 - r, h - 1), 1.0, -1)
    cv2.rectangle(mask, (0, r), (w - 1, h - 1 - r), 1.0, -1)
    for cx, cy in ((r, r), (w - 1 - r, r), (r, h - 1 - r), (w - 1 - r, h - 1 - r)):
        cv2.circle(mask, (cx, cy), r, 1.0, -1)
    k = max(3, (min(h, w) // 20) | 1)
    return cv2.GaussianBlur(mask, (k, k), 0)


def _paste(canvas: np.ndarray, patch: np.ndarray, x: int, y: int, alpha: np.ndarray) -> None:
    """Alpha-blend `patch` [h, w, 3] into `canvas` at (x, y), clipped to the canvas."""
    ch, cw = canvas.shape[:2]
    h, w = patch.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, cw), min(y + h, ch)
    if x0 >= x1 or y0 >= y1:
        return
    p = patch[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32)
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = np.clip(a * p + (1.0 - a) * region, 0, 255).astype(np.uint8)


def draw_hand(canvas: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """A hand gripping the product from below or from a side: a palm and four fingers in one skin
    tone with soft shading, covering roughly 10-30% of the product box."""
    x, y, w, h = box
    tone = _SKIN_BGR[rng.integers(len(_SKIN_BGR))] * rng.uniform(0.9, 1.1)
    layer = np.zeros(canvas.shape[:2], np.float32)
    side = int(rng.integers(3))  # 0 = from below, 1 = from the left, 2 = from the right
    finger_w = max(3, int(0.09 * w * rng.uniform(0.8, 1.2)))
    reach = rng.uniform(0.25, 0.45)
    if side == 0:
        palm = (int(x + w * rng.uniform(0.3, 0.7)), int(y + h * 1.05))
        cv2.ellipse(layer, palm, (int(w * 0.32), int(h * 0.28)), 0, 0, 360, 1.0, -1)
        for i in range(4):
            fx = int(palm[0] + (i - 1.5) * finger_w * 1.3)
            cv2.line(layer, (fx, palm[1]), (fx + int(rng.integers(-3, 4)), int(y + h * (1 - reach))), 1.0, finger_w)
    else:
        edge = x if side == 1 else x + w
        sign = 1 if side == 1 else -1
        palm = (int(edge - sign * w * 0.1), int(y + h * rng.uniform(0.35, 0.7)))
        cv2.ellipse(layer, palm, (int(w * 0.22), int(h * 0.3)), 0, 0, 360, 1.0, -1)
        for i in range(4):
            fy = int(palm[1] + (i - 1.5) * finger_w * 1.3)
            cv2.line(layer, (palm[0], fy), (int(edge + sign * w * reach), fy + int(rng.integers(-3, 4))), 1.0, finger_w)
    k = max(3, (finger_w // 2) | 1)
    alpha = cv2.GaussianBlur(layer, (k, k), 0)
    # Shading: lit from above, so the lower part of the hand is darker.
    shade = np.linspace(1.1, 0.8, canvas.shape[0], dtype=np.float32)[:, None, None]
    skin = np.clip(tone[None, None, :] * shade, 0, 255) * np.ones_like(canvas, np.float32)
    _paste(canvas, skin.astype(np.uint8), 0, 0, alpha)


def compose_scene(
    product: np.ndarray | None,
    background: np.ndarray,
    distractors: list[np.ndarray],
    scale: str,
    rng: np.random.Generator,
    size: int = 320,
    hand: bool = True,
) -> tuple[np.ndarray, float]:
    """One still scene [size, size, 3] BGR: a defocused shelf (`background`), the `distractors`
    (smaller than the product, anywhere, partly out of frame), then the product at the requested scale with a hand
    over it. `product=None` draws the same scene without it. Returns the scene and the product's side."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    canvas = cv2.resize(background, (size, size), interpolation=cv2.INTER_AREA)
    sigma = rng.uniform(1.5, 4.0)  # a livestream camera focuses on the seller, not the shelf behind
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    canvas = cv2.convertScaleAbs(canvas, alpha=rng.uniform(0.6, 1.0), beta=rng.uniform(-20, 10))
    lo, hi = SCALES[scale]
    frac = float(rng.uniform(lo, hi))
    for d in distractors:
        # Smaller than the shown product: the seller holds it up to the camera, in front of the rest.
        side = int(size * frac * rng.uniform(0.45, 0.7))
        patch = cv2.resize(product_patch(d, rng.uniform(0.6, 0.9)), (side, side), interpolation=cv2.INTER_AREA)
        x = int(rng.uniform(-0.15, 0.95) * size - side / 2)
        y = int(rng.uniform(-0.15, 0.95) * size - side / 2)
        _paste(canvas, patch, x, y, _soft_mask(side, side, rng))
    if product is not None:
        side = int(size * frac)
        patch = cv2.resize(product_patch(product), (side, side), interpolation=cv2.INTER_AREA)
        # The seller holds the product somewhere near the middle; never more than 10% out of frame.
        slack = size - side
        x = int(np.clip(rng.normal(0.5, 0.2), 0.0, 1.0) * slack)
        y = int(np.clip(rng.normal(0.5, 0.2), 0.0, 1.0) * slack)
        _paste(canvas, patch, x, y, _soft_mask(side, side, rng))
        if hand:
            draw_hand(canvas, (x, y, side, side), rng)
    return canvas, frac


def livestream_clip(
    product: np.ndarray | None,
    background: np.ndarray,
    distractors: list[np.ndarray],
    scale: str,
    rng: np.random.Generator,
    num_frames: int = 16,
    size: int = 256,
    p_hand: float = 0.7,
    p_empty_start: float = 0.3,
) -> tuple[list[np.ndarray], SceneSpec]:
    """A hand-held clip of one composed scene: `num_frames` BGR frames [size, size, 3] and what they show.

    With probability `p_empty_start` the first 2-4 frames show the scene before the product is raised
    (the same camera path, no product): the clip embedding must not be diluted by them."""
    hand = bool(rng.random() < p_hand)
    scene_seed = int(rng.integers(2**63))
    camera_seed = int(rng.integers(2**63))
    # Compose at 1.25x the output so the camera's zoom-in keeps detail.
    scene, frac = compose_scene(product, background, distractors, scale, np.random.default_rng(scene_seed), int(size * 1.25), hand)
    frames = camera_motion_clip(scene, np.random.default_rng(camera_seed), num_frames=num_frames, out_size=(size, size))
    empty = 0
    if product is not None and rng.random() < p_empty_start:
        empty = int(rng.integers(2, 5))
        bare, _ = compose_scene(None, background, distractors, scale, np.random.default_rng(scene_seed), int(size * 1.25), hand)
        # The same seed replays the same camera path, so the cut is seamless apart from the product.
        frames[:empty] = camera_motion_clip(bare, np.random.default_rng(camera_seed), num_frames=num_frames, out_size=(size, size))[:empty]
    return frames, SceneSpec(scale, frac, hand and product is not None, len(distractors), empty)


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.livescene --help`: what this module gives and who uses it."""
    from tools.helpfmt import library_help

    usage = """\
a library, nothing to run: compose_scene(product, background, distractors, scale, rng) composes
one still scene, livestream_clip(product, background, distractors, scale, rng, num_frames) films it
hand-held and returns the frames and what they show (SceneSpec). `python -m tools.grocery_clips
--mode live` writes such clips from photos; `rice livebench` measures the service on them."""
    return library_help("python -m tools.livescene", __doc__, usage, argv)


if __name__ == "__main__":
    raise SystemExit(main())
