"""A seeded mutation fuzzer for uploads: valid clips and images, damaged the way attackers and
broken encoders damage them.

Sources are generated here (OpenCV's writers: MP4/mp4v, AVI/MJPEG, MKV/MJPEG and FFV1,
WebM/VP8 and VP9; JPEG, PNG, WebP), never read from disk. Each case is fully determined by
(source name, seed): `case(name, seed)` rebuilds the same bytes, so a crasher found in a long run
becomes a regression case as two values, not a committed binary.

Mutations: bit flips, interesting bytes, truncation, duplicated byte ranges, duplicated chunks or
boxes (RIFF chunks, MP4 boxes, PNG chunks, JPEG segments), size fields of those set to
boundary values, 32-bit words set to boundary values, splices of two sources, garbage tails.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from tools.clipsynth import encode_video

CLIP_SOURCES = ("mp4_mp4v", "avi_mjpeg", "mkv_mjpeg", "mkv_ffv1", "webm_vp8", "webm_vp9")
IMAGE_SOURCES = ("jpeg", "png", "webp")
SOURCES = CLIP_SOURCES + IMAGE_SOURCES
_VIDEO = {
    "mp4_mp4v": ("mp4v", ".mp4"),
    "avi_mjpeg": ("MJPG", ".avi"),
    "mkv_mjpeg": ("MJPG", ".mkv"),
    "mkv_ffv1": ("FFV1", ".mkv"),
    "webm_vp8": ("VP80", ".webm"),
    "webm_vp9": ("VP90", ".webm"),
}
_BOUNDARY32 = (0, 1, 7, 8, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFF)
_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF)


def _frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """Moving noise and a bar: every codec has real work and frames differ."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    frames = []
    for i in range(n):
        f = np.roll(base, 5 * i, axis=1)
        f[:, (7 * i) % w : (7 * i) % w + 8] = 255
        frames.append(f)
    return frames


@functools.cache
def source(name: str) -> bytes:
    """A small valid file of the named kind (deterministic for a given OpenCV build)."""
    if name in _VIDEO:
        fourcc, suffix = _VIDEO[name]
        return encode_video(_frames(12, 96, 64), fps=12.0, fourcc=fourcc, suffix=suffix)
    ext = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}[name]
    ok, buf = cv2.imencode(ext, _frames(1, 96, 64)[0])
    assert ok, name
    return buf.tobytes()


# ---- structure: where the chunks, boxes and segments (and their size fields) are


