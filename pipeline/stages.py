"""The recognition pipeline as an explicit list of stages: decode -> embed -> search [-> re-rank].

Each stage reads and fills one `Query`; the pipeline runs them in order and times each. A stage
that needs more than the clip embedding (a re-ranker that wants the frames, the gallery hits or the
encoder's patch tokens) is appended to the list without touching the routes.

Nothing here blocks the event loop: decoding runs in the decode pool, encoding in the batcher's
worker, and gallery search on its own small thread pool (faiss releases the GIL, and the gallery's
readers-writer lock lets searches run side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from index.gallery import Hit
from index.replica import GalleryReplica
from model.config import PreprocessConfig
from model.encoder import pool_clip
from pipeline.batcher import Batcher, Priority
from pipeline.decode import DecodeLimits, decode_clip, decode_image
from pipeline.decode_pool import DecodePool
from pipeline.errors import Overloaded
from pipeline.keyframes import decode_keyframes
from pipeline.search_batcher import SearchBatcher

Kind = Literal["clip", "image", "catalog"]
Sampling = Literal["uniform", "keyframes"]  # which frames of a clip are decoded (pipeline.keyframes)
# The decode pool observes decoding (not waiting for a decoder); the batcher observes each encoder batch.
_OBSERVED_ELSEWHERE = frozenset({"decode", "encode"})


@dataclass
class Query:
    """One request as it moves through the stages."""

    kind: Kind
    data: bytes
    top_k: int = 5
    shop_id: str | None = None
    num_frames: int = 10
    sampling: Sampling = "uniform"
    min_score: float | None = None  # the request's match threshold; None = the model's
    priority: Priority = "interactive"  # timeline jobs embed in the background, behind clients
    frames: np.ndarray | None = None  # [N, H, W, 3] uint8, after decode
    frame_emb: np.ndarray | None = None  # [N, D], after embed
    vector: np.ndarray | None = None  # [D] L2-normalised clip embedding, after embed
    regions: np.ndarray | None = None  # [R, D] region vectors, when the region stage ran (pipeline.regions)
    hits: list[Hit] = field(default_factory=list)
    gallery_version: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Recognition:
    hits: list[Hit]
    gallery_version: int
    frames_used: int
    timings_ms: dict[str, float]
    match: bool  # the top hit scores at least `match_threshold`: "none of these" is a valid answer
    match_threshold: float
    vector: np.ndarray | None = None  # [D] the clip vector searched (kept for feedback, pipeline.feedback)
    frame_emb: np.ndarray | None = None  # [N, D] its frame embeddings
    frames: np.ndarray | None = None  # [N, H, W, 3] uint8 sampled frames
    regions: np.ndarray | None = None  # [R, D] region vectors (pipeline.regions), when that stage ran


class Stage(Protocol):
    """One step of the pipeline; `name` keys its timing in the answer and the stage histogram."""

    name: str

    async def __call__(self, q: Query) -> None: ...


def clip_vector(frame_emb: np.ndarray) -> np.ndarray:
    """Frame embeddings [N, D] -> the clip vector [D]: model.encoder.pool_clip, as in training."""
    return pool_clip(frame_emb)


class Decode:
    """Bytes -> frames [N, H, W, 3]: a clip sampled uniformly, a still, or a letterboxed catalog image."""

    name = "decode"

    def __init__(self, pool: DecodePool, preprocess: PreprocessConfig, limits: DecodeLimits, max_image_pixels: int) -> None:
        self.pool, self.preprocess, self.limits, self.max_image_pixels = pool, preprocess, limits, max_image_pixels

    async def __call__(self, q: Query) -> None:
        if q.kind == "clip":
            decode = decode_keyframes if q.sampling == "keyframes" else decode_clip
            clip = await self.pool.run(decode, q.data, q.num_frames, self.preprocess, self.limits)
            q.frames = clip.frames
        else:  # a catalog image shows the whole product: letterbox it rather than crop
            frame = await self.pool.run(decode_image, q.data, self.preprocess, self.max_image_pixels, q.kind == "catalog")
            q.frames = frame[None]


class Embed:
    """Frames -> frame embeddings through the shared batcher -> one clip vector."""

    name = "encode"  # includes the batcher's queue wait

    def __init__(self, batcher: Batcher, on_reject: Callable[[str], object]) -> None:
        self.batcher, self.on_reject = batcher, on_reject

    async def __call__(self, q: Query) -> None:
        assert q.frames is not None
        try:
            q.frame_emb = await self.batcher.submit(q.frames, q.priority)
        except Overloaded:
            self.on_reject("encoder")
            raise
        q.vector = clip_vector(q.frame_emb)


class Search:
    """Clip vector -> top-k SKUs of the shop's gallery, on a search thread (never on the event loop);
    concurrent requests' vectors are searched together (`pipeline.search_batcher`)."""

    name = "search"

    def __init__(self, replica: GalleryReplica, threads: int = 2, max_batch: int = 64) -> None:
        self.replica = replica
        self.batcher = SearchBatcher(replica.search, threads, max_batch)

    def close(self) -> None:
        self.batcher.close()

    async def __call__(self, q: Query) -> None:
        assert q.vector is not None
        q.hits, q.gallery_version = await self.batcher.search(q.vector, q.top_k, q.shop_id)


