"""Request pipeline: decode (thread pool) -> encode (batcher) -> clip embedding -> gallery search.

Both waiting rooms are bounded: at most `max_decode_pending` uploads wait for or sit in the
decoding pool, and the batcher bounds its frame queue; past either, the request gets 429 with
Retry-After instead of queueing into a timeout.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from index.gallery import Hit
from model.config import PreprocessConfig
from service.batcher import Batcher
from service.decode import DecodeLimits, decode_clip, decode_image
from service.errors import Overloaded
from service.metrics import Metrics
from service.replica import GalleryReplica


@dataclass
class Recognition:
    hits: list[Hit]
    gallery_version: int
    frames_used: int
    timings_ms: dict[str, float]


def clip_vector(frame_emb: np.ndarray) -> np.ndarray:
    """Mean of L2-normalised frame embeddings [N, D], L2-normalised again -> [D] (as model.encoder.clip_embedding)."""
    f = frame_emb / np.maximum(np.linalg.norm(frame_emb, axis=1, keepdims=True), 1e-12)
    m = f.mean(axis=0)
    return (m / max(float(np.linalg.norm(m)), 1e-12)).astype(np.float32)


class Pipeline:
    def __init__(
        self,
        batcher: Batcher,
        replica: GalleryReplica,
        preprocess: PreprocessConfig,
        limits: DecodeLimits,
        max_image_pixels: int,
        decode_threads: int,
        metrics: Metrics,
        max_decode_pending: int = 64,
    ) -> None:
        self.batcher = batcher
        self.replica = replica
        self.preprocess = preprocess
        self.limits = limits
        self.max_image_pixels = max_image_pixels
        self.metrics = metrics
        self.max_decode_pending = max_decode_pending
        self.decode_threads = decode_threads
        self._decode_pending = 0
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    @property
    def decode_pending(self) -> int:
        return self._decode_pending

    async def _run_decode(self, fn: Any, *args: Any) -> Any:
        """Run a decode on the pool; 429 when too many uploads are already waiting for it."""
        if self._decode_pending >= self.max_decode_pending:
            self.metrics.rejected.labels("decode").inc()
            # Each decode takes well under a second on typical clips; one round of the pool per second.
            wait = max(1, self._decode_pending // max(self.decode_threads, 1))
            raise Overloaded(f"{self._decode_pending} uploads are waiting to be decoded; retry later", headers={"Retry-After": str(wait)})
        self._decode_pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoder, self._timed_decode, fn, *args)
        finally:
            self._decode_pending -= 1

    def _timed_decode(self, fn: Any, *args: Any) -> Any:
        """On a pool thread: the decode histogram measures decoding, not waiting for a thread."""
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t)

    async def _embed(self, frames: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        t = time.perf_counter()
        try:
            emb = await self.batcher.submit(frames)
        except Overloaded:
            self.metrics.rejected.labels("encoder").inc()
            raise
        timings["encode"] = (time.perf_counter() - t) * 1e3  # includes the batcher's queue wait
        return emb

    async def embed_catalog_image(self, data: bytes) -> np.ndarray:
        """One catalog image (whole product, letterboxed) -> its L2-normalised embedding [D]."""
        frame = await self._run_decode(decode_image, data, self.preprocess, self.max_image_pixels, True)
        emb = await self._embed(frame[None], {})
        return clip_vector(emb)

    def _search(self, vec: np.ndarray, top_k: int, shop_id: str | None, timings: dict[str, float]) -> tuple[list[Hit], int]:
        t = time.perf_counter()
        hits, version = self.replica.search(vec[None], top_k, shop_id)
        timings["search"] = (time.perf_counter() - t) * 1e3
        self.metrics.stage_seconds.labels("search").observe(timings["search"] / 1e3)
        return hits[0], version

    async def recognize_clip(self, data: bytes, top_k: int, shop_id: str | None, num_frames: int) -> Recognition:
        started = time.perf_counter()
        clip = await self._run_decode(decode_clip, data, num_frames, self.preprocess, self.limits)
        return await self._recognize(clip.frames, top_k, shop_id, started)

    async def recognize_image(self, data: bytes, top_k: int, shop_id: str | None) -> Recognition:
        started = time.perf_counter()
        frame = await self._run_decode(decode_image, data, self.preprocess, self.max_image_pixels)
        return await self._recognize(frame[None], top_k, shop_id, started)

    async def _recognize(self, frames: np.ndarray, top_k: int, shop_id: str | None, started: float) -> Recognition:
        """Decoded frames [N, H, W, 3] -> top-k SKUs of their clip embedding, with per-stage timings."""
        timings = {"decode": (time.perf_counter() - started) * 1e3}
        emb = await self._embed(frames, timings)
        hits, version = self._search(clip_vector(emb), top_k, shop_id, timings)
        timings["total"] = (time.perf_counter() - started) * 1e3
        return Recognition(hits, version, len(frames), timings)
