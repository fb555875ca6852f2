"""Synthetic "handheld camera" clips from still photos, and video file I/O.

Catalog data usually has one clean photo per product, while queries come from
livestreams: shaky, zooming, blurry, re-compressed video.  ``camera_motion_clip``
bridges that gap for training and tests, and ``encode_video``/``write_video``
produce real encoded files so the decode path is exercised end to end.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

__all__ = ["camera_motion_clip", "encode_video", "write_video"]

# Only codecs that OpenCV's bundled FFmpeg can write without extra licences.
_FOURCC_BY_SUFFIX: dict[str, str] = {
    ".mp4": "mp4v",
    ".m4v": "mp4v",
    ".mov": "mp4v",
    ".avi": "MJPG",
}


def _smoothstep(t: np.ndarray) -> np.ndarray:
    # Zero velocity at keyframes, so the camera eases in/out instead of
    # changing direction with a visible kink.
    return np.asarray(t * t * (3.0 - 2.0 * t))


def _keyframe_track(rng: np.random.Generator, num_frames: int, values: np.ndarray) -> np.ndarray:
    """Interpolate keyframe ``values`` (K x D) smoothly over ``num_frames`` frames."""
    k = values.shape[0]
    if num_frames == 1:
        return values[:1].copy()
    # Random (but ordered) keyframe times make segments of unequal speed.
    inner = np.sort(rng.uniform(0.25, 0.75, size=k - 2)) if k > 2 else np.empty(0)
    times = np.concatenate([[0.0], inner, [1.0]])
    t = np.linspace(0.0, 1.0, num_frames)
    seg = np.clip(np.searchsorted(times, t, side="right") - 1, 0, k - 2)
    local = (t - times[seg]) / np.maximum(times[seg + 1] - times[seg], 1e-9)
    w = _smoothstep(np.clip(local, 0.0, 1.0))[:, None]
    return np.asarray(values[seg] * (1.0 - w) + values[seg + 1] * w)


def _motion_blur(frame: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    line = np.zeros((length, length), np.float32)
    line[length // 2, :] = 1.0
    rot = cv2.getRotationMatrix2D(((length - 1) / 2.0, (length - 1) / 2.0), angle_deg, 1.0)
    kernel = cv2.warpAffine(line, rot, (length, length))
    total = float(kernel.sum())
    if total <= 0.0:
        return frame
    kernel = np.asarray(kernel / total, dtype=np.float32)
    return cv2.filter2D(frame, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _jpeg_roundtrip(frame: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return frame
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return frame if decoded is None else decoded


def camera_motion_clip(
    image: np.ndarray,
    rng: np.random.Generator,
    num_frames: int = 16,
    out_size: tuple[int, int] = (224, 224),
) -> list[np.ndarray]:
    """Render a still BGR image as a short clip that looks filmed by a handheld phone.

    The camera follows a smooth trajectory through 2-3 random keyframes (pan,
    zoom of roughly 0.8x-1.25x, in-plane rotation of a few up to ~15 degrees)
    plus a little hand shake.  Frames also get occasional motion or defocus
    blur, brightness/contrast drift and JPEG re-compression at quality 40-90.

    Args:
        image: BGR uint8 array of shape (H, W, 3).
        rng: random generator; the clip is fully determined by its state.
        num_frames: number of frames to produce (>= 1).
        out_size: output (width, height) in pixels.

    Returns:
        ``num_frames`` BGR uint8 frames of shape (height, width, 3).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected BGR uint8 HxWx3 image, got {image.dtype} {image.shape}")
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    out_w, out_h = int(out_size[0]), int(out_size[1])
    if out_w < 1 or out_h < 1:
        raise ValueError(f"invalid out_size {out_size}")

    src_h, src_w = image.shape[:2]
    # Cover the output at zoom 1 so reflected borders only show when zoomed out.
    base_scale = max(out_w / src_w, out_h / src_h)

    k = int(rng.integers(2, 4))
    max_angle = float(rng.uniform(3.0, 15.0))
    keys = np.stack(
        [
            rng.uniform(-0.12, 0.12, k) * out_w,  # pan x (pixels)
            rng.uniform(-0.12, 0.12, k) * out_h,  # pan y (pixels)
            np.log(rng.uniform(0.8, 1.25, k)),  # zoom, interpolated in log space
            rng.uniform(-max_angle, max_angle, k),  # rotation (degrees)
        ],
        axis=1,
    )
    track = _keyframe_track(rng, num_frames, keys)

    # Hand shake: low-amplitude, low-frequency sinusoids rather than white
    # noise, which would look like a glitch rather than a person.
    t = np.arange(num_frames, dtype=np.float64)
    shake_amp = float(rng.uniform(0.0, 0.015)) * min(out_w, out_h)
    shake = np.stack(
        [
            shake_amp * np.sin(t * rng.uniform(0.3, 0.9) + rng.uniform(0, 2 * np.pi)),
            shake_amp * np.sin(t * rng.uniform(0.3, 0.9) + rng.uniform(0, 2 * np.pi)),
        ],
        axis=1,
    )

    # Exposure drifts slowly (auto-exposure), with a little per-frame flicker.
    light_keys = np.stack([rng.uniform(0.8, 1.2, k), rng.uniform(-25.0, 25.0, k)], axis=1)
    light = _keyframe_track(rng, num_frames, light_keys)

    p_motion_blur = float(rng.uniform(0.1, 0.35))
    p_gauss_blur = float(rng.uniform(0.05, 0.2))

    frames: list[np.ndarray] = []
    prev_center: np.ndarray | None = None
    for i in range(num_frames):
        dx, dy, log_zoom, angle = track[i]
        scale = base_scale * float(np.exp(log_zoom))
        center = np.array([out_w / 2.0 + dx + shake[i, 0], out_h / 2.0 + dy + shake[i, 1]])
        m = cv2.getRotationMatrix2D((src_w / 2.0, src_h / 2.0), float(angle), scale)
        m[0, 2] += center[0] - src_w / 2.0
        m[1, 2] += center[1] - src_h / 2.0
        frame = cv2.warpAffine(
            image,
            m,
            (out_w, out_h),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT,
        )

        # Blur along the actual direction of camera travel, scaled by speed,
        # so fast pans smear more than slow ones.
        velocity = center - prev_center if prev_center is not None else np.zeros(2)
        prev_center = center
        if rng.random() < p_motion_blur:
            speed = float(np.hypot(*velocity))
            length = int(np.clip(3 + speed * rng.uniform(0.5, 1.5), 3, 15)) | 1
            # Nearly static camera: no travel direction to follow, so pick one.
            direction = float(np.degrees(np.arctan2(velocity[1], velocity[0]))) if speed > 0.5 else float(rng.uniform(0.0, 180.0))
            frame = _motion_blur(frame, length, -direction)
        elif rng.random() < p_gauss_blur:
            sigma = float(rng.uniform(0.6, 1.8))
            frame = cv2.GaussianBlur(frame, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)

        alpha = float(light[i, 0]) * float(rng.uniform(0.97, 1.03))
        beta = float(light[i, 1]) + float(rng.uniform(-3.0, 3.0))
        frame = cv2.convertScaleAbs(frame, alpha=alpha, beta=beta)

        frame = _jpeg_roundtrip(frame, int(rng.integers(40, 91)))
        frames.append(np.ascontiguousarray(frame))
    return frames


