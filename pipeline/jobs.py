"""The replica's job worker: claims timeline jobs from the shared store and runs them.

At most `concurrency` jobs run at once per replica, their frames at background priority in the
batcher, so clients' requests always come first. A running job holds a lease that its heartbeat
renews every second (at least three times per lease) while recording progress; when the heartbeat answers False (the job
was cancelled, on any replica) the job's task is cancelled, which kills its decoder process and
drops its queued frames. A replica that dies stops renewing: the lease runs out and another
replica's worker claims the job and runs it again from the start (the upload must be in a
directory every replica reads: RICE_JOB_DIR). On a graceful shutdown running jobs go back to the
queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from index.errors import ServiceError, StoreUnavailable
from index.jobs import TERMINAL, JobRecord, JobStatus, JobStore
from pipeline.timeline_run import TimelineOptions, TimelineRunner, timeline_answer

log = logging.getLogger("rice.jobs")


class UploadMissing(ServiceError):
    """A job's recording is not where its record says (the job directory is not shared)."""

    code = "upload_missing"


@dataclass(frozen=True)
class JobConfig:
    concurrency: int = 1  # jobs running at once on this replica
    lease_s: float = 30.0  # a replica silent this long is presumed dead; its job is claimed again
    poll_s: float = 2.0  # how often an idle worker looks for jobs another replica accepted
    max_attempts: int = 3  # claims before a job that keeps killing its replicas is failed


@dataclass
class JobEvents:
    """Hooks for metrics: a job started, finished with a status, processed recording seconds."""

    started: Callable[[], object] = lambda: None
    finished: Callable[[str], object] = lambda status: None
    progressed: Callable[[float], object] = lambda seconds: None


class JobWorker:
    """Create, `start()` on the event loop, `wake()` after accepting a job, `stop()` on shutdown."""

    def __init__(
        self,
        store: JobStore,
        runner: Callable[[], tuple[TimelineRunner, str]],
        config: JobConfig,
        events: JobEvents | None = None,
    ) -> None:
        """`runner` gives the current serving model's TimelineRunner and model version (a model
        switch between jobs is picked up by the next job)."""
        self.store = store
        self.runner = runner
        self.config = config
        self.events = events or JobEvents()
        self.owner = f"replica-{uuid.uuid4().hex[:12]}"
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="job-worker")

    def wake(self) -> None:
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop claiming; put this replica's running jobs back in the queue for any replica."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _loop(self) -> None:
        while True:
            try:
                while len(self.running) < self.config.concurrency:
                    job = await asyncio.to_thread(self.store.claim, self.owner, self.config.lease_s, time.time(), self.config.max_attempts)
                    if job is None:
                        break
                    self.running[job.job_id] = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("job store unavailable: %s", exc)
            except Exception:  # a bug here must not stop this replica from running jobs
                log.exception("job worker loop error; continuing")
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.config.poll_s)

    async def _run(self, job: JobRecord) -> None:
        self.events.started()
        progress = {"fraction": 0.0, "seconds": 0.0}
        status: JobStatus = "failed"
        result: dict[str, object] | None = None
        error: dict[str, str] | None = None
        try:
            runner, model_version = self.runner()
            options = TimelineOptions(**job.params)
            if not await asyncio.to_thread(Path(job.upload_path).exists):
                raise UploadMissing(
                    f"the recording is not in this replica's job directory ({job.upload_path}); replicas must share RICE_JOB_DIR"
                )

            def on_progress(fraction: float) -> None:
                progress["fraction"] = fraction

            work = asyncio.create_task(runner.run(job.upload_path, options, "background", on_progress))
            beat = asyncio.create_task(self._heartbeats(job.job_id, progress, work))
            try:
                timeline = await work
            finally:
                beat.cancel()
                with contextlib.suppress(BaseException):
                    await beat
            result = timeline_answer(timeline, model_version)
            self.events.progressed(timeline.duration_s)
            status = "done"
        except asyncio.CancelledError:
            # Shutting down: back to the queue for any replica. Otherwise a client cancelled it (the
            # heartbeat saw it) and the store already says so.
            status = "queued" if self._stopping else "cancelled"
        except ServiceError as exc:  # the recording itself is the problem (unreadable, too long, ...)
            error = {"code": exc.code, "message": exc.message}
        except Exception as exc:
            log.exception("timeline job %s failed", job.job_id)
            error = {"code": "internal", "message": f"internal error ({type(exc).__name__})"}
        finally:
            self.running.pop(job.job_id, None)
            await self._finish(job, status, result, error)
            self.wake()  # a slot is free

    async def _finish(self, job: JobRecord, status: JobStatus, result: dict[str, object] | None, error: dict[str, str] | None) -> None:
        final_status: str = status
        try:
            if status != "cancelled":
                await asyncio.to_thread(self.store.finish, job.job_id, self.owner, status, time.time(), result, error)
            final_status = (await asyncio.to_thread(self.store.get, job.job_id)).status
        except StoreUnavailable as exc:  # the lease runs out and another replica runs the job again
            log.warning("could not record the end of job %s: %s", job.job_id, exc)
            final_status = "queued"
        finally:
            self.events.finished(final_status)
        if final_status in TERMINAL:  # nobody will read the recording again
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(Path(job.upload_path).unlink)

    async def _heartbeats(self, job_id: str, progress: dict[str, float], work: asyncio.Task[object]) -> None:
        """Renew the lease and record progress; cancel `work` when the job is no longer ours."""
        while not work.done():
            # Often enough for a progress bar, and three times per lease at least.
            await asyncio.sleep(min(self.config.lease_s / 3, 1.0))
            try:
                fraction = progress["fraction"]
                mine = await asyncio.to_thread(self.store.heartbeat, job_id, self.owner, fraction, self.config.lease_s, time.time())
            except StoreUnavailable as exc:  # keep working: the lease outlives a short outage
                log.warning("job heartbeat failed: %s", exc)
                continue
            if not mine:
                work.cancel()
                return
