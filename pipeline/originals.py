"""The original image an item keeps for later re-embedding: re-encoded as JPEG, long side bounded.

Only called on an upload that the isolated decode workers have already decoded and embedded, so
its size and format are known good; re-encoding also drops whatever else the client's file held
(metadata, trailing bytes)."""

from __future__ import annotations

import cv2
import numpy as np

ORIGINAL_LONG_SIDE = 1024  # pixels: enough for any encoder input and for region crops
ORIGINAL_QUALITY = 92


def original_jpeg(data: bytes, long_side: int = ORIGINAL_LONG_SIDE, quality: int = ORIGINAL_QUALITY) -> bytes | None:
    """Image file bytes -> JPEG bytes with the long side at most `long_side`; None if OpenCV cannot read it."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # [H, W, 3] BGR
    if image is None or image.size == 0:
        return None
    h, w = image.shape[:2]
    scale = min(1.0, long_side / max(h, w))
    if scale < 1.0:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes() if ok else None
