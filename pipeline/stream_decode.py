"""Streaming a long recording's sampled frames out of a decoder process of its own.

FFmpeg is native code fed untrusted bytes: the recording is decoded in a child process (a fresh
interpreter, `python -m pipeline.stream_decode`), never in the server. The child reads the file in
order, skips frames with grab(), retrieve()s and preprocesses only the sampled ones, and writes
them to its stdout as raw uint8 bytes with their shape; the pipe's small buffer is the back
pressure, so neither side ever holds more than a few frames whatever the recording's length.
A child that crashes, stalls or breaks the protocol fails this recording only (UndecodableMedia, 422).

Wire format, child -> parent: messages of `kind` (4 bytes) + payload length (uint32 LE) + payload.
  META  JSON {fps, total_frames, width, height, duration_s} (header values; total may be 0)
  FRAM  float64 LE time in seconds, 3 x uint32 LE (height, width, channels), then the raw frame
  ERR_  JSON {kind: "invalid"|"unsupported", message}
  END_  JSON {frames_read, duration_s} (what the stream really held)
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from index.errors import InvalidMedia, UndecodableMedia, UnsupportedMedia
from model.config import PreprocessConfig

_HEAD = struct.Struct("<4sI")
_FRAME = struct.Struct("<dIII")
_MAX_PAYLOAD = 64 * 1024 * 1024  # far above any preprocessed frame: a larger length is a broken child


@dataclass(frozen=True)
class StreamLimits:
    """What a recording may be: longest duration, largest frame, and how long the decoder may go
    without producing anything before it counts as stuck."""

    max_duration_s: float = 4 * 3600.0
    max_frame_pixels: int = 3840 * 2160
    stall_timeout_s: float = 60.0


@dataclass(frozen=True)
class StreamInfo:
    fps: float
    total_frames: int
    width: int
    height: int
    duration_s: float  # from the header; 0 when the container does not say


@dataclass(frozen=True)
class SampledFrame:
    t: float  # seconds from the start of the recording
    frame: np.ndarray  # uint8 [crop, crop, 3] RGB, ready for the encoder


@dataclass(frozen=True)
class StreamEnd:
    frames_read: int
    duration_s: float


def sample_times(fps: float, rate: float) -> Iterator[int]:
    """Frame indices to keep, in order: the frame nearest each time (j + 0.5) / rate, so a window
    of w seconds holds w x rate frames spread evenly over it. Never repeats an index."""
    j, last = 0, -1
    while True:
        idx = round((j + 0.5) / rate * fps)
        j += 1
        if idx > last:
            last = idx
            yield idx


# ---------------------------------------------------------------- the child side


def _send(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(_HEAD.pack(kind, len(payload)))
    out.write(payload)


def _child_main(args: dict[str, object], out: BinaryIO) -> int:
    import cv2  # only the child decodes

    from model.preprocess import prepare_frame
    from pipeline.decode import _AUDIO_MAGIC, _IMAGE_MAGIC, _looks_like_container

    path = str(args["path"])
    rate = float(args["rate"])  # type: ignore[arg-type]
    pre = PreprocessConfig(**args["preprocess"])  # type: ignore[arg-type]
    max_duration_s = float(args["max_duration_s"])  # type: ignore[arg-type]
    max_pixels = int(args["max_frame_pixels"])  # type: ignore[call-overload]

    def fail(kind: str, message: str) -> int:
        _send(out, b"ERR_", json.dumps({"kind": kind, "message": message}).encode())
        out.flush()
        return 0

    with open(path, "rb") as f:
        magic = f.read(16)
    if not magic:
        return fail("invalid", "the uploaded recording is empty")
    if magic.startswith(_IMAGE_MAGIC) and not (magic[:4] == b"RIFF" and magic[8:12] == b"AVI "):
        return fail("unsupported", "this is a still image, not a video")
    if magic.startswith(_AUDIO_MAGIC):
        return fail("unsupported", "this is an audio file, not a video")
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        if _looks_like_container(magic):
            return fail("invalid", "the video container is truncated or corrupt")
        return fail("unsupported", "not a video in a supported container (mp4, mov, webm, mkv, avi)")
    try:
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        total = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        if width <= 0 or height <= 0:
            return fail("unsupported", "the file has no video stream")
        if min(width, height) < 16:
            return fail("invalid", f"frame size {width}x{height} is too small (at least 16x16)")
        if width * height > max_pixels:
            return fail("invalid", f"frame size {width}x{height} exceeds the limit of {max_pixels} pixels")
        if not 0 < fps <= 1000:
            fps = 25.0  # containers without a usable rate: assume PAL's
        duration = total / fps if total else 0.0
        if duration > max_duration_s:
            return fail("invalid", f"recording lasts {duration:.1f} s; the limit is {max_duration_s:g} s")
        info = StreamInfo(fps, total, width, height, duration)
        _send(out, b"META", json.dumps(asdict(info)).encode())
        wanted = sample_times(fps, rate)
        target = next(wanted)
        idx = 0
        while cap.grab():
            if idx == target:
                ok, frame = cap.retrieve()
                if ok and frame is not None:
                    rgb = prepare_frame(frame, pre)
                    _send(out, b"FRAM", _FRAME.pack(idx / fps, *rgb.shape) + rgb.tobytes())
                target = next(wanted)
            idx += 1
            if idx / fps > max_duration_s:  # the header understated the length
                return fail("invalid", f"recording lasts more than {max_duration_s:g} s")
        _send(out, b"END_", json.dumps({"frames_read": idx, "duration_s": idx / fps}).encode())
        out.flush()
        return 0
    finally:
        cap.release()


# ---------------------------------------------------------------- the parent side


class FrameStream:
    """The parent's end: start the decoder child for `path`; iterate `read()` for a StreamInfo,
    then SampledFrames in time order, then one StreamEnd. Blocking: call it off the event loop.
    `close()` (or leaving the `with` block) kills the child whatever state it is in."""

    def __init__(self, path: str | Path, rate: float, preprocess: PreprocessConfig, limits: StreamLimits) -> None:
        self.limits = limits
        args = {
            "path": str(path),
            "rate": rate,
            "preprocess": asdict(preprocess),
            "max_duration_s": limits.max_duration_s,
            "max_frame_pixels": limits.max_frame_pixels,
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.stream_decode", json.dumps(args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a signal to the server's process group never reaches it first
        )
        assert self._proc.stdout is not None
        self._out = self._proc.stdout
        self._fd = self._out.fileno()
        os.set_blocking(self._fd, False)
        self._buf = bytearray()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def __enter__(self) -> FrameStream:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def kill(self) -> None:
        """Stop the child now; a read in progress on another thread then ends (EOF)."""
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()

    def close(self) -> None:
        """Kill the child, reap it and close the pipe. Call it where no read is in progress."""
        self.kill()
        self._proc.wait()
        self._out.close()

    def _read_exact(self, n: int) -> bytes:
        """n bytes from the child, waiting at most the stall timeout for each chunk; a child that
        died or stalled raises UndecodableMedia (the recording made the decoder fail, not the server)."""
        while len(self._buf) < n:
            ready, _, _ = select.select([self._fd], [], [], self.limits.stall_timeout_s)
            if not ready:
                self.close()
                raise UndecodableMedia(f"the decoder produced nothing for {self.limits.stall_timeout_s:g} s on this recording")
            chunk = os.read(self._fd, max(n - len(self._buf), 1 << 20))
            if not chunk:
                raise self._died()
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _died(self) -> UndecodableMedia:
        code = self._proc.wait()
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            return UndecodableMedia(f"the decoder crashed on this recording ({name})")
        return UndecodableMedia(f"the decoder stopped unexpectedly on this recording (exit status {code})")

    def read(self) -> Iterator[StreamInfo | SampledFrame | StreamEnd]:
        """Messages in order; raises InvalidMedia / UnsupportedMedia for a recording we cannot use."""
        while True:
            kind, size = _HEAD.unpack(self._read_exact(_HEAD.size))
            if size > _MAX_PAYLOAD:
                self.close()
                raise UndecodableMedia("the decoder broke its protocol on this recording")
            payload = self._read_exact(size)
            if kind == b"FRAM":
                t, h, w, c = _FRAME.unpack_from(payload)
                pixels = np.frombuffer(payload, dtype=np.uint8, offset=_FRAME.size)
                if pixels.size != h * w * c:
                    self.close()
                    raise UndecodableMedia("the decoder broke its protocol on this recording")
                yield SampledFrame(t, pixels.reshape(h, w, c))
            elif kind == b"META":
                yield StreamInfo(**json.loads(payload))
            elif kind == b"END_":
                yield StreamEnd(**json.loads(payload))
                return
            elif kind == b"ERR_":
                err = json.loads(payload)
                cls = UnsupportedMedia if err.get("kind") == "unsupported" else InvalidMedia
                raise cls(str(err.get("message", "the recording cannot be decoded")))
            else:
                self.close()
                raise UndecodableMedia("the decoder broke its protocol on this recording")


def _main() -> int:
    out = sys.stdout.buffer
    try:
        return _child_main(json.loads(sys.argv[1]), out)
    except BrokenPipeError:  # the parent stopped listening (cancelled): nothing to report
        return 0
    finally:
        with contextlib.suppress(BrokenPipeError):
            out.flush()


if __name__ == "__main__":
    sys.exit(_main())
