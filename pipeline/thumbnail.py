"""Catalog thumbnails: the small JPEG a console shows beside each gallery item and each match."""

from __future__ import annotations

import cv2
import numpy as np

THUMBNAIL_SIZE = 128  # pixels, longer side: a few kB per item, sharp enough for a result list
THUMBNAIL_QUALITY = 80


def thumbnail_jpeg(frame_rgb: np.ndarray, size: int = THUMBNAIL_SIZE, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """An RGB uint8 frame [H, W, 3] -> JPEG bytes with its longer side at most `size` pixels."""
    h, w = frame_rgb.shape[:2]
    scale = min(1.0, size / max(h, w))
    small = (
        frame_rgb
        if scale == 1.0
        else cv2.resize(frame_rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    )
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # cannot happen for a uint8 3-channel frame; a bug if it does
        raise RuntimeError("JPEG encoding of a thumbnail failed")
    return buf.tobytes()
