"""The dynamic batcher: frames of many concurrent requests share encoder batches.

It owns one bounded queue (counted in frames) and one worker task; nothing else. A batch closes
when it holds `max_batch` frames, or when `max_wait` has passed since its oldest frame arrived
and the encoder has nothing to run. The model runs on one dedicated thread, off the event loop.

Pipelining: up to `depth` batches are in flight, so while the encoder runs one batch the next
full one is already collated and waiting in the encoder thread's queue; the encoder never idles
for an event-loop round trip between batches under load. A partly filled batch is held back
while the encoder is busy (it keeps filling instead), so pipelining never shrinks batches.

Priority: a request is interactive (a client waits for it) or background (a timeline job's
frames). Background frames wait in a queue of their own and only fill the rows of a batch that
interactive frames leave free, at most `max_background` of them per batch; a batch of background
frames alone may use all but one of the pipeline slots, so an interactive request never waits
behind more than one background batch. Where a batch's cost grows with its size (a CPU), a small
`max_background` keeps that wait and the rows added to clients' batches short.

Each request gets exactly its own rows back; a request whose client went away has its queued
frames dropped (frames already inside a running batch are computed and discarded); a batch that
raises is retried request by request so only the input that caused it fails.

Only numpy and the domain errors are imported: the GPU benchmark uses this module without the
web stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from index.errors import NotReady, Overloaded

log = logging.getLogger("rice.batcher")

Priority = Literal["interactive", "background"]


@dataclass(eq=False)
class Job:
    """One request's frames and where its embeddings go."""

    frames: np.ndarray  # [N, H, W, 3] uint8
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    offset: int = 0  # frames already taken into batches
    parts: dict[int, np.ndarray] = field(default_factory=dict)  # job row -> embeddings from there
    done_rows: int = 0
    background: bool = False  # a timeline job's frames: they fill batches behind interactive ones

    @property
    def remaining(self) -> int:
        return len(self.frames) - self.offset


@dataclass(frozen=True)
class Slice:
    job: Job
    start: int  # first row in the batch
    stop: int
    job_row: int = 0  # the job's row that batch row `start` holds


def collate(jobs: deque[Job], max_batch: int, first_row: int = 0) -> tuple[list[np.ndarray], list[Slice]]:
    """Take frames from the head of `jobs` into batch rows `first_row`..`max_batch` (splitting a
    job across batches if needed); drop finished or cancelled jobs. Returns one part per slice,
    not yet stacked: the encoder thread stacks them, off the event loop. Pure: tested without a server."""
    parts: list[np.ndarray] = []
    slices: list[Slice] = []
    rows = first_row
    while jobs and rows < max_batch:
        job = jobs[0]
        if job.future.done():  # cancelled by its client, or failed
            jobs.popleft()
            continue
        take = min(job.remaining, max_batch - rows)
        parts.append(job.frames[job.offset : job.offset + take])
        slices.append(Slice(job, rows, rows + take, job.offset))
        job.offset += take
        rows += take
        if job.remaining == 0:
            jobs.popleft()
    return parts, slices


def collate_by_priority(
    interactive: deque[Job], background: deque[Job], max_batch: int, max_background: int | None = None
) -> tuple[list[np.ndarray], list[Slice]]:
    """One batch: interactive frames first, then at most `max_background` background frames in the
    rows left over (default: all of them). Pure."""
    parts, slices = collate(interactive, max_batch)
    rows = slices[-1].stop if slices else 0
    stop = min(max_batch, rows + (max_batch if max_background is None else max_background))
    if rows < stop:
        more_parts, more_slices = collate(background, stop, rows)
        parts += more_parts
        slices += more_slices
    return parts, slices


Encode = Callable[[list[np.ndarray]], np.ndarray]


def stacked(encode: Callable[[np.ndarray], np.ndarray]) -> Encode:
    """Adapt an encoder of one [B, ...] array to the batcher's parts-based interface."""
    return lambda parts: encode(parts[0] if len(parts) == 1 else np.concatenate(parts))


