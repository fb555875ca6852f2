"""Tests for synthetic clips, video encoding and the generated demo catalog."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.clipsynth import camera_motion_clip, encode_video, write_video
from tools.democatalog import (
    DemoProduct,
    make_products,
    render_clip,
    write_demo_catalog,
)


def _decode(data: bytes) -> list[np.ndarray]:
    # cv2 does not keep the stream object alive: hold a reference until
    # release(), or reads segfault once the BytesIO is garbage-collected.
    stream = io.BytesIO(data)
    # BytesIO satisfies the IStreamReader protocol at runtime; the stubs disagree.
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]
    assert cap.isOpened()
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _photo(seed: int = 0, h: int = 180, w: int = 240) -> np.ndarray:
    """A textured test photo, so camera motion produces visible changes."""
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (h // 10, w // 10, 3), dtype=np.uint8), (w, h))
    cv2.putText(img, "TEST", (40, 110), cv2.FONT_HERSHEY_SIMPLEX, 2.0, (255, 255, 255), 4)
    return img


def test_encode_video_roundtrip_frame_count_and_size() -> None:
    frames = camera_motion_clip(_photo(), np.random.default_rng(1), num_frames=12, out_size=(160, 120))
    data = encode_video(frames, fps=15.0)
    decoded = _decode(data)
    assert len(decoded) == 12
    assert all(f.shape == (120, 160, 3) for f in decoded)
    # Lossy, but still the same picture.
    assert np.abs(decoded[5].astype(int) - frames[5].astype(int)).mean() < 20


def test_encode_video_mjpg_avi() -> None:
    frames = [np.full((64, 96, 3), 40 * i, np.uint8) for i in range(5)]
    decoded = _decode(encode_video(frames, fourcc="MJPG", suffix=".avi"))
    assert len(decoded) == 5
    assert decoded[0].shape == (64, 96, 3)


def test_encode_video_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_video([])
    with pytest.raises(ValueError):
        encode_video([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 48, 3), np.uint8)])


def test_write_video_picks_codec_from_suffix(tmp_path: Path) -> None:
    frames = [np.full((48, 64, 3), 30 * i, np.uint8) for i in range(4)]
    for name in ("a.mp4", "b.avi"):
        write_video(frames, tmp_path / name)
        assert len(_decode((tmp_path / name).read_bytes())) == 4
    with pytest.raises(ValueError):
        write_video(frames, tmp_path / "c.xyz")


def test_camera_motion_clip_size_and_motion() -> None:
    img = _photo()
    frames = camera_motion_clip(img, np.random.default_rng(3), num_frames=16, out_size=(224, 200))
    assert len(frames) == 16
    assert all(f.shape == (200, 224, 3) and f.dtype == np.uint8 for f in frames)
    diffs = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in itertools.pairwise(frames)]
    assert max(diffs) > 1.0  # the camera actually moves
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 3.0


def test_camera_motion_clip_deterministic() -> None:
    img = _photo()
    a = camera_motion_clip(img, np.random.default_rng(7), num_frames=4)
    b = camera_motion_clip(img, np.random.default_rng(7), num_frames=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_make_products_deterministic_and_distinct() -> None:
    a = make_products(12, seed=3)
    b = make_products(12, seed=3)
    assert [p.sku for p in a] == [f"SKU-{i:04d}" for i in range(1, 13)]
    assert [p.shop_id for p in a[:3]] == ["shop-1", "shop-2", "shop-1"]
    assert all(np.array_equal(p.image, q.image) and p.name == q.name for p, q in zip(a, b, strict=True))
    assert len({p.name for p in a}) == 12
    for p, q in itertools.combinations(a, 2):
        diff = np.abs(p.image.astype(int) - q.image.astype(int)).mean()
        assert diff > 15, (p.sku, q.sku, diff)
    other = make_products(12, seed=4)
    assert not np.array_equal(a[0].image, other[0].image)


def test_render_clip_frames() -> None:
    product = make_products(3, seed=0)[1]
    frames = render_clip(product, np.random.default_rng(0), num_frames=10, size=(320, 240))
    assert len(frames) == 10
    assert all(f.shape == (240, 320, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[0], frames[-1])


def test_render_clip_product_clearly_visible() -> None:
    # A flat magenta package makes the product easy to find in the frame.
    image = np.full((320, 240, 3), 246, np.uint8)
    image[20:300, 24:216] = (255, 0, 255)
    product = DemoProduct(sku="SKU-9999", name="Test", shop_id="shop-1", image=image)
    for seed in range(3):
        frames = render_clip(product, np.random.default_rng(seed), num_frames=8)
        for frame in frames:
            mask = (np.abs(frame.astype(int) - (255, 0, 255)).max(axis=2) < 50).astype(np.uint8)
            _, _, stats, _ = cv2.connectedComponentsWithStats(mask)
            biggest = stats[1:][np.argmax(stats[1:, cv2.CC_STAT_AREA])]
            height_frac = biggest[cv2.CC_STAT_HEIGHT] / frame.shape[0]
            assert 0.3 < height_frac < 0.85, height_frac


def test_write_demo_catalog_files_and_clips_decode(tmp_path: Path) -> None:
    manifest = write_demo_catalog(tmp_path, n_products=4, clips_per_product=2, seed=1)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert len(manifest["products"]) == 4
    assert len(manifest["clips"]) == 8
    skus = {p["sku"] for p in manifest["products"]}
    for p in manifest["products"]:
        img = cv2.imread(str(tmp_path / p["image"]))
        assert img is not None and img.ndim == 3
    for c in manifest["clips"]:
        assert c["sku"] in skus
        frames = _decode((tmp_path / c["path"]).read_bytes())
        assert len(frames) == 24
        assert frames[0].shape == (240, 320, 3)
