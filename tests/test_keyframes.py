"""Keyframe sampling: only I-frames are decoded, spread over the clip; same limits and errors as uniform."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.errors import InvalidMedia, UnsupportedMedia
from model.config import PreprocessConfig
from model.preprocess import sample_indices
from pipeline.decode import DecodeLimits, decode_clip
from pipeline.keyframes import decode_keyframes
from tests.conftest import jpeg
from tests.test_decode import _frame_ids, _numbered_clip
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct

PRE = PreprocessConfig()
GOP = 12  # OpenCV's mp4v writer puts a keyframe every 12 frames


def _moving_clip(n: int) -> bytes:
    """A textured scene panning: the encoder makes every 12th frame a keyframe (flat frames would all be)."""
    base = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return encode_video([np.roll(base, 3 * i, axis=1) for i in range(n)], fps=10.0)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # OpenCV and PyAV bundle their own FFmpeg builds: the same frame may differ by an IDCT rounding
    return bool(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() < 1.0)


def test_only_keyframes_spread_over_the_clip() -> None:
    data = _moving_clip(60)
    every = decode_clip(data, 60, PRE, DecodeLimits()).frames  # all 60 frames, the reference
    keys = list(range(0, 60, GOP))  # 0, 12, 24, 36, 48
    clip = decode_keyframes(data, 3, PRE, DecodeLimits())
    assert clip.frames.shape == (3, 224, 224, 3) and clip.total_frames == 60
    want = [keys[i] for i in sample_indices(len(keys), 3)]  # 0, 24, 48
    assert all(_close(f, every[i]) for f, i in zip(clip.frames, want, strict=True))
    assert not _close(clip.frames[1], every[30])  # not the uniform choice
    all_keys = decode_keyframes(data, 10, PRE, DecodeLimits())  # fewer keyframes than asked: all of them
    assert len(all_keys.frames) == len(keys)
    assert all(_close(f, every[i]) for f, i in zip(all_keys.frames, keys, strict=True))


def test_clip_of_only_keyframes_samples_like_uniform() -> None:
    data = _numbered_clip(60)  # flat frames: the encoder makes every frame a keyframe
    clip = decode_keyframes(data, 10, PRE, DecodeLimits())
    expected = sample_indices(60, 10)
    assert all(abs(a - b) <= 1 for a, b in zip(_frame_ids(clip.frames), expected, strict=True))


def test_limits_and_bad_input_as_uniform() -> None:
    data = _numbered_clip(30, fps=10.0)
    with pytest.raises(InvalidMedia, match="pixels"):
        decode_keyframes(data, 10, PRE, DecodeLimits(max_frame_pixels=50 * 50))
    with pytest.raises(InvalidMedia, match="frames"):
        decode_keyframes(data, 10, PRE, DecodeLimits(max_decoded_frames=20))
    with pytest.raises(InvalidMedia, match="lasts"):
        decode_keyframes(data, 10, PRE, DecodeLimits(max_duration_s=2.0))
    with pytest.raises(InvalidMedia):
        decode_keyframes(b"", 10, PRE, DecodeLimits())
    with pytest.raises(UnsupportedMedia):
        decode_keyframes(b"\x00" * 1000, 10, PRE, DecodeLimits())
    with pytest.raises(UnsupportedMedia, match="still image"):
        decode_keyframes(jpeg(np.zeros((32, 32, 3), np.uint8)), 10, PRE, DecodeLimits())
    with pytest.raises(InvalidMedia):  # a header without its data
        decode_keyframes(data[:200], 10, PRE, DecodeLimits())
    for decode in (decode_clip, decode_keyframes):  # MP4 keeps its index at the end: a lost tail is a 4xx for both
        with pytest.raises(InvalidMedia):
            decode(data[: len(data) * 2 // 3], 10, PRE, DecodeLimits())


def test_recognize_with_keyframes_over_http(client: TestClient, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    for p in products[:4]:
        assert client.post("/v1/gallery/items", files={"image": ("p.jpg", jpeg(p.image))}, data={"sku": p.sku}).status_code == 201
    clip = clip_of(products[2], seed=1, frames=40)  # keyframes at 0, 12, 24, 36
    r = client.post("/v1/recognize", params={"sampling": "keyframes"}, files={"file": ("c.mp4", clip)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["frames_used"] == 4 and body["results"][0]["sku"] == products[2].sku
    r = client.post("/v1/recognize", params={"sampling": "every-other"}, files={"file": ("c.mp4", clip)})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_bad_clips_get_the_same_error_class_as_uniform(products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    """The clip part of the HTTP bad-input corpus, straight through both decoders: same 4xx class."""
    from tests.conftest import wav_bytes

    good = clip_of(products[0], seed=3, frames=12)
    rng = np.random.default_rng(7)
    damaged = bytearray(good)
    moov = damaged.find(b"moov")
    damaged[moov - 4 : moov + 400] = rng.bytes(404)
    flat = [np.full((32, 32, 3), 30 * i % 255, np.uint8) for i in range(60)]
    limits = DecodeLimits(max_frame_pixels=320 * 240, max_decoded_frames=50, max_duration_s=20.0)
    corpus = {
        "random": rng.bytes(30_000),
        "text": b"this is not a video\n" * 50,
        "truncated mp4": good[: len(good) // 2],
        "mp4 header only": good[:64],
        "ftyp then garbage": good[:32] + rng.bytes(20_000),
        "corrupt index": bytes(damaged),
        "matroska magic then garbage": b"\x1a\x45\xdf\xa3" + rng.bytes(5000),
        "avi header then garbage": b"RIFF\x00\x10\x00\x00AVI LIST" + rng.bytes(5000),
        "wav": wav_bytes(),
        "1x1 avi": encode_video([np.zeros((1, 1, 3), np.uint8)] * 4, fourcc="MJPG", suffix=".avi"),
        "huge frame": encode_video([np.zeros((480, 640, 3), np.uint8)] * 2),
        "too many frames": encode_video(flat),
        "too long": encode_video(flat[:12], fps=0.5),
    }
    for name, data in corpus.items():
        errors = []
        for decode in (decode_clip, decode_keyframes):
            with pytest.raises((InvalidMedia, UnsupportedMedia)) as info:
                decode(data, 10, PRE, limits)
            errors.append(type(info.value))
        assert errors[0] == errors[1], (name, errors)
