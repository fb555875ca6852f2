"""POST /v1/recognize (a clip) and POST /v1/recognize/image (one still image)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from pipeline.feedback import new_request_id
from pipeline.stages import Recognition
from service.auth import require_read
from service.errors import NotReady
from service.routes.deps import Keeper, ReadShop, State, check_at_most, read_upload
from service.schemas import RecognizeResponse, SkuResult

_EVIDENCE = ("embedding_score", "inliers", "coverage", "frames_verified", "verifiable", "box")

router = APIRouter(tags=["recognize"], dependencies=[Depends(require_read)])


def _check(state: State, top_k: int, num_frames: int | None = None) -> None:
    check_at_most("top_k", top_k, state.settings.max_top_k)
    if num_frames is not None:
        check_at_most("num_frames", num_frames, state.settings.max_num_frames)


_MIN_VERSION_DOC = (
    "read-your-writes: search a gallery at least this new (a gallery_version from a write); waits up to RICE_SYNC_WAIT_S, else 503"
)


_SAMPLING_DOC = (
    "uniform: num_frames spread over the clip (decodes every frame up to the last kept); "
    "keyframes: up to num_frames of the clip's keyframes, decoding only those (several times cheaper; frames_used may be lower)"
)
_MIN_SCORE_DOC = (
    "top-1 score (results[0].score) from which the answer is a match (match: true), instead of the calibrated verdict "
    "(match_probability >= RICE_MATCH_PROBABILITY); default: the verdict"
)


async def _wait_for_gallery(state: State, version: int) -> None:
    """Bounded wait until this replica has applied `version`; 503 (not_ready) if it does not in time."""
    if version and not await state.replica.wait_for_version(version, state.settings.sync_wait_s):
        have = state.replica.gallery.version
        raise NotReady(
            f"gallery_behind: this replica has gallery version {have}, the request needs {version} "
            f"(not reached within {state.settings.sync_wait_s:g} s); retry",
            retry_after_s=1,
        )


async def _answer(state: State, keeper: Keeper, r: Recognition, kind: str, shop_id: str | None) -> RecognizeResponse:
    m = state.metrics  # recognition quality: what a dashboard watches drift in
    m.recognitions.labels(kind, "true" if r.match else "false").inc()
    if r.hits:
        m.top1_score.labels(kind).observe(r.hits[0].score)
    request_id = new_request_id()
    await keeper.remember(request_id, kind, state.engine.model_version, shop_id, r)  # on a thread, bounded wait, never fails
    return RecognizeResponse(
        request_id=request_id,
        results=[
            SkuResult(
                sku=h.sku,
                score=h.score,
                item_id=h.item_id,
                shop_id=h.shop_id,
                metadata=h.metadata,
                source=h.source,
                **{k: v for k, v in r.evidence.get(h.sku, {}).items() if k in _EVIDENCE},
            )
            for h in r.hits
        ],
        gallery_version=r.gallery_version,
        model_version=state.engine.model_version,
        match=r.match,
        match_threshold=r.match_threshold,
        match_probability=None if r.match_probability is None else round(r.match_probability, 4),
        frames_used=r.frames_used,
        timings_ms={k: round(v, 3) for k, v in r.timings_ms.items()},
    )


@router.post("/v1/recognize", response_model=RecognizeResponse)
async def recognize_clip(
    request: Request,
    state: State,
    keeper: Keeper,
    shop_id: ReadShop,
    file: Annotated[UploadFile | None, File(description="the clip (mp4, mov, webm, mkv, avi); or send it as the raw body")] = None,
    top_k: int = Query(5, ge=1, description="number of SKUs to return (at most RICE_MAX_TOP_K, default 100)"),
    num_frames: int = Query(10, ge=1, description="frames sampled uniformly over the clip (at most RICE_MAX_NUM_FRAMES, default 32)"),
    min_gallery_version: int = Query(0, ge=0, description=_MIN_VERSION_DOC),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description=_MIN_SCORE_DOC),
    sampling: Literal["uniform", "keyframes"] = Query("uniform", description=_SAMPLING_DOC),
) -> RecognizeResponse:
    """Recognise the product shown in a clip: top-k SKUs, best first, and whether the top one is a match."""
    _check(state, top_k, num_frames)
    await _wait_for_gallery(state, min_gallery_version)
    data = await read_upload(file, request, state.settings.max_upload_bytes, "file")
    recognition = await state.pipeline.recognize_clip(data, top_k, shop_id, num_frames, min_score, sampling)
    return await _answer(state, keeper, recognition, "clip", shop_id)


@router.post("/v1/recognize/image", response_model=RecognizeResponse)
async def recognize_image(
    request: Request,
    state: State,
    keeper: Keeper,
    shop_id: ReadShop,
    file: Annotated[UploadFile | None, File(description="a still image (jpeg, png, webp, bmp); or the raw body")] = None,
    top_k: int = Query(5, ge=1, description="number of SKUs to return"),
    min_gallery_version: int = Query(0, ge=0, description=_MIN_VERSION_DOC),
    min_score: float | None = Query(None, ge=-1.0, le=1.0, description=_MIN_SCORE_DOC),
) -> RecognizeResponse:
    """Recognise the product in one still image."""
    _check(state, top_k)
    await _wait_for_gallery(state, min_gallery_version)
    data = await read_upload(file, request, state.settings.max_upload_bytes, "file")
    return await _answer(state, keeper, await state.pipeline.recognize_image(data, top_k, shop_id, min_score), "image", shop_id)