def _check_frames(frames: list[np.ndarray]) -> tuple[int, int]:
    """Validate frames for a writer and return their (width, height)."""
    if not frames:
        raise ValueError("no frames to encode")
    first = frames[0]
    for idx, f in enumerate(frames):
        if f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
            raise ValueError(f"frame {idx}: expected BGR uint8 HxWx3, got {f.dtype} {f.shape}")
        if f.shape != first.shape:
            raise ValueError(f"frame {idx} has shape {f.shape}, expected {first.shape}")
    return int(first.shape[1]), int(first.shape[0])


def _write_frames(frames: list[np.ndarray], path: Path, fps: float, fourcc: str) -> None:
    width, height = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if len(fourcc) != 4:
        raise ValueError(f"fourcc must be 4 characters, got {fourcc!r}")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter could not open {path} with fourcc {fourcc!r}")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f))
    finally:
        writer.release()
    # Some backends "open" fine but write nothing for unsupported sizes/codecs.
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"cv2.VideoWriter produced no data for {path} with fourcc {fourcc!r}")


def encode_video(
    frames: list[np.ndarray],
    fps: float = 15.0,
    fourcc: str = "mp4v",
    suffix: str = ".mp4",
) -> bytes:
    """Encode BGR uint8 frames into an in-memory video file.

    OpenCV can only write to paths, so the frames go through a temporary file
    that is removed before returning.

    Args:
        frames: non-empty list of equally sized BGR uint8 (H, W, 3) frames.
        fps: frame rate stored in the container.
        fourcc: four-character codec code, e.g. "mp4v" or "MJPG".
        suffix: container extension, which selects the muxer (".mp4", ".avi").

    Returns:
        The encoded file's bytes.

    Raises:
        ValueError: if ``frames`` is empty or frame shapes/dtypes differ.
        RuntimeError: if the video writer cannot be opened or writes nothing.
    """
    with tempfile.TemporaryDirectory(prefix="clipsynth-") as tmp:
        path = Path(tmp) / f"clip{suffix}"
        _write_frames(frames, path, fps, fourcc)
        return path.read_bytes()


def write_video(frames: list[np.ndarray], path: str | os.PathLike[str], fps: float = 15.0) -> None:
    """Write BGR uint8 frames to ``path``, choosing the codec from its suffix.

    ``.mp4``/``.m4v``/``.mov`` use MPEG-4 Part 2 ("mp4v"); ``.avi`` uses Motion JPEG.
    Parent directories are created as needed.

    Raises:
        ValueError: for empty/mismatched frames or an unsupported suffix.
        RuntimeError: if the video writer cannot be opened or writes nothing.
    """
    out = Path(path)
    fourcc = _FOURCC_BY_SUFFIX.get(out.suffix.lower())
    if fourcc is None:
        raise ValueError(f"unsupported video suffix {out.suffix!r}; expected one of {sorted(_FOURCC_BY_SUFFIX)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_frames(frames, out, fps, fourcc)


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.clipsynth --help`: what this module gives and who uses it."""
    from tools.helpfmt import library_help

    usage = """\
a library, nothing to run: camera_motion_clip(image, rng, num_frames, out_size) renders a still
as a hand-held phone clip; encode_video(frames, fps, fourcc, suffix) returns the encoded bytes and
write_video(frames, path, fps) writes an MP4. `python -m tools.grocery_clips --mode motion` uses it
to make clips from photos; the tests use it for real encoded uploads."""
    return library_help("python -m tools.clipsynth", __doc__, usage, argv)


if __name__ == "__main__":
    raise SystemExit(main())
