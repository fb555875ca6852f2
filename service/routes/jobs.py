"""Timeline jobs: POST /v1/jobs/timeline, GET /v1/jobs/{job_id}, DELETE /v1/jobs/{job_id}.

For recordings longer than a request can carry: the upload goes to the job directory as it
arrives (its own size limit, RICE_MAX_JOB_UPLOAD_BYTES), the job goes into the shared job store,
and whichever replica has a free job slot runs it. Any replica answers status and cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, UploadFile
from pydantic import BaseModel

from pipeline.jobs import JobRecord, JobStore, JobWorker
from service.auth import require_read
from service.errors import NotReady
from service.routes.deps import ReadShop, check_at_most, current_state
from service.routes.timeline import Options, save_upload
from service.schemas import JobResponse

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_read)])


class JobAccepted(BaseModel):
    job_id: str
    status: str


def _jobs(request: Request) -> tuple[JobStore, JobWorker]:
    worker = getattr(request.app.state, "job_worker", None)
    if worker is None:
        raise NotReady("the service is starting")
    return worker.store, worker


Jobs = Annotated[tuple[JobStore, JobWorker], Depends(_jobs)]


def _answer(job: JobRecord) -> JobResponse:
    return JobResponse.model_validate({k: v for k, v in asdict(job).items() if k in JobResponse.model_fields})


@router.post("/timeline", status_code=202, response_model=JobAccepted)
async def create_timeline_job(
    request: Request,
    jobs: Jobs,
    options: Options,
    file: Annotated[UploadFile | None, File(description="the recording (mp4, mov, webm, mkv, avi); or send it as the raw body")] = None,
) -> JobAccepted:
    """Accept a long recording for a timeline (same options as POST /v1/recognize/timeline); poll
    GET /v1/jobs/{job_id} for progress and the result."""
    store, worker = jobs
    settings = request.app.state.settings
    check_at_most("top_k", options.top_k, settings.max_top_k)
    current_state(request)  # 503 while starting: nothing could run the job yet
    job_id = uuid.uuid4().hex
    path = Path(settings.job_dir) / f"{job_id}.upload"
    try:
        await save_upload(file, request, path, settings.max_job_upload_bytes)
        params = {k: v for k, v in asdict(options).items()}
        job = await asyncio.to_thread(store.create, job_id, params, str(path.resolve()), time.time())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    worker.wake()
    return JobAccepted(job_id=job.job_id, status=job.status)


@router.get("/{job_id}", response_model=JobResponse)
async def get_job(job_id: str, jobs: Jobs, shop_id: ReadShop) -> JobResponse:
    """A job's status, progress (0..1), and its timeline once done (or why it failed). Sharded: give
    the job's shop (jobs live in their shard's store)."""
    return _answer(await asyncio.to_thread(jobs[0].get, job_id))


@router.delete("/{job_id}", response_model=JobResponse)
async def cancel_job(job_id: str, jobs: Jobs, shop_id: ReadShop) -> JobResponse:
    """Cancel a queued or running job (on whichever replica runs it); a finished job is left as it is.
    Sharded: give the job's shop, as for its status."""
    store, _ = jobs
    job = await asyncio.to_thread(store.cancel, job_id, time.time())
    if job.status == "cancelled":
        # Nobody reads the recording again (a running job's decoder keeps its open file until killed).
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(Path(job.upload_path).unlink)
    return _answer(job)
