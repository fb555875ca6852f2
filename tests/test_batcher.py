"""The dynamic batcher: collation, per-request results, failure isolation, overload, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from pipeline.batcher import Batcher, BatcherConfig, Job, collate, collate_by_priority, stacked
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
    b = Batcher(stacked(_encode), BatcherConfig(max_batch=16, max_wait_ms=20), on_batch=lambda n, _s: sizes.append(n))
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

    b = Batcher(stacked(encode), BatcherConfig(max_batch=32, max_wait_ms=20))
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
    b = Batcher(stacked(slow), BatcherConfig(max_batch=4, max_wait_ms=0, max_queue_frames=10, depth=1), on_cancel=cancelled.append)
    b.start()
    try:
        first = asyncio.create_task(b.submit(_frames(0, 4)))  # taken into the (blocked) batch
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(b.submit(_frames(10, 8)))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as exc:
            await b.submit(_frames(30, 4))
        # Retry-After: the queue's drain time at the measured speed, whole seconds, at least 1
        assert exc.value.retry_after_s == b.retry_after_s() >= 1
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

    b = Batcher(stacked(gated), BatcherConfig(max_batch=4, max_wait_ms=0, depth=2), on_batch=lambda n, _s: sizes.append(n))
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

    b = Batcher(stacked(slow), BatcherConfig(max_batch=2, max_wait_ms=0))
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

    b = Batcher(stacked(gated), BatcherConfig(max_batch=1, max_wait_ms=0, depth=1))
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

    b = Batcher(stacked(slow), BatcherConfig(max_batch=4, max_wait_ms=0, max_queue_frames=400))
    b.start()
    try:
        await b.submit(_frames(0, 4))
        b._queued_frames = 200  # pretend a backlog: 200 frames x ~20 ms = ~4 s
        assert 3 <= b.retry_after_s() <= 6
        b._queued_frames = 0
    finally:
        await b.stop()


def test_collate_by_priority_puts_interactive_frames_first_and_background_in_the_rows_left() -> None:
    loop = asyncio.new_event_loop()
    try:
        background = deque([Job(_frames(100, 6), loop.create_future(), background=True)])
        interactive = deque([Job(_frames(0, 3), loop.create_future())])
        encode = stacked(_encode)
        parts, slices = collate_by_priority(interactive, background, 4)
        assert list(encode(parts)[:, 0]) == [0, 1, 2, 100]
        assert [(s.start, s.stop, s.job_row) for s in slices] == [(0, 3, 0), (3, 4, 0)]
        parts, slices = collate_by_priority(interactive, background, 4)
        assert list(encode(parts)[:, 0]) == [101, 102, 103, 104] and slices[0].job_row == 1
        assert not interactive and len(background) == 1
    finally:
        loop.close()


async def _until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


@pytest.mark.anyio
async def test_interactive_frames_overtake_queued_background_frames() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)
        out = _encode(batch)
        batches.append([int(x) for x in out[:, 0]])
        return out

    b = Batcher(stacked(gated), BatcherConfig(max_batch=4, max_wait_ms=0, depth=2))
    b.start()
    try:
        job = asyncio.create_task(b.submit(_frames(100, 12), priority="background"))
        # Background alone takes one slot and leaves the other to interactive work.
        await _until(lambda: b.running_batches == 1 and b.queued_background_frames == 8)
        client = asyncio.create_task(b.submit(_frames(0, 2)))
        await _until(lambda: b.queued_frames == 2)
        assert b.running_batches == 1  # a partial interactive batch keeps filling; bg waits for a slot
        gate.set()
        assert list((await client)[:, 0]) == [0, 1]
        assert list((await job)[:, 0]) == list(range(100, 112))
        assert batches[0] == [100, 101, 102, 103] and batches[1][:2] == [0, 1]  # client ahead of bg 104..
        assert sorted(x for batch in batches for x in batch) == [0, 1, *range(100, 112)]
    finally:
        gate.set()
        await b.stop()


@pytest.mark.anyio
async def test_background_frames_have_their_own_queue_budget() -> None:
    gate = threading.Event()

    def gated(batch: np.ndarray) -> np.ndarray:
        gate.wait(10)
        return _encode(batch)

    b = Batcher(stacked(gated), BatcherConfig(max_batch=4, max_wait_ms=0, max_queue_frames=12, depth=1))
    b.start()
    try:
        job = asyncio.create_task(b.submit(_frames(100, 12), priority="background"))
        await _until(lambda: b.running_batches == 1)
        with pytest.raises(Overloaded):
            await b.submit(_frames(200, 8), priority="background")  # 8 still queued + 8 > 12
        client = asyncio.create_task(b.submit(_frames(0, 8)))  # the interactive budget is untouched
        await _until(lambda: b.queued_frames == 8)
        job.cancel()  # a cancelled job gives its queued frames back
        await _until(lambda: b.queued_background_frames == 0)
        gate.set()
        assert list((await client)[:, 0]) == list(range(8))
    finally:
        gate.set()
        await b.stop()


def test_collate_by_priority_caps_the_background_rows_of_a_batch() -> None:
    loop = asyncio.new_event_loop()
    try:
        background = deque([Job(_frames(100, 6), loop.create_future(), background=True)])
        interactive = deque([Job(_frames(0, 2), loop.create_future())])
        encode = stacked(_encode)
        parts, _ = collate_by_priority(interactive, background, 8, max_background=3)
        assert list(encode(parts)[:, 0]) == [0, 1, 100, 101, 102]  # 2 interactive + at most 3 background
        parts, _ = collate_by_priority(interactive, background, 8, max_background=3)
        assert list(encode(parts)[:, 0]) == [103, 104, 105]
    finally:
        loop.close()


@pytest.mark.anyio
async def test_capped_background_batches_go_without_waiting_to_fill() -> None:
    sizes: list[int] = []
    b = Batcher(stacked(_encode), BatcherConfig(max_batch=8, max_wait_ms=10_000, max_background=2), on_batch=lambda n, _s: sizes.append(n))
    b.start()
    try:
        out = await asyncio.wait_for(b.submit(_frames(0, 6), priority="background"), 10)  # a long max_wait is never waited out
        assert list(out[:, 0]) == [0, 1, 2, 3, 4, 5] and sizes == [2, 2, 2]
    finally:
        await b.stop()
