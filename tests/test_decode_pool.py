"""The decode pool runs decoders in worker processes: a worker that segfaults, aborts, runs out of
memory or time is killed and replaced, only its own request fails (UndecodableMedia), and the
deaths are counted by cause. Real processes, real signals, real OpenCV."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import struct
import time
import zlib
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from index.errors import InvalidMedia, Overloaded, UndecodableMedia, UnsupportedMedia
from model.config import PreprocessConfig
from pipeline.decode import DecodeLimits, decode_clip, decode_image
from pipeline.decode_pool import DecodePool
from tools.clipsynth import encode_video
from tools.mediafuzz import source

PRE, LIMITS = PreprocessConfig(), DecodeLimits()


@pytest.fixture(scope="module")
def clip() -> bytes:
    return source("mp4_mp4v")


@pytest.fixture
def pool() -> Iterator[tuple[DecodePool, list[str]]]:
    deaths: list[str] = []
    p = DecodePool(2, on_worker_death=deaths.append, memory_limit_mb=512, time_budget_s=60)
    yield p, deaths
    p.close()


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _png_bomb(side: int) -> bytes:
    """A valid 16x16 PNG whose header claims side x side pixels: decoding it allocates side^2 * 3 bytes."""
    png = bytearray(cv2.imencode(".png", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    struct.pack_into(">II", png, 16, side, side)  # IHDR data starts at 16: width, height
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))  # IHDR's CRC, so it is not rejected as corrupt
    return bytes(png)


def test_worker_results_equal_in_process_decoding(pool: tuple[DecodePool, list[str]], clip: bytes) -> None:
    p, deaths = pool
    got = _run(p.run(decode_clip, clip, 6, PRE, LIMITS))
    want = decode_clip(clip, 6, PRE, LIMITS)
    assert np.array_equal(got.frames, want.frames)  # type: ignore[attr-defined]
    assert got.frames.flags.writeable and got.frames.dtype == np.uint8  # type: ignore[attr-defined]
    assert (got.total_frames, got.width, got.height) == (want.total_frames, want.width, want.height)  # type: ignore[attr-defined]
    image = source("jpeg")
    assert np.array_equal(_run(p.run(decode_image, image, PRE, 10**7, True)), decode_image(image, PRE, 10**7, True))  # type: ignore[arg-type]
    assert deaths == []


def test_domain_errors_come_back_as_themselves_and_keep_the_worker(pool: tuple[DecodePool, list[str]]) -> None:
    p, deaths = pool
    with pytest.raises(UnsupportedMedia):
        _run(p.run(decode_image, b"not an image", PRE, 10**7, False))
    with pytest.raises(InvalidMedia):
        _run(p.run(decode_clip, b"", 4, PRE, LIMITS))
    assert deaths == []


@pytest.mark.parametrize(
    ("fn", "args", "cause", "words"),
    [
        (faulthandler._sigsegv, (), "crash", "SIGSEGV"),
        (os.abort, (), "crash", "SIGABRT"),
        (bytearray, (8 * 1024**3,), "memory", "512 MB"),
    ],
)
def test_a_dying_worker_fails_only_its_request_and_is_replaced(
    pool: tuple[DecodePool, list[str]], clip: bytes, fn: object, args: tuple[object, ...], cause: str, words: str
) -> None:
    p, deaths = pool

    async def mixed() -> list[object]:
        calls = [p.run(decode_clip, clip, 4, PRE, LIMITS) for _ in range(6)]
        calls.insert(3, p.run(fn, *args))  # type: ignore[arg-type]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = _run(mixed())
    bad = results.pop(3)  # type: ignore[attr-defined]
    assert isinstance(bad, UndecodableMedia) and words in bad.message, bad
    assert all(getattr(r, "frames", None) is not None and len(r.frames) == 4 for r in results), results  # type: ignore[union-attr]
    assert deaths == [cause] and p.deaths[cause] == 1

    # still two healthy workers: both serve at once
    async def two() -> list[object]:
        return await asyncio.gather(*[p.run(decode_clip, clip, 4, PRE, LIMITS) for _ in range(2)])

    again = _run(two())
    assert [len(r.frames) for r in again] == [4, 4]  # type: ignore[attr-defined, union-attr]


def test_a_stuck_worker_is_killed_after_its_time_budget(clip: bytes) -> None:
    deaths: list[str] = []
    p = DecodePool(1, on_worker_death=deaths.append, time_budget_s=1.0)
    try:
        t = time.perf_counter()
        with pytest.raises(UndecodableMedia, match="did not finish within 1 s"):
            _run(p.run(time.sleep, 600))
        assert time.perf_counter() - t < 60  # killed, not waited out
        assert deaths == ["timeout"]
        assert len(_run(p.run(decode_clip, clip, 4, PRE, LIMITS)).frames) == 4  # type: ignore[attr-defined]
    finally:
        p.close()


def test_an_image_bomb_gets_a_clear_error_not_the_hosts_memory(pool: tuple[DecodePool, list[str]]) -> None:
    """A 30000x30000 PNG header on 16x16 of data: 2.7 GB if decoded, over the 512 MB limit."""
    p, _ = pool
    with pytest.raises((UndecodableMedia, UnsupportedMedia, InvalidMedia)):
        _run(p.run(decode_image, _png_bomb(30000), PRE, 10**10, False))
    assert _run(p.run(decode_image, source("png"), PRE, 10**7, False)).shape == (224, 224, 3)  # type: ignore[attr-defined]


def test_results_that_cannot_cross_are_refused_cleanly(pool: tuple[DecodePool, list[str]]) -> None:
    p, deaths = pool
    with pytest.raises(UndecodableMedia):
        _run(p.run(set, [1, 2]))  # a set is not a decode result
    with pytest.raises(UndecodableMedia):
        _run(p.run(np.array, ["a", object()], object))  # object arrays never cross
    assert deaths == []
    assert _run(p.run(np.arange, 5)).tolist() == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]


def test_too_many_pending_uploads_get_429_before_reaching_a_worker(clip: bytes) -> None:
    p = DecodePool(1, max_pending=1)
    try:
        p.pending = 1  # one upload already holds the only place
        with pytest.raises(Overloaded) as e:
            _run(p.run(decode_clip, clip, 4, PRE, LIMITS))
        assert e.value.retry_after_s == 1
    finally:
        p.close()


def test_thread_isolation_decodes_in_process(clip: bytes) -> None:
    p = DecodePool(1, isolation="thread")
    try:
        assert len(_run(p.run(decode_clip, clip, 3, PRE, LIMITS)).frames) == 3  # type: ignore[attr-defined]
    finally:
        p.close()


def test_a_worker_that_died_while_idle_costs_no_request(pool: tuple[DecodePool, list[str]], clip: bytes) -> None:
    """Killed from outside between uploads (the host's OOM killer, an operator): replaced on the
    next take, and the upload that comes next is decoded, not refused."""
    p, deaths = pool
    victim = next(iter(p._all)).process
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(30)
    assert not victim.is_alive()

    async def both() -> list[object]:
        return await asyncio.gather(*[p.run(decode_clip, clip, 3, PRE, LIMITS) for _ in range(2)])

    assert [len(r.frames) for r in _run(both())] == [3, 3]  # type: ignore[attr-defined, union-attr]
    assert deaths == ["crash"]


def test_closing_the_pool_ends_its_workers() -> None:
    p = DecodePool(2)
    procs = [w.process for w in p._all]
    assert len(procs) == 2 and all(pr.is_alive() for pr in procs)
    p.close()
    assert not any(pr.is_alive() for pr in procs)


def test_mjpeg_in_avi_source_decodes(pool: tuple[DecodePool, list[str]]) -> None:
    """The fuzzer's AVI source is a real clip: mutations start from something valid."""
    p, _ = pool
    frames = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(6)]
    avi = encode_video(frames, fourcc="MJPG", suffix=".avi")
    assert len(_run(p.run(decode_clip, avi, 6, PRE, LIMITS)).frames) == 6  # type: ignore[attr-defined]
    assert len(_run(p.run(decode_clip, source("avi_mjpeg"), 6, PRE, LIMITS)).frames) == 6  # type: ignore[attr-defined]


def test_a_lying_worker_cannot_make_the_server_allocate_or_import_at_will() -> None:
    """What comes back from a worker is parsed, never unpickled, and bounded before allocation."""
    import json
    import multiprocessing

    from pipeline.decode_worker import WorkerFailed, receive_result

    lies = [
        {"ok": True, "value": {"t": "array", "dtype": "|u1", "shape": [10**6, 10**6]}},  # 1 TB
        {"ok": True, "value": {"t": "array", "dtype": "|O", "shape": [1]}},  # objects
        {"ok": True, "value": {"t": "dataclass", "module": "os", "name": "system", "fields": {}}},
        {"ok": False, "error": "SystemExit", "message": "not one of our errors"},
    ]
    for lie in lies:
        ours, theirs = multiprocessing.Pipe()
        theirs.send_bytes(json.dumps(lie).encode())
        with pytest.raises(WorkerFailed):
            receive_result(ours, lambda: None)
        ours.close()
        theirs.close()
