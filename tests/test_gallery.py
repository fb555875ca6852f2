"""Unit tests of index.gallery.Gallery against a brute-force numpy oracle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from index.gallery import Gallery, Hit
from index.records import Record

SCORE_TOL = 1e-5


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@dataclass
class Catalog:
    """What was put in the gallery, kept aside for the oracle."""

    vectors: np.ndarray  # [N, D]
    item_ids: list[str]
    skus: list[str]
    shops: list[str | None]

    def records(self, version: int = 1) -> list[Record]:
        return [
            Record(self.item_ids[i], self.skus[i], self.shops[i], self.vectors[i], {"i": i}, version) for i in range(len(self.item_ids))
        ]


def make_catalog(seed: int, n_items: int, n_skus: int, dim: int, n_shops: int) -> Catalog:
    """Items assigned to random SKUs (so SKUs own several images); each SKU lives in one shop."""
    rng = np.random.default_rng(seed)
    sku_of_item = rng.integers(0, n_skus, size=n_items)
    shop_of_sku = rng.integers(0, n_shops, size=n_skus)
    return Catalog(
        vectors=unit_vectors(rng, n_items, dim),
        item_ids=[f"item-{i}" for i in range(n_items)],
        skus=[f"sku-{s}" for s in sku_of_item],
        shops=[f"shop-{shop_of_sku[s]}" for s in sku_of_item],
    )


def oracle(cat: Catalog, query: np.ndarray, k: int, shop_id: str | None = None) -> list[tuple[str, float, str]]:
    """(sku, score, best item_id) of the top-k SKUs: matrix product, best image per SKU, descending."""
    scores = cat.vectors @ query
    best: dict[str, tuple[float, str]] = {}
    for i, score in enumerate(scores.tolist()):
        if shop_id is not None and cat.shops[i] != shop_id:
            continue
        sku = cat.skus[i]
        if sku not in best or score > best[sku][0]:
            best[sku] = (score, cat.item_ids[i])
    ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
    return [(sku, score, item) for sku, (score, item) in ranked]


def assert_matches_oracle(hits: list[Hit], expected: list[tuple[str, float, str]]) -> None:
    """Same SKUs, same scores, same best image; robust to reordering of near-equal scores."""
    assert len(hits) == len(expected)
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=SCORE_TOL)
    by_sku = {sku: (score, item) for sku, score, item in expected}
    assert len({h.sku for h in hits}) == len(hits)
    for h in hits:
        if h.sku in by_sku:
            assert h.score == pytest.approx(by_sku[h.sku][0], abs=SCORE_TOL)
            assert h.item_id == by_sku[h.sku][1]
        else:  # only acceptable as a tie with the last oracle result
            assert h.score == pytest.approx(expected[-1][1], abs=SCORE_TOL)


def assert_well_formed(hits: list[Hit], k: int) -> None:
    assert len(hits) <= k
    assert len({h.sku for h in hits}) == len(hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def build(cat: Catalog, dim: int) -> Gallery:
    g = Gallery(dim)
    g.apply(cat.records())
    return g


@pytest.mark.parametrize(
    ("seed", "n_items", "n_skus", "n_shops", "k"),
    [
        (0, 50, 50, 3, 5),  # one image per SKU
        (1, 200, 30, 4, 10),  # several images per SKU
        (2, 120, 12, 3, 40),  # k larger than the number of SKUs
        (3, 300, 7, 2, 3),  # many images per SKU: the search must widen to find k SKUs
    ],
)
def test_search_matches_bruteforce_oracle(seed: int, n_items: int, n_skus: int, n_shops: int, k: int) -> None:
    dim = 16
    cat = make_catalog(seed, n_items, n_skus, dim, n_shops)
    g = build(cat, dim)
    queries = unit_vectors(np.random.default_rng(seed + 100), 8, dim)
    hits, version = g.search(queries, k)
    assert version == 1
    assert len(hits) == len(queries)
    for q, h in zip(queries, hits, strict=True):
        assert_well_formed(h, k)
        assert_matches_oracle(h, oracle(cat, q, k))
    for shop in sorted(set(cat.shops), key=str):
        shop_hits, _ = g.search(queries, k, shop_id=shop)
        for q, h in zip(queries, shop_hits, strict=True):
            assert_well_formed(h, k)
            assert all(hit.shop_id == shop for hit in h)
            assert_matches_oracle(h, oracle(cat, q, k, shop))


def test_hits_carry_item_metadata() -> None:
    dim = 8
    cat = make_catalog(4, 20, 20, dim, 2)
    g = build(cat, dim)
    (hits,), _ = g.search(cat.vectors[7], 3)
    assert hits[0].item_id == "item-7"
    assert hits[0].score == pytest.approx(1.0, abs=SCORE_TOL)
    assert hits[0].metadata == {"i": 7}
    assert hits[0].shop_id == cat.shops[7]


def test_k_larger_than_skus_returns_every_sku_once() -> None:
    dim = 8
    cat = make_catalog(5, 40, 6, dim, 1)
    g = build(cat, dim)
    (hits,), _ = g.search(unit_vectors(np.random.default_rng(9), 1, dim), 100)
    assert sorted(h.sku for h in hits) == sorted(set(cat.skus))
    assert_well_formed(hits, 100)


def test_unknown_shop_and_empty_gallery_return_nothing() -> None:
    dim = 8
    q = unit_vectors(np.random.default_rng(6), 3, dim)
    empty = Gallery(dim)
    assert empty.search(q, 5) == ([[], [], []], 0)
    assert empty.search(q, 5, shop_id="shop-0") == ([[], [], []], 0)
    g = build(make_catalog(6, 30, 10, dim, 2), dim)
    hits, _ = g.search(q, 5, shop_id="no-such-shop")
    assert hits == [[], [], []]
    hits, _ = g.search(q, 0)
    assert hits == [[], [], []]


def test_apply_is_idempotent() -> None:
    dim = 16
    cat = make_catalog(7, 150, 40, dim, 3)
    g = build(cat, dim)
    q = unit_vectors(np.random.default_rng(70), 5, dim)
    before = (g.search(q, 10), g.search(q, 10, shop_id="shop-1"), g.stats())
    g.apply(cat.records())
    g.apply(cat.records())
    after = (g.search(q, 10), g.search(q, 10, shop_id="shop-1"), g.stats())
    assert after == before
    assert len(g) == 150


def test_upsert_replaces_existing_item() -> None:
    dim = 8
    rng = np.random.default_rng(8)
    old, new, other = unit_vectors(rng, 3, dim)
    g = Gallery(dim)
    g.apply([Record("a", "sku-old", "shop-1", old, {"name": "old"}, 1), Record("b", "sku-b", "shop-1", other, {}, 2)])
    g.apply([Record("a", "sku-new", "shop-2", new, {"name": "new"}, 3)])

    assert len(g) == 2
    (hits,), version = g.search(old, 5)
    assert version == 3
    assert "sku-old" not in {h.sku for h in hits}  # the old vector/SKU is gone
    assert all(h.score < 1 - 1e-3 for h in hits)
    (hits,), _ = g.search(new, 1)
    assert [(h.sku, h.item_id, h.shop_id, h.metadata) for h in hits] == [("sku-new", "a", "shop-2", {"name": "new"})]
    assert hits[0].score == pytest.approx(1.0, abs=SCORE_TOL)
    (shop1,), _ = g.search(new, 5, shop_id="shop-1")
    assert [h.item_id for h in shop1] == ["b"]
    (shop2,), _ = g.search(old, 5, shop_id="shop-2")
    assert [h.sku for h in shop2] == ["sku-new"]
    assert g.stats() == {"items": 2, "skus": 2, "shops": 2, "dim": dim, "gallery_version": 3, "index": "exact", "index_building": False}


def test_tombstones_remove_items() -> None:
    dim = 16
    cat = make_catalog(9, 60, 20, dim, 2)
    g = build(cat, dim)
    gone = set(range(0, 60, 3))
    g.apply([Record(cat.item_ids[i], cat.skus[i], cat.shops[i], None, {}, 2, deleted=True) for i in sorted(gone)])
    # A tombstone for an item that was never there is harmless.
    g.apply([Record("never-existed", "x", None, None, {}, 3, deleted=True)])
    assert len(g) == 60 - len(gone)
    assert g.version == 3

    keep = [i for i in range(60) if i not in gone]
    rest = Catalog(cat.vectors[keep], [cat.item_ids[i] for i in keep], [cat.skus[i] for i in keep], [cat.shops[i] for i in keep])
    queries = np.concatenate([cat.vectors[sorted(gone)[:4]], unit_vectors(np.random.default_rng(90), 4, dim)])
    hits, _ = g.search(queries, 30)
    for q, h in zip(queries, hits, strict=True):
        assert not {x.item_id for x in h} & {cat.item_ids[i] for i in gone}
        assert_matches_oracle(h, oracle(rest, q, 30))
    for shop in ("shop-0", "shop-1"):
        shop_hits, _ = g.search(queries, 30, shop_id=shop)
        for q, h in zip(queries, shop_hits, strict=True):
            assert_matches_oracle(h, oracle(rest, q, 30, shop))


def test_deleting_every_item_of_a_shop_empties_it() -> None:
    dim = 8
    rng = np.random.default_rng(10)
    a, b = unit_vectors(rng, 2, dim)
    g = Gallery(dim)
    g.apply([Record("a", "s", "shop-1", a, {}, 1), Record("b", "t", "shop-2", b, {}, 2)])
    g.apply([Record("a", "s", "shop-1", None, {}, 3, deleted=True)])
    assert g.search(a, 5, shop_id="shop-1")[0] == [[]]
    assert g.stats()["shops"] == 1


def test_version_is_max_applied_record_version() -> None:
    dim = 4
    v = np.eye(dim, dtype=np.float32)
    g = Gallery(dim)
    assert g.version == 0
    g.apply([Record("a", "s", None, v[0], {}, 5), Record("b", "s", None, v[1], {}, 3)])
    assert g.version == 5
    g.apply([Record("a", "s", None, v[0], {}, 4)])  # an older record never lowers the version
    assert g.version == 5
    g.apply([Record("b", "s", None, None, {}, 9, deleted=True)])
    assert g.version == 9
    g.set_version(7)
    assert g.version == 9
    g.set_version(12)
    assert g.search(v[0], 1)[1] == 12
    assert g.stats()["gallery_version"] == 12


def test_dimension_mismatch_raises() -> None:
    g = Gallery(8)
    with pytest.raises(ValueError, match="dim"):
        g.apply([Record("a", "s", None, np.ones(4, dtype=np.float32) / 2, {}, 1)])
    assert len(g) == 0
    assert g.search(np.ones(8, dtype=np.float32), 3)[0] == [[]]


def test_rejected_upsert_keeps_existing_item() -> None:
    dim = 8
    v = unit_vectors(np.random.default_rng(11), 1, dim)[0]
    g = Gallery(dim)
    g.apply([Record("a", "s", "shop-1", v, {}, 1)])
    with pytest.raises(ValueError):
        g.apply([Record("a", "s", "shop-1", np.ones(dim + 1, dtype=np.float32), {}, 2)])
    assert len(g) == 1
    assert [h.item_id for h in g.search(v, 1)[0][0]] == ["a"]


def test_search_rejects_query_of_wrong_dimension() -> None:
    dim = 8
    g = build(make_catalog(12, 20, 10, dim, 1), dim)
    with pytest.raises(ValueError):
        g.search(np.ones((1, 2 * dim), dtype=np.float32), 3)


def test_large_gallery_per_shop_search_matches_oracle() -> None:
    dim, n_items, n_skus, n_shops = 64, 20_000, 5_000, 500
    cat = make_catalog(13, n_items, n_skus, dim, n_shops)
    g = build(cat, dim)
    assert g.stats() == {
        "items": n_items,
        "skus": len(set(cat.skus)),
        "shops": len(set(cat.shops)),
        "dim": dim,
        "gallery_version": 1,
        "index": "exact",
        "index_building": False,
    }

    rng = np.random.default_rng(130)
    queries = unit_vectors(rng, 6, dim)
    shops = np.asarray(cat.shops)
    scores = cat.vectors @ queries.T  # [N, Q]
    skus = np.asarray(cat.skus)
    k = 10
    all_shops = sorted({s for s in cat.shops if s is not None})
    for shop in [all_shops[i] for i in rng.choice(len(all_shops), size=8, replace=False).tolist()]:
        in_shop = np.flatnonzero(shops == shop)
        hits, _ = g.search(queries, k, shop_id=shop)
        for qi, h in enumerate(hits):
            assert_well_formed(h, k)
            order = in_shop[np.argsort(-scores[in_shop, qi], kind="stable")]
            best: dict[str, tuple[float, str]] = {}
            for i in order.tolist():
                best.setdefault(str(skus[i]), (float(scores[i, qi]), cat.item_ids[i]))
            expected = [(sku, s, item) for sku, (s, item) in list(best.items())[:k]]
            assert_matches_oracle(h, expected)
    # The unfiltered search agrees too.
    hits, _ = g.search(queries[:2], k)
    for q, h in zip(queries[:2], hits, strict=True):
        assert_matches_oracle(h, oracle(cat, q, k))