def _riff_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, total length) of RIFF chunks, descending into RIFF/LIST."""
    out: list[tuple[int, int]] = []

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end and len(out) < 4096:
            size = struct.unpack_from("<I", data, pos + 4)[0]
            total = 8 + size + (size & 1)
            out.append((pos, min(total, end - pos)))
            if data[pos : pos + 4] in (b"RIFF", b"LIST") and size >= 4:
                walk(pos + 12, min(pos + 8 + size, end))
            pos += max(total, 8)

    walk(0, len(data))
    return out


def _mp4_boxes(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of MP4 boxes, descending into the container boxes."""
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"dinf", b"udta"}
    out: list[tuple[int, int]] = []

    def walk(start: int, end: int) -> None:
        pos = start
        while pos + 8 <= end and len(out) < 4096:
            size = struct.unpack_from(">I", data, pos)[0]
            if size < 8:
                break
            out.append((pos, min(size, end - pos)))
            if data[pos + 4 : pos + 8] in containers:
                walk(pos + 8, min(pos + size, end))
            pos += size

    walk(0, len(data))
    return out


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 8
    while pos + 12 <= len(data):
        size = struct.unpack_from(">I", data, pos)[0]
        out.append((pos, min(12 + size, len(data) - pos)))
        pos += 12 + size
    return out


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """Marker segments with a length field (up to the start of scan)."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        size = struct.unpack_from(">H", data, pos + 2)[0]
        out.append((pos, min(2 + size, len(data) - pos)))
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        pos += 2 + size
    return out


def _units(name: str, data: bytes) -> tuple[list[tuple[int, int]], str, int, int]:
    """The structural units of `data`, and where/how their size field is stored (format, offset, width)."""
    if name.startswith("avi") or name == "webp":
        return _riff_chunks(data), "<I", 4, 4
    if name.startswith("mp4"):
        return _mp4_boxes(data), ">I", 0, 4
    if name == "png":
        return _png_chunks(data), ">I", 0, 4
    if name == "jpeg":
        return _jpeg_segments(data), ">H", 2, 2
    return [], "", 0, 0  # Matroska sizes are variable-length: the generic mutations cover it


# ---- mutations: each takes (rng, data, name) and returns (new bytes, what it did)

Mutation = Callable[[np.random.Generator, bytearray, str], str]


def _bit_flips(rng: np.random.Generator, b: bytearray, name: str) -> str:
    n = int(rng.integers(1, 17))
    for _ in range(n):
        i = int(rng.integers(0, len(b)))
        b[i] ^= 1 << int(rng.integers(0, 8))
    return f"flip {n} bits"


def _interesting_bytes(rng: np.random.Generator, b: bytearray, name: str) -> str:
    n = int(rng.integers(1, 9))
    for _ in range(n):
        b[int(rng.integers(0, len(b)))] = int(rng.choice(_INTERESTING_BYTES))
    return f"set {n} bytes"


def _truncate(rng: np.random.Generator, b: bytearray, name: str) -> str:
    cut = int(rng.integers(1, len(b)))
    del b[cut:]
    return f"truncate at {cut}"


def _duplicate_range(rng: np.random.Generator, b: bytearray, name: str) -> str:
    a = int(rng.integers(0, len(b)))
    n = int(rng.integers(1, min(4096, len(b) - a) + 1))
    at = int(rng.integers(0, len(b)))
    b[at:at] = b[a : a + n]
    return f"duplicate {n} bytes from {a} at {at}"


def _duplicate_unit(rng: np.random.Generator, b: bytearray, name: str) -> str:
    units = _units(name, bytes(b))[0]
    if not units:
        return _duplicate_range(rng, b, name)
    off, size = units[int(rng.integers(0, len(units)))]
    copies = int(rng.integers(1, 4))
    b[off + size : off + size] = bytes(b[off : off + size]) * copies
    return f"duplicate chunk at {off} ({size} bytes) x{copies}"


def _size_field(rng: np.random.Generator, b: bytearray, name: str) -> str:
    units, fmt, field, width = _units(name, bytes(b))
    if not units:
        return _word(rng, b, name)
    off, size = units[int(rng.integers(0, len(units)))]
    if off + field + width > len(b):
        return _word(rng, b, name)
    limit = (1 << (8 * width)) - 1
    choice = int(rng.integers(0, 3))
    if choice == 0:
        value = int(rng.choice(_BOUNDARY32)) & limit
    elif choice == 1:
        value = max(0, min(limit, size + int(rng.integers(-16, 17))))
    else:
        value = int(rng.integers(0, limit + 1))
    struct.pack_into(fmt, b, off + field, value)
    return f"size field of chunk at {off} = {value}"


def _word(rng: np.random.Generator, b: bytearray, name: str) -> str:
    """A 32-bit word set to a boundary value: frame counts, sample sizes, offsets, dimensions."""
    i = int(rng.integers(0, max(1, len(b) - 4))) & ~3
    value = int(rng.choice(_BOUNDARY32))
    struct.pack_into(">I" if rng.random() < 0.5 else "<I", b, i, value)
    return f"word at {i} = {value:#x}"


def _splice(rng: np.random.Generator, b: bytearray, name: str) -> str:
    other_name = str(rng.choice(SOURCES))
    other = source(other_name)
    cut = int(rng.integers(0, len(b)))
    from_ = int(rng.integers(0, len(other)))
    b[cut:] = other[from_:]
    return f"splice {other_name}[{from_}:] at {cut}"


def _garbage_tail(rng: np.random.Generator, b: bytearray, name: str) -> str:
    n = int(rng.integers(1, 65536))
    b.extend(rng.bytes(n))
    return f"append {n} random bytes"


MUTATIONS: dict[str, Mutation] = {
    "bit_flips": _bit_flips,
    "interesting_bytes": _interesting_bytes,
    "truncate": _truncate,
    "duplicate_range": _duplicate_range,
    "duplicate_chunk": _duplicate_unit,
    "size_field": _size_field,
    "word": _word,
    "splice": _splice,
    "garbage_tail": _garbage_tail,
}


@dataclass(frozen=True)
class Case:
    source: str
    seed: int
    ops: tuple[str, ...]  # what was done, for reports
    data: bytes

    @property
    def is_clip(self) -> bool:
        return self.source in CLIP_SOURCES

    def __str__(self) -> str:
        return f"{self.source} seed={self.seed}: {'; '.join(self.ops)}"


def case(name: str, seed: int) -> Case:
    """The mutated file for (source, seed): one to three mutations, the same bytes every time."""
    rng = np.random.default_rng([seed, SOURCES.index(name)])
    b = bytearray(source(name))
    ops = []
    kinds = list(MUTATIONS)
    for _ in range(int(rng.integers(1, 4))):
        if len(b) < 2:
            break
        ops.append(MUTATIONS[kinds[int(rng.integers(0, len(kinds)))]](rng, b, name))
    return Case(name, seed, tuple(ops), bytes(b))


def cases(count: int, seed: int = 0, sources: tuple[str, ...] = SOURCES) -> Iterator[Case]:
    """`count` cases cycling through `sources`, seeds from `seed` upward."""
    for i in range(count):
        yield case(sources[i % len(sources)], seed + i)


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.mediafuzz --help`: what this module gives and who uses it."""
    from tools.helpfmt import library_help

    usage = """\
a library, nothing to run: case(name, seed) rebuilds one mutated upload (a source in SOURCES),
cases(count, seed) yields many. `python bench/fuzz.py --cases 3000 --seed 1` sends them to a real
`rice serve` (docs/PERFORMANCE.md, "Fuzzing"); tests/test_fuzz.py runs a short seeded set."""
    return library_help("python -m tools.mediafuzz", __doc__, usage, argv)


if __name__ == "__main__":
    raise SystemExit(main())