class Pipeline:
    """Runs the recognition stages in order; catalog images stop after embedding."""

    def __init__(
        self,
        batcher: Batcher,
        replica: GalleryReplica,
        preprocess: PreprocessConfig,
        limits: DecodeLimits,
        max_image_pixels: int,
        decode_pool: DecodePool,
        observe_stage: Callable[[str, float], object] = lambda name, seconds: None,
        on_reject: Callable[[str], object] = lambda where: None,
        search_threads: int = 2,
        search_max_batch: int = 64,
        extra_stages: Sequence[Stage] = (),
        match_threshold: float = 0.0,
        pooling_stages: Sequence[Stage] = (),
    ) -> None:
        self.batcher = batcher
        self.replica = replica
        self.preprocess = preprocess
        self.decode_pool = decode_pool
        self.observe_stage = observe_stage
        self.match_threshold = match_threshold
        self._search = Search(replica, search_threads, search_max_batch)
        self.embed_stage = Embed(batcher, on_reject)
        self.search_stage: Stage = self._search  # timelines embed and search window by window through these
        self.embedding: list[Stage] = [Decode(decode_pool, preprocess, limits, max_image_pixels), self.embed_stage]
        # pooling stages refine the clip vector before search (frame quality); extra stages refine the hits
        self.stages: list[Stage] = [*self.embedding, *pooling_stages, self._search, *extra_stages]
        self._closers = [s for s in [*pooling_stages, *extra_stages] if hasattr(s, "close")]

    def close(self) -> None:
        self.decode_pool.close()
        self._search.close()
        for stage in self._closers:
            stage.close()

    @property
    def decode_pending(self) -> int:
        return self.decode_pool.pending

    async def run(self, q: Query, stages: Sequence[Stage]) -> Query:
        started = time.perf_counter()
        for stage in stages:
            t = time.perf_counter()
            await stage(q)
            seconds = time.perf_counter() - t
            q.timings_ms[stage.name] = seconds * 1e3
            if stage.name not in _OBSERVED_ELSEWHERE:
                self.observe_stage(stage.name, seconds)
        q.timings_ms["total"] = (time.perf_counter() - started) * 1e3
        return q

    async def embed_catalog_image(self, data: bytes) -> np.ndarray:
        """One catalog image (whole product, letterboxed) -> its L2-normalised embedding [D]."""
        return (await self.embed_catalog(data))[0]

    async def embed_catalog(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """One catalog image -> (embedding [D], the letterboxed RGB frame [H, W, 3] it was made from,
        e.g. for a thumbnail: already decoded in the pool, so the upload is never decoded twice)."""
        q = await self.run(Query("catalog", data), self.embedding)
        assert q.vector is not None and q.frames is not None
        return q.vector, q.frames[0]

    async def recognize_clip(
        self,
        data: bytes,
        top_k: int,
        shop_id: str | None,
        num_frames: int,
        min_score: float | None = None,
        sampling: Sampling = "uniform",
    ) -> Recognition:
        q = Query("clip", data, top_k, shop_id, num_frames, sampling=sampling, min_score=min_score)
        return self._answer(await self.run(q, self.stages))

    async def recognize_image(self, data: bytes, top_k: int, shop_id: str | None, min_score: float | None = None) -> Recognition:
        return self._answer(await self.run(Query("image", data, top_k, shop_id, min_score=min_score), self.stages))

    def _answer(self, q: Query) -> Recognition:
        assert q.frames is not None
        threshold = self.match_threshold if q.min_score is None else q.min_score
        match = bool(q.hits) and q.hits[0].score >= threshold
        return Recognition(
            q.hits, q.gallery_version, len(q.frames), q.timings_ms, match, threshold, q.vector, q.frame_emb, q.frames, q.regions
        )