def _timed(encode: Encode, parts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Runs on the encoder thread: the encode time excludes waiting in that thread's queue."""
    t = time.perf_counter()
    out = encode(parts)
    return out, time.perf_counter() - t


@dataclass(frozen=True)
class BatcherConfig:
    """The batcher's settings (RICE_MAX_BATCH_SIZE, RICE_MAX_WAIT_MS, RICE_MAX_QUEUE_FRAMES,
    RICE_PIPELINE_DEPTH; max_background from RICE_JOB_BATCH_FRAMES and the device)."""

    max_batch: int = 32  # frames per encoder batch
    max_wait_ms: float = 5.0  # how long a batch waits to fill
    max_queue_frames: int = 2048  # queued frames beyond which a request is Overloaded
    depth: int = 2  # batches in flight
    max_background: int | None = None  # background frames per batch; None = max_batch


class Batcher:
    """Owns the bounded frame queue and the encoder thread. Create, `start()` on the event loop,
    `submit()` from request handlers, `stop()` on shutdown."""

    def __init__(
        self,
        encode: Encode,
        config: BatcherConfig = BatcherConfig(),  # frozen: one shared default is safe
        *,
        on_batch: Callable[[int, float], None] | None = None,
        on_cancel: Callable[[int], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._encode = encode
        self.config = config
        max_batch, depth = config.max_batch, config.depth
        self.max_batch = max_batch
        self.max_background = max_batch if config.max_background is None else max(1, min(config.max_background, max_batch))
        self.max_wait = config.max_wait_ms / 1e3
        self.max_queue_frames = config.max_queue_frames
        self.depth = depth
        self._on_batch = on_batch
        self._on_cancel = on_cancel
        self._on_queue_wait = on_queue_wait
        self._on_error = on_error
        self._jobs: deque[Job] = deque()
        self._background: deque[Job] = deque()
        self._queued_frames = 0
        self._queued_background = 0
        # Batches of background frames alone leave one slot free for interactive work (if depth > 1).
        self._background_slots = max(1, depth - 1)
        self._running = 0  # batches handed to the encoder thread and not finished
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(depth)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._s_per_frame = 0.0  # moving average of encode time per frame, for Retry-After
        self.last_progress = time.monotonic()  # last finished batch (or start of work after idling)

    @property
    def queued_frames(self) -> int:
        """Interactive frames waiting for a batch (not counting those inside running batches)."""
        return self._queued_frames

    @property
    def queued_background_frames(self) -> int:
        """Background (timeline job) frames waiting for a batch."""
        return self._queued_background

    @property
    def running_batches(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def stalled_for(self) -> float:
        """Seconds the batcher has had work (queued or running) without finishing a batch; 0 when idle."""
        if self._queued_frames == 0 and self._queued_background == 0 and self._running == 0:
            return 0.0
        return time.monotonic() - self.last_progress

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new work, let queued and running batches finish for up to `drain_timeout_s`,
        then fail whatever is left with NotReady (503)."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._queued_frames or self._queued_background or self._running) and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in (*self._jobs, *self._background):
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))
        self._jobs.clear()
        self._background.clear()
        self._queued_frames = 0
        self._queued_background = 0
        for task in list(self._inflight):
            task.cancel()
        # A wedged encoder thread must not hang shutdown: don't wait for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained, from the measured encode speed (at least 1)."""
        per_frame = self._s_per_frame or 0.05
        return max(1, int((self._queued_frames + self._running * self.max_batch) * per_frame + 0.999))

    async def submit(self, frames: np.ndarray, priority: Priority = "interactive") -> np.ndarray:
        """Embed one request's frames [N, H, W, 3] -> [N, D].

        `priority="background"` (timeline jobs) queues the frames behind every interactive one;
        each priority has its own queue budget, so jobs never make clients see 429.
        Raises Overloaded (with Retry-After) when the queue is full, NotReady when shutting down.
        Cancelling the caller (its client disconnected) drops its frames that are still queued.
        """
        n = len(frames)
        if n == 0:
            raise ValueError("no frames to encode")
        if self._closing:
            raise NotReady("the service is shutting down")
        background = priority == "background"
        queued = self._queued_background if background else self._queued_frames
        if queued + n > self.max_queue_frames:
            raise Overloaded(
                f"encoder queue is full ({queued} frames waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )
        if self._queued_frames == 0 and self._queued_background == 0 and self._running == 0:
            self.last_progress = time.monotonic()  # idle until now: the stall clock starts here
        job = Job(frames, asyncio.get_running_loop().create_future(), background=background)
        self._queue_of(job).append(job)
        self._count(job, n)
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The client went away: give its queued frames back to the budget now; collate skips
            # the job because its future is done.
            dropped = job.remaining
            job.offset = len(job.frames)
            self._count(job, -dropped)
            if dropped and self._on_cancel:
                self._on_cancel(dropped)
            raise

    def _queue_of(self, job: Job) -> deque[Job]:
        return self._background if job.background else self._jobs

    def _count(self, job: Job, frames: int) -> None:
        if job.background:
            self._queued_background += frames
        else:
            self._queued_frames += frames

    async def _run(self) -> None:
        while True:
            try:
                await self._dispatch_one()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not silently kill batching for the whole process
                log.exception("batcher loop error; continuing")
                await asyncio.sleep(0.1)

    async def _dispatch_one(self) -> None:
        """Wait for a free slot and a batch worth closing; hand it to the encoder thread."""
        await self._slots.acquire()
        try:
            await self._wait_for_batch()
            parts, slices = collate_by_priority(self._jobs, self._background, self.max_batch, self.max_background)
        except BaseException:
            self._slots.release()
            raise
        if not slices:
            self._slots.release()
            return
        for s, part in zip(slices, parts, strict=True):
            self._count(s.job, -len(part))
        now = time.perf_counter()
        if self._on_queue_wait:
            for s in slices:
                if s.job_row == 0:  # the job's first frames: it waited from enqueue until now
                    self._on_queue_wait(now - s.job.enqueued)
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._encode_batch(parts, slices))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _wait_for_batch(self) -> None:
        """Return when a batch should be collated: a full one is waiting, or the oldest frame has
        waited `max_wait` and the encoder is idle (while it is busy, a partial batch keeps filling).
        A batch of background frames alone waits while the slots it may use are taken."""
        while True:
            timeout: float | None = None
            background_ok = self._running < self._background_slots
            queued = self._queued_frames + (min(self._queued_background, self.max_background) if background_ok else 0)
            if queued >= self.max_batch:
                return
            if background_ok and not self._queued_frames and self._queued_background >= self.max_background:
                return  # as many job frames as a batch may carry: waiting cannot make it larger
            if queued > 0 and self._running == 0:
                waiting = (*self._jobs, *self._background) if background_ok else tuple(self._jobs)
                oldest = next((j for j in waiting if not j.future.done()), None)
                if oldest is None:  # only cancelled jobs: let collate drop them
                    return
                timeout = oldest.enqueued + self.max_wait - time.perf_counter()
                if timeout <= 0:
                    return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _encode_batch(self, parts: list[np.ndarray], slices: list[Slice]) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                emb, seconds = await loop.run_in_executor(self._executor, _timed, self._encode, parts)
            except Exception as exc:  # any encoder failure: find the culprit requests
                if self._on_error:
                    self._on_error()
                await self._isolate_failure(slices, parts, exc)
            else:
                self._deliver(slices, emb)
                rows = len(emb)
                per_frame = seconds / rows
                self._s_per_frame = per_frame if not self._s_per_frame else 0.8 * self._s_per_frame + 0.2 * per_frame
                if self._on_batch:
                    self._on_batch(rows, seconds)
        except asyncio.CancelledError:
            # stop() gave up on this batch (while encoding or while isolating a failure): its
            # requests get a 503 instead of waiting forever.
            for s in slices:
                if not s.job.future.done():
                    s.job.future.set_exception(NotReady("the service is shutting down"))
            raise
        finally:
            self._running -= 1
            self.last_progress = time.monotonic()
            self._slots.release()
            self._wakeup.set()

    def _deliver(self, slices: list[Slice], emb: np.ndarray) -> None:
        for s in slices:
            job = s.job
            if job.future.done():
                continue
            job.parts[s.job_row] = emb[s.start : s.stop]
            job.done_rows += s.stop - s.start
            if job.done_rows == len(job.frames):
                job.future.set_result(np.concatenate([job.parts[k] for k in sorted(job.parts)]))

    async def _isolate_failure(self, slices: list[Slice], parts: list[np.ndarray], exc: Exception) -> None:
        """Re-run each request's rows alone; fail only those that still raise."""
        loop = asyncio.get_running_loop()
        if len(slices) == 1:
            self._fail(slices[0].job, exc)
            return
        for s, part in zip(slices, parts, strict=True):  # collate made one part per slice
            if s.job.future.done():
                continue
            try:
                emb, _ = await loop.run_in_executor(self._executor, _timed, self._encode, [part])
            except Exception as own_exc:  # this request's own input raises: it alone fails
                self._fail(s.job, own_exc)
            else:
                self._deliver([Slice(s.job, 0, s.stop - s.start, s.job_row)], emb)

    def _fail(self, job: Job, exc: Exception) -> None:
        log.warning("encoder failed on a request's frames: %s: %s", type(exc).__name__, exc)
        if not job.future.done():
            job.future.set_exception(exc)
        if job.remaining:  # drop the rest of a failed job's frames
            self._count(job, -job.remaining)
            job.offset = len(job.frames)
        with contextlib.suppress(ValueError):
            self._queue_of(job).remove(job)
