"""Decoding uploads with OpenCV, from memory (no temp files), into model-ready uint8 frames.

Video: uniform sampling of N frames over the whole clip (linspace over frame indices, as RICE
does); frames not sampled are skipped with grab() and only the kept ones are retrieve()d and
colour-converted. Every limit is checked as early as the container lets us.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import cv2
import numpy as np

from index.errors import InvalidMedia, UnsupportedMedia
from model.config import PreprocessConfig
from model.preprocess import prepare_frame, sample_indices
from pipeline.local_features import extract_catalog

# Leading bytes of still-image formats: such uploads are images, not clips.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"RIFF")
_AUDIO_MAGIC = (b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3")


@dataclass(frozen=True)
class DecodeLimits:
    max_duration_s: float = 600.0
    max_frame_pixels: int = 3840 * 2160
    max_decoded_frames: int = 36000
    timeout_s: float = 20.0


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # uint8 [N, crop, crop, 3], RGB
    total_frames: int
    fps: float
    width: int
    height: int
    decode_ms: float
    # grey uint8 [N, h, w]: each kept frame at a long side of at most `view_side`, for local-feature
    # verification (pipeline.verify); made from the same decoded frame, never a second decode
    views: np.ndarray | None = None


@dataclass(frozen=True)
class DecodedImage:
    frame: np.ndarray  # uint8 [crop, crop, 3], RGB, for the encoder
    view: np.ndarray  # uint8 [h, w], grey, long side at most view_side: for verification
    scale: float  # source pixels per view pixel (>= 1)


@dataclass(frozen=True)
class CatalogImage:
    frame: np.ndarray  # uint8 [crop, crop, 3], RGB, letterboxed
    features: np.ndarray  # uint8 [n]: `pipeline.local_features` bytes of the full-resolution upload


def view_of(bgr: np.ndarray, side: int) -> np.ndarray:
    """An OpenCV BGR frame -> grey uint8 [h, w] with a long side of at most `side` (never upscaled)."""
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    scale = side / max(gray.shape)
    if scale >= 1:
        return gray
    return cv2.resize(gray, (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale))), interpolation=cv2.INTER_AREA)


def _looks_like_container(data: bytes) -> bool:
    """MP4/MOV (ftyp box), Matroska/WebM (EBML), AVI (RIFF....AVI ), MPEG-TS/PS."""
    return (
        data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")
        or data[:4] == b"\x1a\x45\xdf\xa3"
        or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")
        or data[:1] == b"\x47"
        or data[:4] == b"\x00\x00\x01\xba"
    )


def _count_frames(data: bytes, limits: DecodeLimits, started: float) -> int:
    """For containers that do not state their length: grab through once to count."""
    stream = io.BytesIO(data)  # must outlive the capture: OpenCV reads it lazily
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]  # stubs lack BytesIO
    n = 0
    try:
        while cap.grab():
            n += 1
            if n > limits.max_decoded_frames:
                raise InvalidMedia(f"clip has more than {limits.max_decoded_frames} frames")
            if time.perf_counter() - started > limits.timeout_s:
                raise InvalidMedia(f"decoding took longer than {limits.timeout_s:g} s")
    finally:
        cap.release()
    return n


def _read_sampled(
    cap: cv2.VideoCapture,
    wanted: list[int],
    pre: PreprocessConfig,
    limits: DecodeLimits,
    started: float,
    view_side: int = 0,
    views: list[np.ndarray] | None = None,
) -> tuple[list[np.ndarray], int]:
    """Grab through the stream, retrieving only the `wanted` indices. Returns the kept frames and
    how many frames were read before the stream ended (or the last wanted one was reached); with
    `view_side`, appends each kept frame's grey view to `views`."""
    kept: list[np.ndarray] = []
    idx = 0
    for target in wanted:
        while idx < target:  # skip without colour conversion
            if not cap.grab():
                return kept, idx
            idx += 1
            if idx % 64 == 0 and time.perf_counter() - started > limits.timeout_s:
                raise InvalidMedia(f"decoding took longer than {limits.timeout_s:g} s")
        if not cap.grab():
            return kept, idx
        idx += 1
        ok, frame = cap.retrieve()
        if ok and frame is not None:
            kept.append(prepare_frame(frame, pre))
            if view_side and views is not None:
                views.append(view_of(frame, view_side))
        if time.perf_counter() - started > limits.timeout_s:
            raise InvalidMedia(f"decoding took longer than {limits.timeout_s:g} s")
    return kept, idx


