"""Verification: check the top SKUs' catalog images against the frames with local features, re-rank,
localise the product, and give the verdict (`match_probability`).

Runs after search (and the region search) on clips and stills. For the top `top_k` SKUs it loads the
catalog features of each SKU's best-matching item (lazily, through a bounded LRU cache in front of the
gallery store), extracts SIFT features from the clip's `frames` best frames (the decode worker's grey
views, larger than the encoder's 224-pixel crops), and counts RANSAC inliers per SKU and frame. The
fused score is the embedding score plus a bonus that grows with the inliers above chance level, so a
SKU with strong geometric evidence moves up; `embedding_score` stays on each hit's evidence. A SKU
verified in some frame also gets a `box`: the catalog image's corners through the homography, in the
source frame's pixels. Finally `model.verdict` turns the evidence into one probability.

The matching is CPU work in OpenCV (which releases the GIL): it runs on a small thread pool, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from index.errors import StoreUnavailable
from index.gallery import Hit
from model.verdict import Candidate, VerdictModel, signals
from pipeline.local_features import MIN_INLIERS, LocalFeatures, Match, extract, match, root_sift
from pipeline.stages import Kind, Query

log = logging.getLogger("rice.verify")

# Fused score = embedding score + BONUS * clip((inliers - CHANCE) / SPAN, 0, 1): a wrong product's
# best catalog image still gets about 10 inliers by chance on grocery photos (bench/local_detectors.py),
# the right one about 20 or more.
BONUS = 0.3
CHANCE_INLIERS = 10
SPAN_INLIERS = 30


class FeatureCache:
    """item id -> parsed catalog features (or None: the item has none), LRU-bounded, entries kept
    `ttl_s` seconds (an item replaced on another replica keeps its id: its new features show after that)."""

    def __init__(self, fetch: Callable[[list[str]], dict[str, bytes]], max_items: int = 4096, ttl_s: float = 60.0) -> None:
        self.fetch, self.max_items, self.ttl_s = fetch, max_items, ttl_s
        self._items: OrderedDict[str, tuple[float, LocalFeatures | None]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, item_ids: list[str]) -> dict[str, LocalFeatures | None]:
        """Features of each id (None when the item has none); misses fetched from the store in one call. Blocking."""
        now = time.monotonic()
        out: dict[str, LocalFeatures | None] = {}
        with self._lock:
            for i in item_ids:
                got = self._items.get(i)
                if got is not None and now - got[0] < self.ttl_s:
                    self._items.move_to_end(i)
                    out[i] = got[1]
        missing = [i for i in dict.fromkeys(item_ids) if i not in out]
        if missing:
            raw = self.fetch(missing)
            with self._lock:
                for i in missing:
                    feats = None
                    if i in raw:
                        try:
                            feats = LocalFeatures.from_bytes(raw[i])
                        except ValueError:
                            log.warning("unreadable local features for item %s: ignored", i)
                    out[i] = feats
                    self._items[i] = (now, feats)
                    self._items.move_to_end(i)
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
        return out


@dataclass
class _Evidence:
    inliers: int = 0
    coverage: float = 0.0
    inlier_ratio: float = 0.0
    frames_verified: int = 0
    frame: int | None = None  # index in the clip's frames of the best match
    box: list[list[float]] | None = None


def pick_frames(q: Query, n: int) -> np.ndarray:
    """Indices of the `n` frames most like the clip as a whole (the product in view, not the intro)."""
    assert q.frames is not None
    if q.frame_emb is None or q.vector is None or len(q.frames) <= n:
        return np.arange(min(n, len(q.frames)))
    return np.sort(np.argsort(-(q.frame_emb @ q.vector))[:n])


def _verify(views: np.ndarray, catalog: list[LocalFeatures | None], view_scale: float | None, min_side: int = 0) -> list[_Evidence]:
    """Grey views [F, h, w] x catalog features per candidate -> evidence per candidate. Blocking (OpenCV).
    `view_scale`: source pixels per view pixel; None when the views are not the source frames (no box).
    `min_side`: a view with a shorter long side is upscaled to it before detection (points stay in the
    view's pixels): SIFT finds more of a product 80-120 px wide at twice the size."""
    out = [_Evidence() for _ in catalog]
    if not any(c is not None and not c.featureless for c in catalog):
        return out
    for f, view in enumerate(views):
        query = extract(view, min_side=min_side)
        q_root = root_sift(query.descriptors)
        for ev, cat in zip(out, catalog, strict=True):
            if cat is None or cat.featureless:
                continue
            m: Match = match(query, cat, q_root)
            if m.homography is not None and m.inliers >= MIN_INLIERS:
                ev.frames_verified += 1
            if m.inliers > ev.inliers:
                ev.inliers, ev.coverage, ev.inlier_ratio, ev.frame = m.inliers, m.coverage, m.inlier_ratio, f
                if view_scale is not None:
                    ev.box = [[round(x * view_scale, 1), round(y * view_scale, 1)] for x, y in m.box(cat.width, cat.height)]
    return out


def candidates_from_results(results: list[dict[str, object]], frames_checked: int) -> list[Candidate]:
    """An answer's `results` (JSON, with verification evidence) -> the verdict's candidates, in rank order:
    what `Verify` computed, rebuilt by a client or a benchmark from the answer alone."""

    def num(r: dict[str, object], key: str, default: float) -> float:
        v = r.get(key)
        return float(v) if isinstance(v, (int, float)) else default

    return [
        Candidate(
            num(r, "embedding_score", num(r, "score", 0.0)),
            int(num(r, "inliers", 0)),
            num(r, "coverage", 0.0),
            num(r, "frames_verified", 0) / max(frames_checked, 1),
            bool(r.get("verifiable")),
        )
        for r in results
    ]


def fused_score(embedding_score: float, inliers: int) -> float:
    return embedding_score + BONUS * float(np.clip((inliers - CHANCE_INLIERS) / SPAN_INLIERS, 0.0, 1.0))


class Verify:
    """The verification stage (see the module docstring)."""

    name = "verify"
    kinds: frozenset[Kind] = frozenset({"clip", "image"})

    def __init__(
        self,
        cache: FeatureCache,
        verdict: VerdictModel | None,
        top_k: int = 10,
        frames: int = 3,
        geometric: bool = True,
        threads: int = 2,
        min_side: int = 0,
    ) -> None:
        self.cache, self.verdict, self.top_k, self.frames, self.geometric = cache, verdict, top_k, frames, geometric
        self.min_side = min_side
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="verify")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, q: Query) -> None:
        if q.kind not in self.kinds or not q.hits or q.frames is None:
            return
        cands = q.hits[: self.top_k]
        loop = asyncio.get_running_loop()
        evidence = [_Evidence() for _ in cands]
        catalog: dict[str, LocalFeatures | None] = {}
        picks = pick_frames(q, self.frames)
        if self.geometric:
            try:
                catalog = await loop.run_in_executor(self._pool, self.cache.get, [h.item_id for h in cands])
            except StoreUnavailable as exc:  # the local index still answers: rank by the embedding alone
                log.warning("local features unavailable, answering without verification: %s", exc)
            # keyframe sampling decodes no views: verify on the encoder's centre crops, which are not the
            # source frame's pixels, so no box
            views, scale = (q.views, q.view_scale) if q.views is not None else (q.frames.mean(axis=3).astype(np.uint8), None)
            evidence = await loop.run_in_executor(
                self._pool, _verify, views[picks], [catalog.get(h.item_id) for h in cands], scale, self.min_side
            )
        ranked = sorted(zip(cands, evidence, strict=True), key=lambda he: -fused_score(he[0].score, he[1].inliers))
        checked = max(len(picks), 1)
        candidates = []
        q.evidence = {}
        for h, ev in ranked:
            feats = catalog.get(h.item_id)
            verifiable = feats is not None and not feats.featureless
            candidates.append(Candidate(h.score, ev.inliers, ev.coverage, ev.frames_verified / checked, verifiable))
            q.evidence[h.sku] = {
                "embedding_score": round(h.score, 6),
                "inliers": ev.inliers,
                "coverage": round(ev.coverage, 4),
                "inlier_ratio": round(ev.inlier_ratio, 4),
                "frames_verified": ev.frames_verified,
                "verifiable": verifiable,
                "box": {"frame": int(picks[ev.frame]), "polygon": ev.box} if ev.box is not None and ev.frame is not None else None,
            }
        q.hits = [
            Hit(h.sku, round(fused_score(h.score, ev.inliers), 6), h.item_id, h.shop_id, h.metadata, h.source) for h, ev in ranked
        ] + q.hits[self.top_k :]
        if self.verdict is not None:
            q.match_probability = float(self.verdict.probability(signals(candidates)))
