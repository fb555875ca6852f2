"""Which product was on screen when: windows over a recording and their temporal smoothing.

Pure functions, no I/O: `window_grid` lays windows over the recording, `windows_of` says which
windows a sampled frame belongs to, `cell_bounds` which part of the recording each window speaks
for, and `smooth` turns each window's top SKUs into segments.

Smoothing is a Viterbi pass over an HMM whose states are "no product" plus every SKU that ranked
in any window. A window gains 0 for "no product" and, for a SKU, the smallest of three margins:
its score above a floor (`min_score`); above the window's background (the median score of the
window's other candidates) less `min_contrast`; and above the SKU's own absent level (its median
score in the windows where another SKU ranks first) less `min_lift`. Every change of state costs
`switch_cost`. The last two tell an empty room from a product: an encoder scores a room that
vaguely resembles every product above any fixed floor, but there no SKU stands out from the
others, nor from what it scores the rest of the time. Each segment then gets the verdict every
recognition answer gets: `match` when its score clears the match threshold.

The best path is the segmentation: a product is on screen where it clears both margins, and a
single window that flickers to another SKU (or dips below them) costs more to switch to and back
than it gains, so it is absorbed. A per-window argmax has no such memory and fragments every hand
movement into segments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One SKU's best image in one window."""

    sku: str
    score: float
    item_id: str


@dataclass(frozen=True)
class WindowHits:
    """A window's top SKUs, best first (as the gallery search returned them)."""

    start_s: float
    end_s: float
    hits: Sequence[Candidate]


@dataclass(frozen=True)
class Segment:
    """A stretch of the recording showing one product (`sku`), or none (`sku` None)."""

    start_s: float
    end_s: float
    sku: str | None
    score: float | None  # the SKU's mean window score over the segment; None when no product
    item_id: str | None  # the gallery image that matched best inside the segment
    match: bool  # score >= the match threshold (the same rule as every recognition answer)
    alternatives: list[tuple[str, float]]  # the next best SKUs by mean score over the segment