def decode_clip(data: bytes, num_frames: int, pre: PreprocessConfig, limits: DecodeLimits, view_side: int = 0) -> DecodedClip:
    """Video bytes -> `num_frames` uniformly sampled, preprocessed frames (fewer for short clips);
    with `view_side`, also each kept frame's grey view at that long side (`DecodedClip.views`)."""
    views: list[np.ndarray] = []
    started = time.perf_counter()
    if not data:
        raise InvalidMedia("the uploaded file is empty")
    if data.startswith(_IMAGE_MAGIC) and not (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        raise UnsupportedMedia("this is a still image, not a video; use POST /v1/recognize/image")
    if data.startswith(_AUDIO_MAGIC):
        raise UnsupportedMedia("this is an audio file, not a video")
    stream = io.BytesIO(data)  # must outlive the capture: OpenCV reads it lazily
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]  # stubs lack BytesIO
    try:
        if not cap.isOpened():
            if _looks_like_container(data):
                raise InvalidMedia("the video container is truncated or corrupt")
            raise UnsupportedMedia("not a video in a supported container (mp4, mov, webm, mkv, avi)")
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if width <= 0 or height <= 0:
            raise UnsupportedMedia("the file has no video stream")
        if min(width, height) < 16:
            raise InvalidMedia(f"frame size {width}x{height} is too small (at least 16x16)")
        if width * height > limits.max_frame_pixels:
            raise InvalidMedia(f"frame size {width}x{height} exceeds the limit of {limits.max_frame_pixels} pixels")
        if total > limits.max_decoded_frames:
            raise InvalidMedia(f"clip has {total} frames; the limit is {limits.max_decoded_frames}")
        if total > 0 and fps > 0 and total / fps > limits.max_duration_s:
            raise InvalidMedia(f"clip lasts {total / fps:.1f} s; the limit is {limits.max_duration_s:g} s")
        if total <= 0:
            total = _count_frames(data, limits, started)
        kept, read = _read_sampled(cap, sample_indices(total, num_frames), pre, limits, started, view_side, views)
        if read < total and len(kept) < min(read, num_frames):
            # The header promised more frames than the stream holds: the last sampled indices were
            # never reached. Sample again over the frames that really exist, so the clip's end counts.
            cap.release()
            stream = io.BytesIO(data)
            cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]  # stubs lack BytesIO
            total = read
            views.clear()
            kept, _ = _read_sampled(cap, sample_indices(total, num_frames), pre, limits, started, view_side, views)
    finally:
        cap.release()
    if not kept:
        raise InvalidMedia("no decodable video frames in the upload")
    elapsed = (time.perf_counter() - started) * 1e3
    return DecodedClip(np.stack(kept), total, fps, width, height, elapsed, np.stack(views) if views else None)


def decode_image(data: bytes, pre: PreprocessConfig, max_pixels: int, whole: bool = False) -> np.ndarray:
    """Image bytes (JPEG, PNG, WebP, BMP, ...) -> one preprocessed frame, uint8 [crop, crop, 3].
    whole=True (catalog images) letterboxes the image instead of centre-cropping it."""
    return prepare_frame(_decode_bgr(data, max_pixels), pre, whole=whole)


def decode_image_view(data: bytes, pre: PreprocessConfig, max_pixels: int, view_side: int) -> DecodedImage:
    """A still to recognise -> its encoder frame and its grey view for verification, from one decode."""
    img = _decode_bgr(data, max_pixels)
    view = view_of(img, view_side)
    return DecodedImage(prepare_frame(img, pre), view, max(img.shape[:2]) / max(view.shape))


def decode_catalog(data: bytes, pre: PreprocessConfig, max_pixels: int) -> CatalogImage:
    """A catalog upload -> its letterboxed encoder frame and the local features of the full-resolution
    image (`pipeline.local_features.extract_catalog`), from one decode, in the decode worker."""
    img = _decode_bgr(data, max_pixels)
    features = extract_catalog(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)).to_bytes()
    return CatalogImage(prepare_frame(img, pre, whole=True), np.frombuffer(features, np.uint8).copy())


def _decode_bgr(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise InvalidMedia("the uploaded image is empty")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise UnsupportedMedia("not an image in a supported format (jpeg, png, webp, bmp, tiff)")
    h, w = img.shape[:2]
    if h * w > max_pixels:
        raise InvalidMedia(f"image size {w}x{h} exceeds the limit of {max_pixels} pixels")
    if min(h, w) < 8:
        raise InvalidMedia(f"image {w}x{h} is too small (at least 8x8)")
    return img
