"""Gallery-side views: a catalog image embedded as it will be seen in a stream, not only as a packshot.

A catalog image shows the product filling a clean (usually white) frame; in a livestream it fills a third to a half of
a cluttered frame. The encoder's embedding of a small product over clutter is far from that of its
packshot, so each catalog image can also be embedded as a few views (the product shrunk into a
blurred, washed-out copy of its own surround at the scales streams show it, and a tighter crop for
a product held close or half hidden) stored as extra vectors of the same item. Search already takes
the best image per SKU, so a view that matches a small product lifts its SKU; the cost is one vector
(D floats) per view in the index. The views are stored as records `<item_id>#v<n>` (`#` is not
allowed in client ids), written, replaced and deleted with their item, and never listed or exported
as items (`index.views`).
"""

from __future__ import annotations

import cv2
import numpy as np

from index.views import MAX_VIEWS

# (kind, factor): shrink = the product at factor x the frame side over its blurred surround;
# crop = the central factor x factor of the frame, scaled back up. Order = what RICE_CATALOG_VIEWS=n takes.
LADDER: tuple[tuple[str, float], ...] = (("shrink", 0.55), ("shrink", 0.35), ("crop", 0.7), ("shrink", 0.75))


def catalog_views(frame: np.ndarray, n: int) -> np.ndarray:
    """The encoder's letterboxed catalog frame [H, W, 3] uint8 -> its first n views [n, H, W, 3] uint8."""
    if not 0 <= n <= MAX_VIEWS:
        raise ValueError(f"catalog views must be 0..{MAX_VIEWS}, got {n}")
    h, w = frame.shape[:2]
    # the surround: the image itself, heavily blurred and pulled halfway to grey (shelf-like, no product edges)
    surround = cv2.GaussianBlur(frame, (0, 0), sigmaX=max(h, w) / 12)
    surround = ((surround.astype(np.float32) + 128.0) / 2).astype(np.uint8)
    # packshots sit on white (or the letterbox's padding): that backdrop is not part of the product, so
    # a shrunk view shows the product cut out over the surround (feathered), not a white card
    backdrop = (frame.min(axis=2) > 225) | (frame.max(axis=2) < 8)
    alpha = cv2.GaussianBlur((~backdrop).astype(np.float32), (0, 0), sigmaX=1.5)
    out = np.empty((n, h, w, 3), np.uint8)
    for k, (kind, f) in enumerate(LADDER[:n]):
        if kind == "shrink":
            sh, sw = max(1, round(h * f)), max(1, round(w * f))
            small = cv2.resize(frame, (sw, sh), interpolation=cv2.INTER_AREA)
            view = surround.copy()
            y, x = (h - sh) // 2, (w - sw) // 2
            a = cv2.resize(alpha, (sw, sh), interpolation=cv2.INTER_AREA)[..., None]
            view[y : y + sh, x : x + sw] = (a * small + (1 - a) * view[y : y + sh, x : x + sw]).astype(np.uint8)
        else:
            ch, cw = max(1, round(h * f)), max(1, round(w * f))
            y, x = (h - ch) // 2, (w - cw) // 2
            view = cv2.resize(frame[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_LINEAR)
        out[k] = view
    return out
