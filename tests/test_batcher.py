"""The dynamic batcher: collation, per-request results, failure isolation, overload, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

import numpy as np
import pytest

from pipeline.batcher import Batcher, Job, collate, stacked
from service.errors import NotReady, Overloaded


def _frames(start: int, n: int) -> np.ndarray:
    """n frames whose pixels all equal their global id, so an embedding can name its frame."""
    return np.stack([np.full((2, 2, 3), start + i, np.uint8) for i in range(n)])


def _encode(batch: np.ndarray) -> np.ndarray:
    return batch[:, 0, 0, :1].astype(np.float32)  # [B, 1]: the frame id


def test_collate_splits_jobs_across_batches_and_skips_cancelled() -> None:
    loop = asyncio.new_event_loop()
    try:
        jobs = deque(Job(_frames(10 * i, n), loop.create_future()) for i, n in enumerate([3, 5, 2]))
        jobs[2].future.cancel()
        encode = stacked(_encode)
        parts, slices = collate(jobs, 4)
        assert sum(map(len, parts)) == 4 and [(s.start, s.stop) for s in slices] == [(0, 3), (3, 4)]
        assert list(encode(parts)[:, 0]) == [0, 1, 2, 10]
        parts, slices = collate(jobs, 4)
        assert list(encode(parts)[:, 0]) == [11, 12, 13, 14] and len(slices) == 1
        parts, slices = collate(jobs, 4)
        assert parts == [] and slices == [] and not jobs  # the cancelled job is dropped, not encoded
    finally:
        loop.close()


@pytest.mark.anyio
async def test_concurrent_requests_share_batches_and_get_their_own_rows() -> None:
    sizes: list[int] = []
    b = Batcher(stacked(_encode), max_batch=16, max_wait_ms=20, on_batch=lambda n, _s: sizes.append(n))
    b.start()
    try:
        inputs = [_frames(20 * i, 10) for i in range(8)]
        outs = await asyncio.gather(*(b.submit(x) for x in inputs))
        for x, out in zip(inputs, outs, strict=True):
            assert np.array_equal(out[:, 0], _encode(x)[:, 0])
        assert sum(sizes) == 80 and max(sizes) == 16 and len(sizes) == 5
    finally:
        await b.stop()


@pytest.mark.anyio
async def test_a_failing_input_fails_only_its_own_request() -> None:
    def encode(batch: np.ndarray) -> np.ndarray:
        if (batch == 255).any():
            raise ValueError("poisoned frame")
        return _encode(batch)

    b = Batcher(stacked(encode), max_batch=32, max_wait_ms=20)
    b.start()
    try:
        good = [_frames(0, 4), _frames(10, 4)]
        bad = np.full((3, 2, 2, 3), 255, np.uint8)
        results = await asyncio.gather(b.submit(good[0]), b.submit(bad), b.submit(good[1]), return_exceptions=True)
        assert isinstance(results[1], ValueError)
        assert np.array_equal(results[0][:, 0], [0, 1, 2, 3]) and np.array_equal(results[2][:, 0], [10, 11, 12, 13])
        assert b.queued_frames == 0
    finally:
        await b.stop()


@pytest.mark.anyio
async def test_full_queue_rejects_with_retry_after_and_cancel_frees_the_budget() -> None:
    gate = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return _encode(batch)

    cancelled: list[int] = []
    # depth=1: no pipelined second batch, so the waiting request's frames all stay queued.
    b = Batcher(stacked(slow), max_batch=4, max_wait_ms=0, max_queue_frames=10, depth=1, on_cancel=cancelled.append)
    b.start()
    try:
        first = asyncio.create_task(b.submit(_frames(0, 4)))  # taken into the (blocked) batch
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(b.submit(_frames(10, 8)))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as exc:
            await b.submit(_frames(30, 4))
        # Retry-After: the queue's drain time at the measured speed, whole seconds, at least 1
        assert exc.value.headers["Retry-After"] == str(b.retry_after_s()) and b.retry_after_s() >= 1
        waiting.cancel()  # its client went away
        await asyncio.sleep(0.01)
        assert cancelled == [8] and b.queued_frames == 0
        gate.set()
        assert np.array_equal((await first)[:, 0], [0, 1, 2, 3])
        assert len(await b.submit(_frames(40, 4))) == 4  # admitted again
    finally:
        gate.set()
        await b.stop()


@pytest.mark.anyio
async def test_pipelining_queues_the_next_full_batch_but_lets_a_partial_one_keep_filling() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return _encode(batch)

    b = Batcher(stacked(gated), max_batch=4, max_wait_ms=0, depth=2, on_batch=lambda n, _s: sizes.append(n))
    b.start()
    try:
        first = asyncio.create_task(b.submit(_frames(0, 4)))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(b.submit(_frames(10, 4)))  # a full batch: collated while the first runs
        await asyncio.sleep(0.05)
        assert b.running_batches == 2 and b.queued_frames == 0
        third = asyncio.create_task(b.submit(_frames(20, 2)))  # partial: no slot, and it keeps filling
        fourth = asyncio.create_task(b.submit(_frames(30, 2)))
        await asyncio.sleep(0.05)
        assert b.queued_frames == 4 and b.stalled_for() > 0
        gate.set()
        outs = await asyncio.gather(first, second, third, fourth)
        assert [list(o[:, 0]) for o in outs] == [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21], [30, 31]]
        assert sizes == [4, 4, 4]  # the two partial requests shared one full batch
        assert b.stalled_for() == 0
    finally:
        gate.set()
        await b.stop()


@pytest.mark.anyio
async def test_stop_drains_queued_work_then_refuses_new_work() -> None:
    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return _encode(batch)

    b = Batcher(stacked(slow), max_batch=2, max_wait_ms=0)
    b.start()
    pending = [asyncio.create_task(b.submit(_frames(10 * i, 2))) for i in range(4)]
    await asyncio.sleep(0.01)
    await b.stop(drain_timeout_s=5)
    assert [list((await p)[:, 0]) for p in pending] == [[0, 1], [10, 11], [20, 21], [30, 31]]
    with pytest.raises(NotReady):
        await b.submit(_frames(0, 1))


@pytest.mark.anyio
async def test_stop_without_drain_fails_queued_requests_with_not_ready() -> None:
    gate = threading.Event()

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return _encode(batch)

    b = Batcher(stacked(gated), max_batch=1, max_wait_ms=0, depth=1)
    b.start()
    running = asyncio.create_task(b.submit(_frames(0, 1)))
    queued = asyncio.create_task(b.submit(_frames(1, 1)))
    await asyncio.sleep(0.05)
    await b.stop(drain_timeout_s=0)
    gate.set()
    results = await asyncio.gather(running, queued, return_exceptions=True)
    assert isinstance(results[0], NotReady) and isinstance(results[1], NotReady)  # neither request hangs


@pytest.mark.anyio
async def test_retry_after_follows_measured_encode_speed() -> None:
    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.02 * len(batch))  # 20 ms per frame
        return _encode(batch)

    b = Batcher(stacked(slow), max_batch=4, max_wait_ms=0, max_queue_frames=400)
    b.start()
    try:
        await b.submit(_frames(0, 4))
        b._queued_frames = 200  # pretend a backlog: 200 frames x ~20 ms = ~4 s
        assert 3 <= b.retry_after_s() <= 6
        b._queued_frames = 0
    finally:
        await b.stop()
