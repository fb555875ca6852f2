"""A generated demo catalog: synthetic products and livestream-like clips of them.

Nothing is downloaded.  Each product is a packaging mock-up with its own
dominant hue, pattern family, label panel and printed brand, so an ImageNet
CNN can tell them apart; ``render_clip`` then shows a product being held up
in front of a cluttered room, the way a seller does on a livestream.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tools.clipsynth import write_video

__all__ = ["DemoProduct", "make_products", "render_clip", "render_room_clip", "write_demo_catalog"]

_IMG_H, _IMG_W = 320, 240  # portrait catalog photo
_BOX = (24, 20, 216, 300)  # x0, y0, x1, y1 of the package inside the photo
_KINDS = (
    "Cola", "Chips", "Shampoo", "Coffee", "Soap", "Tea",
    "Cereal", "Juice", "Cookies", "Lotion", "Noodles", "Candy",
)  # fmt: skip
# (saturation, value) pairs cycled across products so neighbouring hues also
# differ in how vivid/dark they are.
_SV = ((235, 225), (160, 250), (255, 150), (200, 195))

Color = tuple[int, int, int]


@dataclass(frozen=True)
class DemoProduct:
    """One catalog entry: identifiers plus its BGR uint8 catalog image."""

    sku: str
    name: str
    shop_id: str
    image: np.ndarray


def _hsv_to_bgr(h: float, s: float, v: float) -> Color:
    px = np.array([[[h % 180, s, v]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(px, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


# Each pattern returns a boolean "accent" mask over the package (h x w grid).
_Pattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _stripes(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    th = np.radians(rng.uniform(0, 180))
    period = rng.uniform(18, 34)
    return np.asarray(((xx * np.cos(th) + yy * np.sin(th)) // (period / 2)) % 2 == 0)


def _dots(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    step = rng.uniform(22, 34)
    r = step * rng.uniform(0.22, 0.34)
    dy, dx = (yy % step) - step / 2, (xx % step) - step / 2
    return dy * dy + dx * dx < r * r


def _checker(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    step = rng.uniform(20, 36)
    return np.asarray(((yy // step) + (xx // step)) % 2 == 0)


def _rings(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = yy.shape
    d = np.hypot(yy - h * rng.uniform(0.3, 0.7), xx - w * rng.uniform(0.3, 0.7))
    return np.asarray((d // rng.uniform(10, 18)) % 2 == 0)


def _bands(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # A few wide diagonal bands, unlike the fine regular stripes.
    u = xx + yy * rng.choice([-1.0, 1.0])
    return np.asarray(np.sin(u / rng.uniform(20, 30)) > 0.35)


def _waves(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amp, wl, period = rng.uniform(6, 12), rng.uniform(30, 60), rng.uniform(22, 32)
    return np.asarray(((yy + amp * np.sin(xx * 2 * np.pi / wl)) // (period / 2)) % 2 == 0)


def _plaid(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    step = rng.uniform(28, 44)
    return ((yy % step) < step * 0.3) | ((xx % step) < step * 0.3)


def _chevrons(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = yy.shape[1]
    period = rng.uniform(24, 36)
    return np.asarray(((yy + np.abs(xx - w / 2) * 0.8) // (period / 2)) % 2 == 0)


def _shape_mask(shape: tuple[int, int], pts: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [pts.astype(np.int32)], 255)
    return m > 0


def _big_circle(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = yy.shape
    return np.asarray(np.hypot(yy - h * 0.3, xx - w * 0.5) < w * rng.uniform(0.32, 0.42))


def _big_triangle(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = yy.shape
    s = rng.uniform(0.38, 0.46)
    pts = np.array([[w / 2, h * 0.05], [w * (0.5 - s), h * 0.55], [w * (0.5 + s), h * 0.55]])
    return _shape_mask(yy.shape, pts)


def _big_star(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = yy.shape
    ang = np.arange(10) * np.pi / 5 - np.pi / 2 + rng.uniform(-0.2, 0.2)
    rad = np.where(np.arange(10) % 2 == 0, w * 0.44, w * 0.18)
    pts = np.stack([w / 2 + rad * np.cos(ang), h * 0.3 + rad * np.sin(ang)], axis=1)
    return _shape_mask(yy.shape, pts)


def _big_diamond(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = yy.shape
    r = w * rng.uniform(0.36, 0.46)
    return np.asarray(np.abs(xx - w / 2) + np.abs(yy - h * 0.3) < r)


_PATTERNS: tuple[_Pattern, ...] = (
    _stripes, _dots, _checker, _rings, _bands, _waves,
    _big_circle, _big_triangle, _big_star, _plaid, _chevrons, _big_diamond,
)  # fmt: skip


def _draw_product(
    idx: int,
    hue: float,
    sv: tuple[int, int],
    pattern: _Pattern,
    rng: np.random.Generator,
) -> np.ndarray:
    x0, y0, x1, y1 = _BOX
    bh, bw = y1 - y0, x1 - x0
    sat, val = sv
    base = _hsv_to_bgr(hue, sat, val)
    # Accent: same hue family, so the product's dominant colour stays its own.
    accent = _hsv_to_bgr(hue + rng.uniform(-12, 12), sat * 0.45, min(255, val * 0.55 + 110))
    yy, xx = np.mgrid[0:bh, 0:bw].astype(np.float32)
    box = np.where(pattern(yy, xx, rng)[..., None], accent, base).astype(np.uint8)

    # Label panel in a contrasting hue carries the brand name.
    label = _hsv_to_bgr(hue + 90 + rng.uniform(-20, 20), rng.uniform(120, 230), 240)
    ly0 = int(bh * rng.uniform(0.56, 0.62))
    ly1 = ly0 + int(bh * 0.3)
    cv2.rectangle(box, (10, ly0), (bw - 11, ly1), label, -1)
    cv2.rectangle(box, (10, ly0), (bw - 11, ly1), (30, 30, 30), 2)
    ink = (20, 20, 20) if sum(label) > 380 else (245, 245, 245)
    kind = _KINDS[idx % len(_KINDS)].upper()
    font = cv2.FONT_HERSHEY_DUPLEX
    scale = min(1.6, (bw - 36) / cv2.getTextSize(kind, font, 1.0, 3)[0][0])
    (tw, th), _ = cv2.getTextSize(kind, font, scale, 3)
    cv2.putText(box, kind, ((bw - tw) // 2, ly0 + th + 12), font, scale, ink, 3, cv2.LINE_AA)
    brand = f"BRAND {idx + 1}"
    (tw2, _), _ = cv2.getTextSize(brand, cv2.FONT_HERSHEY_SIMPLEX, 0.75, 2)
    cv2.putText(
        box,
        brand,
        ((bw - tw2) // 2, ly1 - 10),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.75,
        ink,
        2,
        cv2.LINE_AA,
    )
    cv2.rectangle(box, (0, 0), (bw - 1, bh - 1), (25, 25, 25), 3)

    img = np.full((_IMG_H, _IMG_W, 3), 246, np.uint8)
    img[y0:y1, x0:x1] = box
    return img


def make_products(n: int, seed: int = 0, shops: int = 2) -> list[DemoProduct]:
    """Generate ``n`` visually distinct demo products, deterministically for ``seed``.

    Hues are evenly spaced around the colour wheel (in shuffled order, so hue
    and pattern are not correlated), saturation/value cycle through a few
    levels, and each product gets a pattern family of its own (until the
    families run out).  SKUs are "SKU-0001", ...; shops "shop-1", ... are
    assigned round-robin.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if shops < 1:
        raise ValueError("shops must be >= 1")
    rng = np.random.default_rng(seed)
    hue_offset = rng.uniform(0, 180)
    hue_order = rng.permutation(n)
    pattern_order = rng.permutation(len(_PATTERNS))
    products: list[DemoProduct] = []
    for i in range(n):
        hue = hue_offset + 180.0 * hue_order[i] / max(n, 1)
        pattern = _PATTERNS[pattern_order[i % len(_PATTERNS)]]
        img = _draw_product(i, hue, _SV[i % len(_SV)], pattern, rng)
        img.setflags(write=False)  # shared by clips; the dataclass is frozen too
        products.append(
            DemoProduct(
                sku=f"SKU-{i + 1:04d}",
                name=f"Brand {i + 1} {_KINDS[i % len(_KINDS)]}",
                shop_id=f"shop-{i % shops + 1}",
                image=img,
            )
        )
    return products


