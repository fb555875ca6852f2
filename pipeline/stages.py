"""The recognition pipeline as one declared list of stages: decode -> embed [-> pool] -> search [-> re-rank].

Every request kind runs the same list: a clip, a still image, a catalog image (which stops after
embedding) and a timeline window (whose frames the timeline runner has already decoded and embedded
as a stream) each run, in order, the stages that declare their kind in `kinds`. So a stage added to
the list (`service.state.STAGES`) applies to every kind it names, without touching the routes or the
timeline runner, and its time shows in the answer's `timings_ms` under its `name`.

Nothing here blocks the event loop: decoding runs in the decode pool, encoding in the batcher's
worker, and gallery search on the search batcher's threads (faiss releases the GIL, and the
gallery's readers-writer lock lets searches run side by side).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import numpy as np

from index.errors import Overloaded
from index.gallery import Hit
from model.config import PreprocessConfig
from model.encoder import pool_clip
from pipeline.batcher import Batcher, Priority
from pipeline.catalog_views import catalog_views
from pipeline.decode import CatalogImage, DecodedImage, DecodeLimits, decode_catalog, decode_clip, decode_image, decode_image_view
from pipeline.decode_pool import DecodePool
from pipeline.keyframes import decode_keyframes
from pipeline.search_batcher import SearchBatcher

# "window": one window of a timeline, its frames already embedded by the timeline runner
Kind = Literal["clip", "image", "catalog", "window"]
Sampling = Literal["uniform", "keyframes"]  # which frames of a clip are decoded (pipeline.keyframes)
# The decode pool observes decoding (not waiting for a decoder); the batcher observes each encoder batch.
_OBSERVED_ELSEWHERE = frozenset({"decode", "encode"})


@dataclass
class Query:
    """One request (or one timeline window) as it moves through the stages."""

    kind: Kind
    data: bytes
    top_k: int = 5
    shop_id: str | None = None
    num_frames: int = 10
    sampling: Sampling = "uniform"
    min_score: float | None = None  # the request's match threshold; None = the model's
    priority: Priority = "interactive"  # timeline jobs embed in the background, behind clients
    frames: np.ndarray | None = None  # [N, H, W, 3] uint8, after decode
    views: np.ndarray | None = None  # [N, h, w] uint8 grey, larger than frames: for verification (view_side)
    view_scale: float = 1.0  # source pixels per view pixel
    catalog_features: bytes | None = None  # local features of a catalog upload (catalog kind)
    search_k: int = 0  # SKUs searched (and re-ranked) when more than top_k: verification needs candidates
    evidence: dict[str, dict[str, object]] = field(default_factory=dict)  # sku -> verification evidence
    match_probability: float | None = None  # the verdict, when a verification stage ran
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
    evidence: dict[str, dict[str, object]] = field(default_factory=dict)  # sku -> verification (pipeline.verify)
    match_probability: float | None = None  # the verdict (pipeline.verify), when verification ran
    vector: np.ndarray | None = None  # [D] the clip vector searched (kept for feedback, pipeline.feedback)
    frame_emb: np.ndarray | None = None  # [N, D] its frame embeddings
    frames: np.ndarray | None = None  # [N, H, W, 3] uint8 sampled frames
    regions: np.ndarray | None = None  # [R, D] region vectors (pipeline.regions), when that stage ran


class Stage(Protocol):
    """One step of the pipeline: `name` keys its timing in the answer and the stage histogram;
    `kinds` are the request kinds it runs for."""

    name: str
    kinds: frozenset[Kind]

    async def __call__(self, q: Query) -> None: ...


def clip_vector(frame_emb: np.ndarray) -> np.ndarray:
    """Frame embeddings [N, D] -> the clip vector [D]: model.encoder.pool_clip, as in training."""
    return pool_clip(frame_emb)


class Decode:
    """Bytes -> frames [N, H, W, 3]: a clip sampled uniformly, a still, or a letterboxed catalog image."""

    name = "decode"
    kinds: frozenset[Kind] = frozenset({"clip", "image", "catalog"})

    def __init__(
        self, pool: DecodePool, preprocess: PreprocessConfig, limits: DecodeLimits, max_image_pixels: int, view_side: int = 0
    ) -> None:
        self.pool, self.preprocess, self.limits, self.max_image_pixels = pool, preprocess, limits, max_image_pixels
        self.view_side = view_side  # > 0: also a grey view per frame at this long side (verification)

    def close(self) -> None:
        self.pool.close()

    async def __call__(self, q: Query) -> None:
        if q.kind == "clip":
            if q.sampling == "keyframes":
                clip = await self.pool.run(decode_keyframes, q.data, q.num_frames, self.preprocess, self.limits)
            else:
                clip = await self.pool.run(decode_clip, q.data, q.num_frames, self.preprocess, self.limits, self.view_side)
            q.frames, q.views = clip.frames, clip.views
            if clip.views is not None:
                q.view_scale = max(clip.width, clip.height) / max(clip.views.shape[1:3])
        elif q.kind == "catalog":  # a catalog image shows the whole product: letterbox it rather than crop
            cat: CatalogImage = await self.pool.run(decode_catalog, q.data, self.preprocess, self.max_image_pixels)
            q.frames, q.catalog_features = cat.frame[None], cat.features.tobytes()
        elif self.view_side:
            img: DecodedImage = await self.pool.run(decode_image_view, q.data, self.preprocess, self.max_image_pixels, self.view_side)
            q.frames, q.views, q.view_scale = img.frame[None], img.view[None], img.scale
        else:
            frame = await self.pool.run(decode_image, q.data, self.preprocess, self.max_image_pixels)
            q.frames = frame[None]


class Embed:
    """Frames -> frame embeddings through the shared batcher -> one clip vector."""

    name = "encode"  # includes the batcher's queue wait
    kinds: frozenset[Kind] = frozenset({"clip", "image", "catalog"})

    def __init__(self, batcher: Batcher, on_reject: Callable[[str], object]) -> None:
        self.batcher, self.on_reject = batcher, on_reject

    async def __call__(self, q: Query) -> None:
        assert q.frames is not None
        q.frame_emb = await self.embed(q.frames, q.priority)
        q.vector = clip_vector(q.frame_emb)

    async def embed(self, frames: np.ndarray, priority: Priority = "interactive") -> np.ndarray:
        """frames [N, H, W, 3] uint8 -> embeddings [N, D] (the timeline runner embeds its stream in chunks here)."""
        try:
            return await self.batcher.submit(frames, priority)
        except Overloaded:
            self.on_reject("encoder")
            raise


class Search:
    """Clip vector -> top-k SKUs of the shop's gallery through the search batcher: concurrent
    requests' vectors are searched together on its threads (`pipeline.search_batcher`)."""

    name = "search"
    kinds: frozenset[Kind] = frozenset({"clip", "image", "window"})

    def __init__(self, batcher: SearchBatcher) -> None:
        self.batcher = batcher

    async def __call__(self, q: Query) -> None:
        assert q.vector is not None
        q.hits, q.gallery_version = await self.batcher.search(q.vector, max(q.top_k, q.search_k), q.shop_id)


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline itself decides (its stages take their own configs)."""

    match_threshold: float  # top-1 score from which an answer is a match (a request's min_score replaces it)
    preprocess: PreprocessConfig  # the served model's frame preparation (the timeline decoder uses it too)
    match_probability: float = 0.5  # the verdict's threshold, when a verification stage gives a probability
    search_k: int = 0  # candidates a re-ranking stage (verification) looks at, beyond top_k


class Pipeline:
    """Runs, for each query, the stages of `stages` that apply to its kind, in order, timing each."""

    def __init__(
        self,
        stages: Sequence[Stage],
        config: PipelineConfig,
        observe_stage: Callable[[str, float], object] = lambda name, seconds: None,
    ) -> None:
        self.stages = list(stages)
        self.config = config
        self.observe_stage = observe_stage
        self._decode = _one(self.stages, Decode)
        self.embedder = _one(self.stages, Embed)  # the timeline runner embeds its frame stream here
        self._by_kind: dict[Kind, list[Stage]] = {k: [s for s in self.stages if k in s.kinds] for k in _KINDS}

    @property
    def match_threshold(self) -> float:
        return self.config.match_threshold

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.config.preprocess

    def stages_for(self, kind: Kind) -> list[Stage]:
        return self._by_kind[kind]

    def close(self) -> None:
        for stage in self.stages:
            close = getattr(stage, "close", None)
            if close is not None:
                close()

    @property
    def decode_pending(self) -> int:
        return self._decode.pool.pending

    async def run(self, q: Query) -> Query:
        started = time.perf_counter()
        for stage in self._by_kind[q.kind]:
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
        vector, frame, _ = await self.embed_catalog_item(data)
        return vector, frame

    async def embed_catalog_item(self, data: bytes) -> tuple[np.ndarray, np.ndarray, bytes]:
        """`embed_catalog`, plus the local features of the full-resolution upload (bytes for the store)."""
        q = await self.run(Query("catalog", data))
        assert q.vector is not None and q.frames is not None and q.catalog_features is not None
        return q.vector, q.frames[0], q.catalog_features

    async def embed_catalog_views(self, frame: np.ndarray, n: int) -> np.ndarray:
        """The letterboxed catalog frame [H, W, 3] -> embeddings [n, D] of its first n gallery-side views
        (`pipeline.catalog_views`), L2-normalised like every gallery vector."""
        if n <= 0:
            return np.zeros((0, 0), np.float32)
        emb = await self.embedder.embed(catalog_views(frame, n))
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)).astype(np.float32)

    async def recognize_clip(
        self,
        data: bytes,
        top_k: int,
        shop_id: str | None,
        num_frames: int,
        min_score: float | None = None,
        sampling: Sampling = "uniform",
    ) -> Recognition:
        q = Query("clip", data, top_k, shop_id, num_frames, sampling=sampling, min_score=min_score, search_k=self.config.search_k)
        return self._answer(await self.run(q))

    async def recognize_image(self, data: bytes, top_k: int, shop_id: str | None, min_score: float | None = None) -> Recognition:
        q = Query("image", data, top_k, shop_id, min_score=min_score, search_k=self.config.search_k)
        return self._answer(await self.run(q))

    def _answer(self, q: Query) -> Recognition:
        assert q.frames is not None
        threshold = self.match_threshold if q.min_score is None else q.min_score
        hits = q.hits[: q.top_k]
        if q.match_probability is not None and q.min_score is None:
            match = q.match_probability >= self.config.match_probability  # the verdict decides unless the client set min_score
        else:
            match = bool(hits) and hits[0].score >= threshold
        evidence = {h.sku: q.evidence[h.sku] for h in hits if h.sku in q.evidence}
        return Recognition(
            hits,
            q.gallery_version,
            len(q.frames),
            q.timings_ms,
            match,
            threshold,
            evidence,
            q.match_probability,
            q.vector,
            q.frame_emb,
            q.frames,
            q.regions,
        )


_KINDS: tuple[Kind, ...] = ("clip", "image", "catalog", "window")
_S = TypeVar("_S")


def _one(stages: Sequence[Stage], cls: type[_S]) -> _S:
    found = [s for s in stages if isinstance(s, cls)]
    if len(found) != 1:
        raise ValueError(f"the stage list needs exactly one {cls.__name__} stage, got {len(found)}")
    return found[0]
