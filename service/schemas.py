"""Response models: the API contract, also published in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Box(BaseModel):
    frame: int = Field(description="index of the frame (among the frames_used) where the product was found")
    polygon: list[list[float]] = Field(description="the catalog image's corners [[x, y] x 4] in that frame's pixels")


class SkuResult(BaseModel):
    sku: str
    score: float = Field(
        description="the ranking score: the embedding score plus a bonus for geometric verification (RANSAC inliers); "
        "equals embedding_score when the SKU was not verified"
    )
    item_id: str = Field(description="the gallery image that matched best")
    shop_id: str | None
    metadata: dict[str, Any]
    embedding_score: float | None = Field(None, description="cosine similarity of the query to the SKU's best-matching image")
    inliers: int | None = Field(None, description="RANSAC inliers of the catalog image's local features in the best frame")
    coverage: float | None = Field(None, description="share of the catalog image's keypoint cells those inliers cover")
    frames_verified: int | None = Field(None, description="frames in which the catalog image was found")
    verifiable: bool | None = Field(None, description="whether the item has usable local features (false: featureless or bulk-imported)")
    box: Box | None = Field(None, description="where the product is, for a verified SKU")
    source: str = Field("catalog", description="the matched item's: catalog (an image with a thumbnail) or feedback (a confirmed answer)")


class RecognizeResponse(BaseModel):
    request_id: str = Field(description="this answer's id: send POST /v1/feedback with it (within RICE_FEEDBACK_RECORD_TTL_S)")
    results: list[SkuResult]
    match: bool = Field(
        description="whether the top result is the product shown: match_probability >= the served probability threshold "
        "(or, when the request sets min_score or no verdict ran, the top-1 score >= match_threshold); false means 'none of these'"
    )
    match_threshold: float = Field(
        description="the top-1 score threshold (min_score, else the model's); it decides match only without a verdict"
    )
    match_probability: float | None = Field(
        None, description="the calibrated probability (0..1) that the top result is the product shown (null when no verdict ran)"
    )
    gallery_version: int = Field(description="the gallery version this answer was searched in")
    model_version: str
    frames_used: int
    timings_ms: dict[str, float]


_SHARD_DOC = "the shard whose gallery the write went to, and whose version gallery_version is (0 unsharded)"


class ItemCreated(BaseModel):
    item_id: str
    sku: str
    shop_id: str | None
    gallery_version: int
    model_version: str
    shard: int = Field(0, description=_SHARD_DOC)


class BulkImported(BaseModel):
    imported: int
    gallery_version: int = Field(description="sharded, rows of several shards: this replica's shard's version, else the lowest shard's")
    gallery_versions: dict[int, int] | None = Field(
        None, description="sharded deployments only: the version each shard's part was stored under (read-your-writes per shard)"
    )


class Deleted(BaseModel):
    deleted: list[str] = Field(description="item ids removed")
    gallery_version: int
    shard: int = Field(0, description=_SHARD_DOC)


class GalleryStats(BaseModel):
    items: int
    skus: int
    shops: int
    dim: int
    gallery_version: int
    namespace: str = Field(description="the model version whose vectors are searched")
    index: str = Field(
        "exact",
        description="how unfiltered searches run: exact (float32 rows; also a compressed gallery's float16 rows while its "
        "first IVF-PQ index is built), ivf (IVF-Flat over float32 rows, past RICE_ANN_THRESHOLD), or ivf-pq (a compressed "
        "gallery past RICE_COMPRESS_THRESHOLD: float16 rows, IVF-PQ shortlist re-scored exactly)",
    )
    index_building: bool = Field(False, description="an approximate index is being trained in the background")


class GalleryItem(BaseModel):
    item_id: str
    sku: str
    shop_id: str | None
    metadata: dict[str, Any]
    source: str = Field("catalog", description="catalog (an ingested image) or feedback (a confirmed answer's clip vector, no image)")


class GalleryPage(BaseModel):
    total: int = Field(description="items matching the filters")
    offset: int
    limit: int
    items: list[GalleryItem] = Field(description="this page, in SKU then item id order")
    gallery_version: int
    namespace: str = Field(description="the model version whose gallery is listed")


class Alternative(BaseModel):
    sku: str
    score: float = Field(description="the SKU's mean window score over the segment")


class TimelineSegment(BaseModel):
    start_s: float
    end_s: float
    sku: str | None = Field(description="the product on screen; null where no product is confidently shown")
    score: float | None = Field(description="the SKU's mean window score over the segment")
    item_id: str | None = Field(description="the gallery image that matched best inside the segment")
    match: bool = Field(description="score >= match_threshold, the same rule as every recognition answer")
    alternatives: list[Alternative] = Field(description="the next best SKUs over the segment (for a null segment: the best ones)")


class TimelineResponse(BaseModel):
    request_id: str | None = Field(None, description="this answer's id for POST /v1/feedback (timeline requests; not jobs)")
    duration_s: float
    segments: list[TimelineSegment] = Field(description="in order, covering the whole recording")
    match_threshold: float
    gallery_version: int
    model_version: str
    frames_used: int = Field(description="frames sampled and embedded")
    windows: int = Field(description="windows searched before smoothing")
    timings_ms: dict[str, float] = Field(
        description="milliseconds per stage, each summed over the windows; windows run concurrently, so stage times "
        "can add up to more than total (the request's wall time)"
    )


class JobError(BaseModel):
    code: str
    message: str


class JobResponse(BaseModel):
    job_id: str
    status: str = Field(description="queued, running, done, failed or cancelled")
    progress: float = Field(description="0..1, the share of the recording processed")
    result: TimelineResponse | None = Field(None, description="the timeline, once done")
    error: JobError | None = Field(None, description="why the job failed")
    created_at: float
    updated_at: float


class FeedbackRequest(BaseModel):
    request_id: str = Field(description="the request_id of a recognition answer")
    sku: str | None = Field(None, description="correct: the top-1 (or null); wrong: the right SKU, or null if unknown; none_of_these: null")
    verdict: Literal["correct", "wrong", "none_of_these"]


class FeedbackRecorded(BaseModel):
    request_id: str
    verdict: str
    sku: str | None = Field(description="the SKU the verdict says was shown (null: none, or not said)")
    replaced: str | None = Field(description="the earlier verdict on this request that this one replaced")
    view_item_id: str | None = Field(description="the gallery view (source: feedback) this verdict added, under RICE_ENRICH")
    removed: list[str] = Field(description="feedback views removed: this request's earlier one, or the oldest past the per-SKU cap")
    gallery_version: int | None = Field(description="the gallery version after the enrichment write, when there was one")
