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
from pipeline.decode import DecodeLimits, decode_clip, decode_image
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
    frame_emb: np.ndarray | None = None  # [N, D], after embed
    vector: np.ndarray | None = None  # [D] L2-normalised clip embedding, after embed
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

    def __init__(self, pool: DecodePool, preprocess: PreprocessConfig, limits: DecodeLimits, max_image_pixels: int) -> None:
        self.pool, self.preprocess, self.limits, self.max_image_pixels = pool, preprocess, limits, max_image_pixels

    def close(self) -> None:
        self.pool.close()

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
        q.hits, q.gallery_version = await self.batcher.search(q.vector, q.top_k, q.shop_id)


@dataclass(frozen=True)
class PipelineConfig:
    """What the pipeline itself decides (its stages take their own configs)."""

    match_threshold: float  # top-1 score from which an answer is a match (a request's min_score replaces it)
    preprocess: PreprocessConfig  # the served model's frame preparation (the timeline decoder uses it too)


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
        q = await self.run(Query("catalog", data))
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
        return self._answer(await self.run(q))

    async def recognize_image(self, data: bytes, top_k: int, shop_id: str | None, min_score: float | None = None) -> Recognition:
        return self._answer(await self.run(Query("image", data, top_k, shop_id, min_score=min_score)))

    def _answer(self, q: Query) -> Recognition:
        assert q.frames is not None
        threshold = self.match_threshold if q.min_score is None else q.min_score
        match = bool(q.hits) and q.hits[0].score >= threshold
        return Recognition(q.hits, q.gallery_version, len(q.frames), q.timings_ms, match, threshold)


_KINDS: tuple[Kind, ...] = ("clip", "image", "catalog", "window")
_S = TypeVar("_S")


def _one(stages: Sequence[Stage], cls: type[_S]) -> _S:
    found = [s for s in stages if isinstance(s, cls)]
    if len(found) != 1:
        raise ValueError(f"the stage list needs exactly one {cls.__name__} stage, got {len(found)}")
    return found[0]
