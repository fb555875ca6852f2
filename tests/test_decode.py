"""Video decoding from memory: uniform sampling, short clips, limits."""

from __future__ import annotations

import numpy as np
import pytest

from model.config import PreprocessConfig
from model.preprocess import sample_indices
from pipeline.decode import DecodeLimits, decode_clip, decode_image
from service.errors import InvalidMedia, UnsupportedMedia
from tools.clipsynth import encode_video

PRE = PreprocessConfig()


def _numbered_clip(n: int, w: int = 96, h: int = 64, fps: float = 10.0) -> bytes:
    """Frame i is a flat grey of level 4*i, so the decoded level tells which frame was kept."""
    return encode_video([np.full((h, w, 3), 4 * i, np.uint8) for i in range(n)], fps=fps)


def _frame_ids(frames: np.ndarray) -> list[int]:
    return [round(float(f.mean()) / 4) for f in frames]


def test_sample_indices_are_uniform_and_include_ends() -> None:
    assert sample_indices(100, 10) == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert sample_indices(5, 10) == [0, 1, 2, 3, 4]
    assert sample_indices(10, 10) == list(range(10))
    assert sample_indices(0, 10) == []


def test_decode_samples_the_right_frames() -> None:
    clip = decode_clip(_numbered_clip(50), 10, PRE, DecodeLimits())
    assert clip.frames.shape == (10, 224, 224, 3) and clip.frames.dtype == np.uint8
    assert clip.total_frames == 50 and clip.width == 96 and clip.height == 64
    ids = _frame_ids(clip.frames)
    expected = sample_indices(50, 10)
    assert all(abs(a - b) <= 1 for a, b in zip(ids, expected, strict=True)), (ids, expected)


def test_short_clip_uses_every_frame() -> None:
    # grey levels 40 apart: mp4v lags a few levels on flat frames, so 4 apart would blur the ids
    data = encode_video([np.full((64, 96, 3), 40 * i, np.uint8) for i in range(4)], fps=10.0)
    clip = decode_clip(data, 10, PRE, DecodeLimits())
    assert [round(float(f.mean()) / 40) for f in clip.frames] == [0, 1, 2, 3]


def test_limits_raise_clear_errors() -> None:
    data = _numbered_clip(30, fps=10.0)
    with pytest.raises(InvalidMedia, match="pixels"):
        decode_clip(data, 10, PRE, DecodeLimits(max_frame_pixels=50 * 50))
    with pytest.raises(InvalidMedia, match="frames"):
        decode_clip(data, 10, PRE, DecodeLimits(max_decoded_frames=20))
    with pytest.raises(InvalidMedia, match="lasts"):
        decode_clip(data, 10, PRE, DecodeLimits(max_duration_s=2.0))
    with pytest.raises(InvalidMedia, match="longer than"):
        decode_clip(data, 10, PRE, DecodeLimits(timeout_s=1e-9))


def test_non_videos_are_rejected() -> None:
    with pytest.raises(InvalidMedia):
        decode_clip(b"", 10, PRE, DecodeLimits())
    with pytest.raises(UnsupportedMedia):
        decode_clip(b"\x00" * 1000, 10, PRE, DecodeLimits())


def test_decode_image_crop_and_letterbox() -> None:
    import cv2

    tall = np.zeros((200, 100, 3), np.uint8)
    tall[:20] = 255  # a white band at the top that a centre crop would cut away
    data = cv2.imencode(".png", tall)[1].tobytes()
    cropped = decode_image(data, PRE, 10**8)
    whole = decode_image(data, PRE, 10**8, whole=True)
    assert cropped.shape == whole.shape == (224, 224, 3)
    assert cropped[:5].max() == 0  # the band was cropped away
    assert whole[:, 56:168].max() == 255  # letterboxing keeps it
    with pytest.raises(InvalidMedia, match="pixels"):
        decode_image(data, PRE, 100)
    with pytest.raises(UnsupportedMedia):
        decode_image(b"not an image", PRE, 10**8)
