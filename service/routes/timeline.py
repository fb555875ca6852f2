"""POST /v1/recognize/timeline: which product was on screen when, for a recording within the request limits.

Also the upload-to-disk helper the job route shares: recordings are written to a file as they
arrive (the decoder child reads them from there), never held whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import Annotated, BinaryIO

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from pipeline.feedback import new_request_id
from pipeline.timeline_run import TimelineOptions, timeline_answer
from service.auth import require_read
from service.errors import BadRequest, PayloadTooLarge
from service.routes.deps import Keeper, ReadShop, State, check_at_most
from service.schemas import TimelineResponse

router = APIRouter(tags=["timeline"], dependencies=[Depends(require_read)])

_FLUSH_BYTES = 1 << 20  # body chunks are gathered to this size and written off the event loop
_UPLOAD_DOC = "the recording (mp4, mov, webm, mkv, avi); or send it as the raw body"


def options_from_query(
    shop_id: ReadShop,
    window_s: float = Query(2.0, ge=0.25, le=60, description="seconds of recording pooled into one search"),
    stride_s: float | None = Query(None, gt=0, le=60, description="seconds between window starts (at most window_s); default window_s"),
    top_k: int = Query(3, ge=1, description="SKUs per segment: the chosen one and its alternatives (at most RICE_MAX_TOP_K)"),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description="score from which a segment is a match; default: the model's"),
) -> TimelineOptions:
    options = TimelineOptions(shop_id, window_s, stride_s, top_k, min_score)
    options.check()
    return options


Options = Annotated[TimelineOptions, Depends(options_from_query)]


def _write(f: BinaryIO, chunks: list[bytes]) -> None:
    f.write(b"".join(chunks))


async def save_upload(upload: UploadFile | None, request: Request, path: Path, max_bytes: int) -> int:
    """Stream the multipart field `file` (already spooled to disk by the form parser) or the raw body
    into `path`, 1 MiB at a time; 413 past `max_bytes`, 400 when empty. Returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(path, "wb") as f:
        if upload is not None:
            while chunk := await upload.read(_FLUSH_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes")
                await asyncio.to_thread(_write, f, [chunk])
        elif request.headers.get("content-type", "").startswith(("multipart/", "application/x-www-form-urlencoded")):
            raise BadRequest("missing multipart field 'file'")
        else:
            pending: list[bytes] = []
            buffered = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes")
                pending.append(chunk)
                buffered += len(chunk)
                if buffered >= _FLUSH_BYTES:
                    await asyncio.to_thread(_write, f, pending)
                    pending, buffered = [], 0
            await asyncio.to_thread(_write, f, pending)
    if size == 0:
        raise BadRequest("send the recording as multipart field 'file' or as the raw request body")
    return size


@router.post("/v1/recognize/timeline", response_model=TimelineResponse)
async def recognize_timeline(
    request: Request,
    state: State,
    keeper: Keeper,
    options: Options,
    file: Annotated[UploadFile | None, File(description=_UPLOAD_DOC)] = None,
) -> TimelineResponse:
    """Cut a recording into segments, each the product on screen (or none), in order and covering the
    whole recording. Windows of `window_s` seconds are embedded and searched like clips, then
    smoothed over time (a Viterbi pass with a switching cost), so a product is one segment however
    the seller moves it. For recordings beyond the request limits, use POST /v1/jobs/timeline."""
    check_at_most("top_k", options.top_k, state.settings.max_top_k)
    path = Path(state.settings.job_dir) / "requests" / f"{uuid.uuid4().hex}.upload"
    try:
        await save_upload(file, request, path, state.settings.max_upload_bytes)
        timeline = await state.timeline.run(path, options, "interactive")
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    state.metrics.timeline_seconds.inc(timeline.duration_s)
    body = timeline_answer(timeline, state.engine.model_version)
    body["request_id"] = request_id = new_request_id()
    # A timeline's record keeps its segments' SKUs (no clip vector: its verdicts are counted, never enrich the gallery).
    answer: list[dict[str, object]] = [{"sku": s.sku, "score": s.score, "item_id": s.item_id} for s in timeline.segments if s.sku]
    await keeper.remember_answer(request_id, "timeline", state.engine.model_version, options.shop_id, answer)
    return TimelineResponse.model_validate(body)
