"""The approximate (IVF) index: recall against exact search, background build with writes going
on, atomic swap, and per-shop search staying exact."""

from __future__ import annotations

import numpy as np
import pytest

from index.ann import AnnConfig
from index.gallery import Gallery
from index.records import Record


def clustered(seed: int, n: int, dim: int, centers: int = 256, noise: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres: embeddings of products cluster by kind, so does this."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    v = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def records(vectors: np.ndarray, start: int = 0, shops: int = 1000) -> list[Record]:
    return [Record(f"i{start + i}", f"sku{start + i}", f"shop{(start + i) % shops}", v, version=1) for i, v in enumerate(vectors)]


def recall_at(approx: list[list[str]], exact: list[list[str]]) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)]))


@pytest.mark.slow
def test_ivf_recall_at_10_against_exact_and_updates_in_place() -> None:
    dim, n = 64, 30_000
    vecs = clustered(0, n, dim)
    exact = Gallery(dim, AnnConfig(enabled=False))
    approx = Gallery(dim, AnnConfig(threshold=10_000))
    exact.apply(records(vecs[:20_000]))
    approx.apply(records(vecs[:20_000]))  # crosses the threshold: a build starts in the background
    approx.apply(records(vecs[20_000:], start=20_000))  # writes during the build are replayed before the swap
    approx.apply([Record("i5", "", None, None, version=2, deleted=True)])
    exact.apply(records(vecs[20_000:], start=20_000))
    exact.apply([Record("i5", "", None, None, version=2, deleted=True)])
    assert approx.wait_for_index(120) and approx.approximate and not exact.approximate

    queries = clustered(1, 200, dim)
    a, va = approx.search(queries, 10)
    e, ve = exact.search(queries, 10)
    assert va == ve == 2
    recall = recall_at([[h.sku for h in r] for r in a], [[h.sku for h in r] for r in e])
    assert recall >= 0.95, recall
    assert all("sku5" not in [h.sku for h in r] for r in a)

    # In-place updates after the swap: a moved item is found at its new place, a deleted one never.
    target = queries[0]
    approx.apply([Record("i7", "sku7", "shop7", target, version=3)])
    approx.apply([Record("i9", "", None, None, version=4, deleted=True)])
    hits, version = approx.search(target[None], 10)
    assert version == 4 and hits[0][0].item_id == "i7" and hits[0][0].score == pytest.approx(1.0, abs=1e-5)
    assert len(approx) == n - 2

    # Per-shop search stays exact with a thousand shops (gather over the shop's rows only).
    exact.apply([Record("i7", "sku7", "shop7", target, version=3), Record("i9", "", None, None, version=4, deleted=True)])
    for shop in ("shop7", "shop123", "shop999"):
        approx_shop, _ = approx.search(queries[:5], 5, shop)
        exact_shop, _ = exact.search(queries[:5], 5, shop)
        assert [[h.item_id for h in r] for r in approx_shop] == [[h.item_id for h in r] for r in exact_shop]
        assert all(h.shop_id == shop for r in approx_shop for h in r)


def test_small_gallery_stays_exact_and_large_shop_uses_selector() -> None:
    dim = 16
    vecs = clustered(2, 600, dim, centers=8)
    g = Gallery(dim, AnnConfig(threshold=10_000), exact_shop_max=10)  # shops above 10 items use the selector path
    g.apply(records(vecs, shops=3))
    assert not g.approximate
    oracle = Gallery(dim, exact_shop_max=10**9)
    oracle.apply(records(vecs, shops=3))
    q = clustered(3, 4, dim, centers=8)
    for shop in ("shop0", "shop2", None):
        a, _ = g.search(q, 7, shop)
        b, _ = oracle.search(q, 7, shop)
        assert [[h.item_id for h in r] for r in a] == [[h.item_id for h in r] for r in b]


def test_lists_scale_with_gallery_size() -> None:
    cfg = AnnConfig()
    assert cfg.lists_for(10_000) == 256 and cfg.lists_for(1_000_000) == 2048 and cfg.lists_for(10**9) == 4096
    assert AnnConfig(nlist=100).lists_for(10**6) == 100
