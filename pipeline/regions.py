"""Find the product in the frame: multi-scale region crops scored against the gallery.

A livestream product often covers a fifth of the frame, beside other products and over a shelf;
the whole-frame embedding then describes the scene more than the product. This stage crops a
fixed grid of regions from a few of the clip's frames, embeds them through the shared batcher,
averages each region over those frames (the hand-held camera drifts little between them) and
searches the gallery with the whole-clip vector and every region vector at once. A SKU's score is
then the fusion of its whole-clip score and its best region score (max-pooling over regions).

It runs after `Search` on clips and timeline windows and replaces `q.hits`; the whole-clip vector is
unchanged. Its searches go through the search batcher (all of a query's vectors in one batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from index.errors import Overloaded
from index.gallery import Hit
from pipeline.batcher import Batcher
from pipeline.search_batcher import SearchBatcher
from pipeline.stages import Kind, Query, clip_vector

Fusion = Literal["max", "mean"]

# (crop side as a share of the frame side, crops per row). The default is two centred crops: a
# seller holds the product up near the middle of the frame, and on the livestream benchmark two
# centred crops (0.6 and 0.42 of the side) gave more R@1 than a 3x3 + 2x2 grid at a fraction of its
# cost; 3 frames of crops did as well as 5 (docs/RESULTS.md). Off-centre products need a grid ("0.5:3,0.7:2").
GRID: tuple[tuple[float, int], ...] = ((0.6, 1), (0.42, 1))


def parse_grid(text: str) -> tuple[tuple[float, int], ...]:
    """ "0.5:3,0.7:2" -> ((0.5, 3), (0.7, 2)): crop side share and crops per row, per scale."""
    grid = []
    for part in text.split(","):
        share, _, per_row = part.strip().partition(":")
        try:
            g = (float(share), int(per_row))
        except ValueError:
            raise ValueError(f"bad region grid {text!r}: expected e.g. '0.5:3,0.7:2'") from None
        if not (0 < g[0] <= 1 and 1 <= g[1] <= 8):
            raise ValueError(f"bad region grid {text!r}: side share in (0, 1], 1-8 crops per row")
        grid.append(g)
    return tuple(grid)


def region_boxes(size: int, grid: tuple[tuple[float, int], ...] = GRID) -> list[tuple[int, int, int]]:
    """(x, y, side) of every crop of a square frame of `size` pixels, evenly spaced per scale."""
    boxes = []
    for share, per_row in grid:
        side = round(size * share)
        starts = np.linspace(0, size - side, per_row).round().astype(int) if per_row > 1 else np.array([(size - side) // 2])
        boxes += [(int(x), int(y), side) for y in starts for x in starts]
    return boxes


def region_crops(frames: np.ndarray, boxes: list[tuple[int, int, int]]) -> np.ndarray:
    """frames [F, S, S, 3] uint8 -> crops [F * R, S, S, 3], each region resized back to the frame size
    (frame-major: row f * R + r is region r of frame f)."""
    f, s = frames.shape[0], frames.shape[1]
    out = np.empty((f * len(boxes), s, s, 3), np.uint8)
    for i, frame in enumerate(frames):
        for j, (x, y, side) in enumerate(boxes):
            out[i * len(boxes) + j] = cv2.resize(frame[y : y + side, x : x + side], (s, s), interpolation=cv2.INTER_LINEAR)
    return out


def fuse_hits(whole: list[Hit], regions: list[list[Hit]], top_k: int, fusion: Fusion) -> list[Hit]:
    """SKU hits of the whole clip and of each region -> top_k SKUs by fused score.

    "max": the best of the whole-clip and region scores. "mean": the mean of the whole-clip score and
    the best region score (a SKU missing from a list takes that list's lowest score: it ranked below it).
    """
    best_region: dict[tuple[str, str | None], Hit] = {}
    for hits in regions:
        for h in hits:
            key = (h.sku, h.shop_id)
            if key not in best_region or h.score > best_region[key].score:
                best_region[key] = h
    whole_by = {(h.sku, h.shop_id): h for h in whole}
    floor_whole = min((h.score for h in whole), default=0.0)
    floor_region = min((h.score for h in best_region.values()), default=floor_whole)
    fused: list[Hit] = []
    for key in whole_by.keys() | best_region.keys():
        w, r = whole_by.get(key), best_region.get(key)
        ws = w.score if w is not None else floor_whole
        rs = r.score if r is not None else floor_region
        score = max(ws, rs) if fusion == "max" else (ws + rs) / 2
        base = r if r is not None and (w is None or rs > ws) else w
        assert base is not None
        fused.append(Hit(base.sku, float(score), base.item_id, base.shop_id, base.metadata, base.source))
    fused.sort(key=lambda h: -h.score)
    return fused[:top_k]


def region_fusion(name: str) -> Fusion:
    """The fusion a setting names; ValueError for any other."""
    if name == "max":
        return "max"
    if name == "mean":
        return "mean"
    raise ValueError(f"unknown region fusion {name!r}; expected 'max' or 'mean'")


@dataclass(frozen=True)
class RegionConfig:
    """Region search settings (RICE_REGION_*)."""

    frames: int = 3  # frames of a clip whose crops are embedded (3 did as well as 5 on livebench)
    fusion: Fusion = "max"
    grid: tuple[tuple[float, int], ...] = GRID
    depth: int = 50  # SKUs searched per vector before fusion


class RegionSearch:
    """Re-scores a clip's gallery hits with region crops of `config.frames` of its frames (see the module doc)."""

    name = "regions"
    kinds: frozenset[Kind] = frozenset({"clip", "window"})

    def __init__(
        self,
        batcher: Batcher,
        search: SearchBatcher,
        config: RegionConfig,
        on_reject: Callable[[str], object] = lambda where: None,
        kinds: frozenset[Kind] = kinds,
    ) -> None:
        self.batcher, self.search, self.config, self.on_reject = batcher, search, config, on_reject
        self.kinds = kinds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regions")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, q: Query) -> None:
        if q.frames is None or q.vector is None or len(q.frames) == 0:
            return
        cfg = self.config
        picks = np.unique(np.linspace(0, len(q.frames) - 1, min(cfg.frames, len(q.frames))).round().astype(int))
        boxes = region_boxes(q.frames.shape[1], cfg.grid)
        loop = asyncio.get_running_loop()
        # resizing the crops takes a few milliseconds: off the event loop
        crops = await loop.run_in_executor(self._pool, region_crops, q.frames[picks], boxes)  # [F * R, S, S, 3]
        try:
            emb = await self.batcher.submit(crops, q.priority)  # [F * R, D]
        except Overloaded:
            self.on_reject("encoder")
            raise
        per_region = emb.reshape(len(picks), len(boxes), -1).transpose(1, 0, 2)  # [R, F, D]
        vectors = np.stack([q.vector, *(clip_vector(r) for r in per_region)])  # [1 + R, D]
        q.regions = vectors[1:]  # kept with the request: a feedback view may be a region (pipeline.feedback)
        k = max(q.top_k, q.search_k, cfg.depth)
        hits, q.gallery_version = await self.search.search_many(vectors, k, q.shop_id)
        q.hits = fuse_hits(hits[0], hits[1:], max(q.top_k, q.search_k), cfg.fusion)
