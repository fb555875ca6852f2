"""The dynamic batcher: frames of many concurrent requests share encoder batches.

It owns one bounded queue (counted in frames) and one worker task. A batch closes when it holds
`max_batch` frames or `max_wait` has passed since its first frame. The model runs on a single
dedicated thread, off the event loop. Each request gets exactly its own rows back; a request whose
client went away has its remaining frames dropped; a batch that raises is retried request by
request so only the input that caused it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.errors import Overloaded


@dataclass
class Job:
    """One request's frames and where its embeddings go."""

    frames: np.ndarray  # [N, H, W, 3] uint8
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    offset: int = 0  # frames already taken into batches
    out: list[np.ndarray] = field(default_factory=list)
    first_batch_at: float | None = None

    @property
    def remaining(self) -> int:
        return len(self.frames) - self.offset


@dataclass(frozen=True)
class Slice:
    job: Job
    start: int  # row in the batch
    stop: int


def collate(jobs: deque[Job], max_batch: int) -> tuple[np.ndarray, list[Slice]]:
    """Take up to `max_batch` frames from the head of `jobs` (splitting a job across batches if
    needed); drop finished or cancelled jobs. Pure: tested without a server."""
    parts: list[np.ndarray] = []
    slices: list[Slice] = []
    rows = 0
    while jobs and rows < max_batch:
        job = jobs[0]
        if job.future.done():  # cancelled by its client
            jobs.popleft()
            continue
        take = min(job.remaining, max_batch - rows)
        parts.append(job.frames[job.offset : job.offset + take])
        slices.append(Slice(job, rows, rows + take))
        job.offset += take
        rows += take
        if job.remaining == 0:
            jobs.popleft()
    batch = np.concatenate(parts) if parts else np.empty((0,), dtype=np.uint8)
    return batch, slices


class Batcher:
    def __init__(
        self,
        encode: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        max_queue_frames: int = 2048,
        on_batch: Callable[[int, float], None] | None = None,
        on_cancel: Callable[[int], None] | None = None,
    ) -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.max_queue_frames = max_queue_frames
        self._on_batch = on_batch
        self._on_cancel = on_cancel
        self._jobs: deque[Job] = deque()
        self._queued_frames = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")
        self._task: asyncio.Task[None] | None = None
        self.last_progress = time.monotonic()  # for readiness: the worker is alive and moving
        self.batches = 0

    @property
    def queued_frames(self) -> int:
        return self._queued_frames

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(Overloaded("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def retry_after_s(self) -> int:
        """A rough wait until the queue drains, for Retry-After."""
        return max(1, int(self._queued_frames / max(self.max_batch, 1) * 0.05) + 1)

    async def submit(self, frames: np.ndarray) -> np.ndarray:
        """Embed one request's frames [N, H, W, 3] -> [N, D]. Raises Overloaded when the queue is full."""
        n = len(frames)
        if n == 0:
            raise ValueError("no frames to encode")
        if self._queued_frames + n > self.max_queue_frames:
            raise Overloaded(
                f"encoder queue is full ({self._queued_frames} frames waiting); retry later",
                headers={"Retry-After": str(self.retry_after_s())},
            )
        job = Job(frames, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued_frames += n
        self._wakeup.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            # The client disconnected: give its frames back to the queue budget now.
            dropped = job.remaining
            job.offset = len(job.frames)
            self._queued_frames -= dropped
            if self._on_cancel and dropped:
                self._on_cancel(dropped)
            raise

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                self._wakeup.clear()
                self.last_progress = time.monotonic()
                await self._wakeup.wait()
            # Wait for the batch to fill, at most max_wait after the oldest job arrived.
            deadline = self._jobs[0].enqueued + self.max_wait if self._jobs else 0.0
            while sum(j.remaining for j in self._jobs) < self.max_batch:
                timeout = deadline - time.perf_counter()
                if timeout <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except TimeoutError:
                    break
            batch, slices = collate(self._jobs, self.max_batch)
            if not slices:
                continue
            self._queued_frames -= len(batch)
            now = time.perf_counter()
            for s in slices:
                if s.job.first_batch_at is None:
                    s.job.first_batch_at = now
            t0 = time.perf_counter()
            try:
                emb = await loop.run_in_executor(self._executor, self._encode, batch)
                self._deliver(slices, emb)
            except Exception as exc:
                await self._isolate_failure(slices, batch, exc)
            self.batches += 1
            self.last_progress = time.monotonic()
            if self._on_batch:
                self._on_batch(len(batch), time.perf_counter() - t0)

    def _deliver(self, slices: list[Slice], emb: np.ndarray) -> None:
        for s in slices:
            job = s.job
            if job.future.done():
                continue
            job.out.append(emb[s.start : s.stop])
            if job.offset == len(job.frames) and sum(len(o) for o in job.out) == len(job.frames):
                job.future.set_result(np.concatenate(job.out))

    async def _isolate_failure(self, slices: list[Slice], batch: np.ndarray, exc: Exception) -> None:
        """Re-run each request's rows alone; fail only those that still raise."""
        loop = asyncio.get_running_loop()
        if len(slices) == 1:
            self._fail(slices[0].job, exc)
            return
        for s in slices:
            try:
                emb = await loop.run_in_executor(self._executor, self._encode, batch[s.start : s.stop])
                self._deliver([Slice(s.job, 0, s.stop - s.start)], emb)
            except Exception as own_exc:
                self._fail(s.job, own_exc)

    def _fail(self, job: Job, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
        if job in self._jobs:  # drop the rest of a failed job's frames
            self._queued_frames -= job.remaining
            job.offset = len(job.frames)
            self._jobs.remove(job)
