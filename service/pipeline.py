"""Request pipeline: decode (thread pool) -> encode (batcher) -> clip embedding -> gallery search."""

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
    ) -> None:
        self.batcher = batcher
        self.replica = replica
        self.preprocess = preprocess
        self.limits = limits
        self.max_image_pixels = max_image_pixels
        self.metrics = metrics
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def _run_decode(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def _embed(self, frames: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        t = time.perf_counter()
        emb = await self.batcher.submit(frames)
        timings["encode"] = (time.perf_counter() - t) * 1e3  # includes the batcher's queue wait
        self.metrics.stage_seconds.labels("queue_encode").observe(timings["encode"] / 1e3)
        return emb

    async def embed_catalog_image(self, data: bytes) -> np.ndarray:
        """One catalog image (whole product, letterboxed) -> its L2-normalised embedding [D]."""
        t = time.perf_counter()
        frame = await self._run_decode(decode_image, data, self.preprocess, self.max_image_pixels, True)
        self.metrics.stage_seconds.labels("decode").observe(time.perf_counter() - t)
        emb = await self._embed(frame[None], {})
        return clip_vector(emb)

    def _search(self, vec: np.ndarray, top_k: int, shop_id: str | None, timings: dict[str, float]) -> tuple[list[Hit], int]:
        t = time.perf_counter()
        hits, version = self.replica.search(vec[None], top_k, shop_id)
        timings["search"] = (time.perf_counter() - t) * 1e3
        self.metrics.stage_seconds.labels("search").observe(timings["search"] / 1e3)
        return hits[0], version

    async def recognize_clip(self, data: bytes, top_k: int, shop_id: str | None, num_frames: int) -> Recognition:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        clip = await self._run_decode(decode_clip, data, num_frames, self.preprocess, self.limits)
        timings["decode"] = (time.perf_counter() - t) * 1e3
        self.metrics.stage_seconds.labels("decode").observe(timings["decode"] / 1e3)
        emb = await self._embed(clip.frames, timings)
        hits, version = self._search(clip_vector(emb), top_k, shop_id, timings)
        timings["total"] = (time.perf_counter() - t) * 1e3
        return Recognition(hits, version, len(clip.frames), timings)

    async def recognize_image(self, data: bytes, top_k: int, shop_id: str | None) -> Recognition:
        timings: dict[str, float] = {}
        t = time.perf_counter()
        frame = await self._run_decode(decode_image, data, self.preprocess, self.max_image_pixels)
        timings["decode"] = (time.perf_counter() - t) * 1e3
        emb = await self._embed(frame[None], timings)
        hits, version = self._search(clip_vector(emb), top_k, shop_id, timings)
        timings["total"] = (time.perf_counter() - t) * 1e3
        return Recognition(hits, version, 1, timings)
