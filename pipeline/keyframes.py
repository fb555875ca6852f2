"""Keyframe sampling: decode only a clip's I-frames (`sampling=keyframes` on /v1/recognize).

Uniform sampling must decode every frame up to the last one it keeps (a P- or B-frame needs the
frames before it), so its cost grows with the clip's length. A keyframe decodes on its own: this
mode demuxes the clip once (reading packets, decoding nothing) to list its keyframes, picks up to
`num_frames` of them spread evenly over the clip (the same `sample_indices` rule, over keyframes),
and sends only those packets to the decoder. The cost grows with the number of frames kept.

A clip has as many frames to offer as it has keyframes (a 5 s clip with a keyframe every 12 frames
at 30 fps has 13), so `frames_used` may be below `num_frames`; a clip whose container marks no
keyframe falls back to uniform sampling. It runs wherever `decode_clip` runs (the decode pool):
same arguments, same limits, same errors, same `DecodedClip`.

PyAV (FFmpeg's libraries) does the demuxing and decoding: OpenCV's capture cannot skip decoding.
"""

from __future__ import annotations

import io
import time

import av
import numpy as np

from index.errors import InvalidMedia, UnsupportedMedia
from model.config import PreprocessConfig
from model.preprocess import prepare_frame, sample_indices
from pipeline.decode import _AUDIO_MAGIC, _IMAGE_MAGIC, DecodedClip, DecodeLimits, _looks_like_container, decode_clip


def _open(data: bytes) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        if _looks_like_container(data):
            raise InvalidMedia("the video container is truncated or corrupt") from exc
        raise UnsupportedMedia("not a video in a supported container (mp4, mov, webm, mkv, avi)") from exc


def _keyframe_positions(data: bytes, limits: DecodeLimits, started: float) -> tuple[list[int], int, float, int, int]:
    """Demux only: (packet ordinals of the keyframes, packets, fps, width, height); limits checked."""
    with _open(data) as container:
        if not container.streams.video:
            if not container.streams and _looks_like_container(data):  # a container header, nothing readable after it
                raise InvalidMedia("the video container is truncated or corrupt")
            raise UnsupportedMedia("the file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise UnsupportedMedia("the file has no video stream")
        if min(width, height) < 16:
            raise InvalidMedia(f"frame size {width}x{height} is too small (at least 16x16)")
        if width * height > limits.max_frame_pixels:
            raise InvalidMedia(f"frame size {width}x{height} exceeds the limit of {limits.max_frame_pixels} pixels")
        fps = float(stream.average_rate or 0.0)
        if container.duration is not None and container.duration / av.time_base > limits.max_duration_s:
            raise InvalidMedia(f"clip lasts {container.duration / av.time_base:.1f} s; the limit is {limits.max_duration_s:g} s")
        keys: list[int] = []
        n = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's flush packet
                    continue
                if packet.is_keyframe:
                    keys.append(n)
                n += 1
                if n > limits.max_decoded_frames:
                    raise InvalidMedia(f"clip has more than {limits.max_decoded_frames} frames")
                if n % 256 == 0 and time.perf_counter() - started > limits.timeout_s:
                    raise InvalidMedia(f"decoding took longer than {limits.timeout_s:g} s")
        except av.FFmpegError:
            pass  # a damaged tail: use the packets read so far, as uniform decoding does
    return keys, n, fps, width, height


def decode_keyframes(data: bytes, num_frames: int, pre: PreprocessConfig, limits: DecodeLimits) -> DecodedClip:
    """Video bytes -> up to `num_frames` keyframes spread over the clip, preprocessed like `decode_clip`'s."""
    started = time.perf_counter()
    if not data:
        raise InvalidMedia("the uploaded file is empty")
    if data.startswith(_IMAGE_MAGIC) and not (data[:4] == b"RIFF" and data[8:12] == b"AVI "):
        raise UnsupportedMedia("this is a still image, not a video; use POST /v1/recognize/image")
    if data.startswith(_AUDIO_MAGIC):
        raise UnsupportedMedia("this is an audio file, not a video")
    keys, total, fps, width, height = _keyframe_positions(data, limits, started)
    if not keys:
        return decode_clip(data, num_frames, pre, limits)
    wanted = {keys[i] for i in sample_indices(len(keys), num_frames)}
    kept: list[np.ndarray] = []
    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "NONE"  # one frame out per packet in: no decoder delay to flush
        codec = stream.codec_context
        n = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                if n in wanted:
                    for frame in codec.decode(packet):
                        kept.append(prepare_frame(frame.to_ndarray(format="bgr24"), pre))
                n += 1
                if n > max(wanted):
                    break
                if time.perf_counter() - started > limits.timeout_s:
                    raise InvalidMedia(f"decoding took longer than {limits.timeout_s:g} s")
            for frame in codec.decode(None):  # frames the decoder still holds
                kept.append(prepare_frame(frame.to_ndarray(format="bgr24"), pre))
        except av.FFmpegError:
            pass  # a damaged keyframe: keep the ones that decoded
    if not kept:
        return decode_clip(data, num_frames, pre, limits)
    return DecodedClip(np.stack(kept[:num_frames]), total, fps, width, height, (time.perf_counter() - started) * 1e3)
