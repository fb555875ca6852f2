"""Which files are media: one list for training readers, ingest, the CLI and the client.

Constants only (no torch, no OpenCV), so the light Python client can import it.
"""

from __future__ import annotations

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"})