def window_grid(duration_s: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """Window (start, end) times covering [0, duration_s]. With overlapping windows the last one
    starts where it still adds something: no window lies wholly inside the one before it."""
    if window_s <= 0 or stride_s <= 0:
        raise ValueError("window_s and stride_s must be positive")
    if stride_s > window_s:
        raise ValueError("stride_s must not exceed window_s, or parts of the recording fall between windows")
    n = 1 if duration_s <= window_s else math.ceil((duration_s - window_s) / stride_s - 1e-9) + 1
    return [(k * stride_s, min(k * stride_s + window_s, duration_s)) for k in range(n)]


def windows_of(t: float, window_s: float, stride_s: float, n_windows: int) -> range:
    """Indices of the windows [k*stride, k*stride + window) that contain time `t`; a frame past the
    last window's end (a recording longer than its header said) belongs to the last window."""
    first = max(0, math.floor((t - window_s) / stride_s) + 1)
    last = min(n_windows - 1, math.floor(t / stride_s))
    if first > n_windows - 1:
        return range(n_windows - 1, n_windows)
    return range(first, last + 1)


def cell_bounds(n_windows: int, window_s: float, stride_s: float, duration_s: float) -> list[tuple[float, float]]:
    """The part of the recording each window speaks for: the span around its centre, between the
    midpoints to its neighbours' centres (with stride = window, the window itself). The first
    starts at 0 and the last ends at `duration_s`, so the cells tile the recording."""
    edges = [k * stride_s + window_s / 2 + stride_s / 2 for k in range(n_windows - 1)]
    starts = [0.0, *edges]
    ends = [*edges, duration_s]
    return [(min(s, duration_s), max(min(e, duration_s), min(s, duration_s))) for s, e in zip(starts, ends, strict=True)]


def _score_matrix(windows: Sequence[WindowHits]) -> tuple[list[str], np.ndarray]:
    """SKUs seen in any window, and scores [W, S]. A SKU outside a window's top list scored at most
    that window's last listed score; that bound stands in for it (a window without hits: -1)."""
    skus = sorted({c.sku for w in windows for c in w.hits})
    col = {s: i for i, s in enumerate(skus)}
    scores = np.empty((len(windows), len(skus)), dtype=np.float64)  # [W, S]
    for i, w in enumerate(windows):
        scores[i] = min((c.score for c in w.hits), default=-1.0)
        for c in w.hits:
            scores[i, col[c.sku]] = c.score
    return skus, scores


def viterbi(gains: np.ndarray, switch_cost: float) -> np.ndarray:
    """The state path maximising sum(gains[w, path[w]]) - switch_cost * (number of changes).
    gains: [W, S] -> path [W] of state indices. O(W x S): the best predecessor of a state is
    either itself or the best state overall, paying one switch."""
    n_windows, n_states = gains.shape
    back = np.empty((n_windows, n_states), dtype=np.int32)  # [W, S]
    value = gains[0].copy()
    back[0] = np.arange(n_states)
    for w in range(1, n_windows):
        best = int(np.argmax(value))
        switch = value[best] - switch_cost
        stay = value >= switch
        back[w] = np.where(stay, np.arange(n_states), best)
        value = np.where(stay, value, switch) + gains[w]
    path = np.empty(n_windows, dtype=np.int32)
    path[-1] = int(np.argmax(value))
    for w in range(n_windows - 1, 0, -1):
        path[w - 1] = back[w, path[w]]
    return path


def background(hits: Sequence[Candidate]) -> float | None:
    """The median score of a window's candidates after the best one; None with fewer than two of
    them (a tiny gallery has no background to stand out from)."""
    rest = sorted((c.score for c in hits), reverse=True)[1:]
    return float(np.median(rest)) if len(rest) >= 2 else None


def absent_levels(scores: np.ndarray, min_windows: int = 3) -> np.ndarray:
    """Per SKU, its median score [S] over the windows where another SKU ranks first: what it scores
    when it is not on screen. -inf (no such term) with fewer than `min_windows` of them, e.g. for
    the one product of a recording that shows nothing else."""
    out = np.full(scores.shape[1], -np.inf)
    if scores.size == 0:  # an empty gallery: no SKU at all
        return out
    best = scores.argmax(axis=1)  # [W]
    for s in range(scores.shape[1]):
        other = scores[best != s, s]
        if len(other) >= min_windows:
            out[s] = float(np.median(other))
    return out


def smooth(
    windows: Sequence[WindowHits],
    cells: Sequence[tuple[float, float]],
    threshold: float,
    switch_cost: float,
    top_k: int,
    min_contrast: float = 0.0,
    min_lift: float | None = None,
    min_score: float | None = None,
) -> list[Segment]:
    """Window hits -> segments covering every cell in order (adjacent windows of one state merged).

    `threshold` is the match threshold (each segment's `match` verdict); `min_score` the floor a
    SKU must clear to be on screen at all (default: the threshold); `switch_cost` the price of a
    change of product, in score units; `min_contrast` how far a SKU must score above the window's
    background; `min_lift` how far above its own absent level (None: no such term); `top_k`
    bounds the SKU plus its alternatives per segment."""
    if len(windows) != len(cells):
        raise ValueError("one cell per window")
    if not windows:
        return []
    skus, scores = _score_matrix(windows)
    floor = np.array([[b if (b := background(w.hits)) is not None else -np.inf] for w in windows])  # [W, 1]
    lowest = threshold if min_score is None else min_score
    margin = np.minimum(scores - lowest, scores - floor - min_contrast)  # [W, S]
    if min_lift is not None:
        margin = np.minimum(margin, scores - absent_levels(scores)[None, :] - min_lift)
    gains = np.concatenate([np.zeros((len(windows), 1)), margin], axis=1)  # [W, 1 + S]: 0 = no product
    path = viterbi(gains, switch_cost)
    out: list[Segment] = []
    start = 0
    for w in range(1, len(windows) + 1):
        if w == len(windows) or path[w] != path[start]:
            out.append(
                _segment(windows[start:w], cells[start][0], cells[w - 1][1], skus, scores[start:w], int(path[start]), threshold, top_k)
            )
            start = w
    return out


def _segment(
    windows: Sequence[WindowHits],
    start_s: float,
    end_s: float,
    skus: list[str],
    scores: np.ndarray,
    state: int,
    threshold: float,
    top_k: int,
) -> Segment:
    mean = scores.mean(axis=0) if len(skus) else np.zeros(0)  # [S]
    order = [int(i) for i in np.argsort(-mean, kind="stable")]
    if state == 0:
        alternatives = [(skus[i], round(float(mean[i]), 4)) for i in order[:top_k]]
        return Segment(round(start_s, 3), round(end_s, 3), None, None, None, False, alternatives)
    chosen = skus[state - 1]
    score = float(mean[state - 1])
    best = max((c for w in windows for c in w.hits if c.sku == chosen), key=lambda c: c.score, default=None)
    alternatives = [(skus[i], round(float(mean[i]), 4)) for i in order if i != state - 1][: max(0, top_k - 1)]
    item_id = best.item_id if best is not None else None
    return Segment(round(start_s, 3), round(end_s, 3), chosen, round(score, 4), item_id, score >= threshold, alternatives)