def _package_crop(image: np.ndarray) -> np.ndarray:
    """Crop the packaging out of a catalog photo by dropping its plain backdrop."""
    corner = np.median(
        np.stack([image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]]).astype(np.int16),
        axis=0,
    )
    diff = np.abs(image.astype(np.int16) - corner).max(axis=2) > 30
    ys, xs = np.nonzero(diff)
    if ys.size == 0:
        return image
    return image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _background(rng: np.random.Generator, w: int, h: int, distractors: int) -> np.ndarray:
    """A room/shelf-like cluttered backdrop of size (h, w)."""
    wall = np.array(_hsv_to_bgr(rng.uniform(0, 180), rng.uniform(20, 90), rng.uniform(120, 210)))
    ramp = np.linspace(rng.uniform(0.75, 0.95), rng.uniform(1.0, 1.15), w, dtype=np.float32)
    bg = np.clip(wall[None, None, :] * ramp[None, :, None], 0, 255).repeat(h, 0)
    # Low-frequency texture so the wall is not a flat colour.
    coarse = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
    tex = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    bg = np.clip(bg + tex * rng.uniform(6, 14), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(6, 12))):  # furniture, posters, boxes
        c = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(30, 200), rng.uniform(50, 220))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.6:
            pw, ph = (
                int(rng.integers(w // 12, w // 3)),
                int(rng.integers(h // 12, h // 3)),
            )
            cv2.rectangle(bg, (x, y), (x + pw, y + ph), c, -1)
        else:
            cv2.circle(bg, (x, y), int(rng.integers(h // 20, h // 6)), c, -1, cv2.LINE_AA)
    wood = _hsv_to_bgr(rng.uniform(8, 20), rng.uniform(100, 170), rng.uniform(70, 150))
    for sy in np.sort(rng.uniform(0.25, 0.95, int(rng.integers(1, 3)))):  # shelves
        y = int(sy * h)
        cv2.rectangle(bg, (0, y), (w, y + max(4, h // 40)), wood, -1)
        for _ in range(max(0, distractors)):  # small items standing on the shelf
            iw, ih = (
                int(rng.integers(w // 30, w // 14)),
                int(rng.integers(h // 14, h // 7)),
            )
            x = int(rng.integers(0, max(1, w - iw)))
            c = _hsv_to_bgr(rng.uniform(0, 180), rng.uniform(80, 255), rng.uniform(80, 240))
            cv2.rectangle(bg, (x, y - ih), (x + iw, y), c, -1)
            cv2.rectangle(bg, (x, y - ih * 2 // 3), (x + iw, y - ih // 3), (235, 235, 235), -1)
            cv2.rectangle(bg, (x, y - ih), (x + iw, y), (40, 40, 40), 1)
    return bg


def _hand_sprite(pkg: np.ndarray, rng: np.random.Generator, occlusion: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Pad the package into a sprite, optionally with a hand gripping a corner.

    Returns the BGR sprite, its uint8 alpha and the padding in pixels.
    """
    ph, pw = pkg.shape[:2]
    pad = int(0.45 * max(ph, pw))
    # Extra room below so the forearm can run off-screen instead of ending in a stub.
    sh, sw = ph + pad + max(pad, int(ph * 1.1)), pw + 2 * pad
    sprite = np.zeros((sh, sw, 3), np.uint8)
    alpha = np.zeros((sh, sw), np.uint8)
    sprite[pad : pad + ph, pad : pad + pw] = pkg
    alpha[pad : pad + ph, pad : pad + pw] = 255
    if not occlusion:
        return sprite, alpha, pad

    skin = _hsv_to_bgr(rng.uniform(5, 18), rng.uniform(70, 150), rng.uniform(120, 235))
    shade = tuple(int(c * 0.75) for c in skin)
    hand = np.zeros((sh, sw), np.uint8)
    # Hand on a bottom corner, fingers reaching up/in over the package edge.
    right = bool(rng.random() < 0.5)
    sx = -1 if right else 1  # direction from corner towards package centre
    cx = pad + (pw if right else 0)
    cy = pad + ph
    unit = pw * rng.uniform(0.2, 0.26)
    palm = (int(cx - sx * unit * 0.3), int(cy + unit * 0.9))
    axes = (int(unit * 1.1), int(unit * 1.4))
    cv2.ellipse(hand, palm, axes, float(rng.uniform(-25, 25)), 0, 360, 255, -1, cv2.LINE_AA)
    # Forearm continues off the sprite, so the hand never floats.
    fore = (palm[0] - sx * int(unit * 2.5), sh)
    cv2.line(hand, palm, fore, 255, int(unit * 1.5), cv2.LINE_AA)
    n_fingers = int(rng.integers(3, 5))
    tips = []
    for f in range(n_fingers):
        ang = np.radians(-90 + sx * (12 + f * 11) + rng.uniform(-4, 4))
        length = unit * rng.uniform(1.5, 1.9)
        base = (palm[0] + int(sx * f * unit * 0.25), palm[1] - int(unit * 0.6))
        tip = (int(base[0] + length * np.cos(ang)), int(base[1] + length * np.sin(ang)))
        cv2.line(hand, base, tip, 255, max(3, int(unit * 0.5)), cv2.LINE_AA)
        tips.append((base, tip))
    thumb_tip = (int(palm[0] - sx * unit * 1.6), int(palm[1] - unit * 1.3))
    cv2.line(hand, palm, thumb_tip, 255, max(3, int(unit * 0.5)), cv2.LINE_AA)

    # Keep occlusion bounded (product must stay recognisable): an oversized hand
    # is dropped rather than drawn; with the sizes above it covers ~4-11%.
    on_pkg = hand[pad : pad + ph, pad : pad + pw] > 127
    if on_pkg.mean() > 0.2:
        return sprite, alpha, pad

    hand_f = (hand.astype(np.float32) / 255.0)[..., None]
    skin_img = np.empty_like(sprite)
    skin_img[:] = skin
    for base, tip in tips:  # finger separations
        cv2.line(skin_img, base, tip, shade, 1, cv2.LINE_AA)
    sprite = (sprite * (1 - hand_f) + skin_img * hand_f).astype(np.uint8)
    alpha = np.maximum(alpha, hand)
    return sprite, alpha, pad


def render_clip(
    product: DemoProduct,
    rng: np.random.Generator,
    num_frames: int = 24,
    size: tuple[int, int] = (320, 240),
    occlusion: bool = True,
    distractors: int = 3,
    scale: tuple[float, float] = (0.4, 0.65),
) -> list[np.ndarray]:
    """Render a livestream-like clip of a seller holding up ``product``.

    The package moves, scales (about 35-70% of the frame height) and turns
    smoothly in front of a slowly panning cluttered room with ``distractors``
    small items per shelf; with ``occlusion`` a hand grips one corner,
    covering at most ~20% of the package.

    Args:
        product: the product to show.
        rng: random generator; the clip is fully determined by its state.
        num_frames: number of frames (>= 1).
        size: frame (width, height).
        occlusion: draw a hand partly covering the product.
        distractors: small objects per shelf in the background.
        scale: range of the package's height as a share of the frame height
            (a seller holding the product up to the camera: about 0.8).

    Returns:
        ``num_frames`` BGR uint8 frames of shape (height, width, 3).
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    w, h = int(size[0]), int(size[1])
    if w < 8 or h < 8:
        raise ValueError(f"size too small: {size}")

    margin_x, margin_y = int(w * 0.15), int(h * 0.15)
    bg = _background(rng, w + 2 * margin_x, h + 2 * margin_y, distractors)
    pan0 = rng.uniform(0, 1, 2) * (2 * margin_x, 2 * margin_y)
    pan1 = rng.uniform(0, 1, 2) * (2 * margin_x, 2 * margin_y)

    pkg = _package_crop(product.image)
    sprite, alpha, pad = _hand_sprite(pkg, rng, occlusion)
    rgba = np.dstack([sprite, alpha])
    ph, pw = pkg.shape[:2]
    src = np.array([[pad, pad], [pad + pw, pad], [pad + pw, pad + ph], [pad, pad + ph]], np.float32)

    # Smooth trajectory through 2-3 keyframes: centre, height, roll, yaw tilt.
    k = int(rng.integers(2, 4))
    keys = np.stack(
        [
            rng.uniform(0.35, 0.65, k) * w,
            rng.uniform(0.4, 0.6, k) * h,
            rng.uniform(scale[0], scale[1], k) * h,  # the roll below shrinks the bbox a bit
            rng.uniform(-18, 18, k),
            rng.uniform(-0.25, 0.25, k),
        ],
        axis=1,
    )
    t = np.linspace(0.0, 1.0, num_frames)
    pos = t * (k - 1)
    seg = np.minimum(pos.astype(int), k - 2)
    u = pos - seg
    u = (u * u * (3 - 2 * u))[:, None]
    track = keys[seg] * (1 - u) + keys[seg + 1] * u

    noise = rng.normal(0, rng.uniform(2.0, 5.0), (h + 16, w + 16, 3)).astype(np.float32)
    gain = rng.uniform(0.9, 1.1)
    frames: list[np.ndarray] = []
    for i in range(num_frames):
        cx, cy, ht, roll, yaw = track[i]
        wd = ht * pw / ph
        # Perspective from turning the box about its vertical axis: the near
        # edge grows, the far edge shrinks and the box gets narrower.
        hl, hr = ht * (1 + yaw * 0.5), ht * (1 - yaw * 0.5)
        wd *= 1 - abs(yaw) * 0.5
        quad = np.array([[-wd / 2, -hl / 2], [wd / 2, -hr / 2], [wd / 2, hr / 2], [-wd / 2, hl / 2]])
        a = np.radians(roll)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        quad = quad @ rot.T
        # Keep the package itself on screen (the hand may leave the frame).
        cx = float(np.clip(cx, -quad[:, 0].min(), w - quad[:, 0].max()))
        cy = float(np.clip(cy, -quad[:, 1].min(), h - quad[:, 1].max()))
        dst = (quad + np.array([cx, cy])).astype(np.float32)
        m = cv2.getPerspectiveTransform(src, dst)
        warped = cv2.warpPerspective(rgba, m, (w, h), flags=cv2.INTER_LINEAR)

        ox, oy = (pan0 + (pan1 - pan0) * t[i]).astype(int)
        frame = bg[oy : oy + h, ox : ox + w].astype(np.float32)
        al = warped[..., 3:4].astype(np.float32) * (1.0 / 255.0)
        frame = frame * (1 - al) + warped[..., :3].astype(np.float32) * al
        nx, ny = rng.integers(0, 16, 2)
        frame = frame * gain + noise[ny : ny + h, nx : nx + w]
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def render_room_clip(
    rng: np.random.Generator,
    num_frames: int = 24,
    size: tuple[int, int] = (320, 240),
    distractors: int = 3,
) -> list[np.ndarray]:
    """The same kind of cluttered room as ``render_clip``, slowly panning, with no product held
    up: what a livestream shows between products.

    Returns:
        ``num_frames`` BGR uint8 frames of shape (height, width, 3).
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    w, h = int(size[0]), int(size[1])
    margin_x, margin_y = int(w * 0.15), int(h * 0.15)
    bg = _background(rng, w + 2 * margin_x, h + 2 * margin_y, distractors)
    pan0 = rng.uniform(0, 1, 2) * (2 * margin_x, 2 * margin_y)
    pan1 = rng.uniform(0, 1, 2) * (2 * margin_x, 2 * margin_y)
    noise = rng.normal(0, rng.uniform(2.0, 5.0), (h + 16, w + 16, 3)).astype(np.float32)
    frames: list[np.ndarray] = []
    for t in np.linspace(0.0, 1.0, num_frames):
        ox, oy = (pan0 + (pan1 - pan0) * t).astype(int)
        nx, ny = rng.integers(0, 16, 2)
        frame = bg[oy : oy + h, ox : ox + w].astype(np.float32) + noise[ny : ny + h, nx : nx + w]
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def write_demo_catalog(
    out_dir: str | os.PathLike[str],
    n_products: int = 12,
    clips_per_product: int = 1,
    seed: int = 0,
    scale: tuple[float, float] = (0.6, 0.9),
) -> dict[str, Any]:
    """Write a demo catalog (images, clips, manifest) under ``out_dir``.

    Layout: ``catalog/<sku>.jpg``, ``clips/<sku>_<i>.mp4`` (i from 0) and
    ``manifest.json`` = {"products": [{"sku", "name", "shop_id", "image"}],
    "clips": [{"path", "sku", "shop_id"}]} with paths relative to ``out_dir``.

    ``scale`` is the package's height as a share of the frame: a seller holds the product up
    to the camera, so the demo defaults to close-ups.

    Returns:
        The manifest dictionary that was written.
    """
    root = Path(out_dir)
    (root / "catalog").mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    products = make_products(n_products, seed=seed)
    # Separate stream from the products, so adding clips never changes them.
    clip_rng = np.random.default_rng([seed, 1])
    manifest: dict[str, Any] = {"products": [], "clips": []}
    for p in products:
        rel_img = f"catalog/{p.sku}.jpg"
        if not cv2.imwrite(str(root / rel_img), p.image, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise RuntimeError(f"could not write {root / rel_img}")
        manifest["products"].append({"sku": p.sku, "name": p.name, "shop_id": p.shop_id, "image": rel_img})
        for i in range(clips_per_product):
            rel_clip = f"clips/{p.sku}_{i}.mp4"
            write_video(render_clip(p, clip_rng, scale=scale), root / rel_clip)
            manifest["clips"].append({"path": rel_clip, "sku": p.sku, "shop_id": p.shop_id})
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.democatalog --help`: what this module gives and who uses it."""
    from tools.helpfmt import library_help

    usage = """\
a library, nothing to run: make_products(n, seed) draws n products (SKU-0001...; the same n and
seed draw the same designs), write_demo_catalog(out_dir, n_products, clips_per_product, seed)
writes catalog/<sku>.jpg, clips/<sku>_<i>.mp4 and manifest.json, render_clip and render_room_clip
render a product held up to the camera and the room without one. `rice demo` writes and serves
such a catalog (12 products, seed 0); `python -m tools.longclip` films long recordings of them."""
    return library_help("python -m tools.democatalog", __doc__, usage, argv)


if __name__ == "__main__":
    raise SystemExit(main())
