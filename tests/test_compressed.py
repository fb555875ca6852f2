"""The compressed gallery (past `AnnConfig.compress_threshold`): float16 rows + an IVF-PQ shortlist
re-scored exactly, checked against a numpy oracle over the same float16-rounded vectors, through
a bulk import that crosses the threshold, deletes, re-adds, shop filters and SKU aggregation."""

from __future__ import annotations

import gc
import io
import tarfile
from typing import Any

import numpy as np
import pytest

from index.ann import AnnConfig
from index.bulk import VECTORS, BulkItem, Manifest, export_tar, read_vectors
from index.gallery import Gallery, Hit
from index.halfstore import HalfRows, HalfStore
from index.records import Record
from service.schemas import GalleryStats
from service.settings import Settings

DIM = 128


CENTERS = np.random.default_rng(42).standard_normal((64, DIM)).astype(np.float32)  # gallery and queries share them


def clustered(rng: np.random.Generator, n: int, noise: float = 0.35) -> np.ndarray:
    """Unit vectors around shared centres: embeddings of products cluster by kind, so does this."""
    v = CENTERS[rng.integers(0, len(CENTERS), n)] + noise * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class Oracle:
    """What the gallery holds, searched by brute force over float16-rounded vectors."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[str, str, np.ndarray]] = {}  # item_id -> (sku, shop, vector)

    def apply(self, records: list[Record]) -> None:
        for r in records:
            self.items.pop(r.item_id, None)
            if not r.deleted:
                assert r.vector is not None and r.shop_id is not None
                self.items[r.item_id] = (r.sku, r.shop_id, np.asarray(r.vector, np.float32).astype(np.float16).astype(np.float32))

    def search(self, q: np.ndarray, k: int, shop: str | None = None) -> list[tuple[str, float, str]]:
        ids = [i for i, (_, s, _) in self.items.items() if shop is None or s == shop]
        scores = np.stack([self.items[i][2] for i in ids]) @ q
        best: dict[str, tuple[float, str]] = {}
        for i, score in zip(ids, scores.tolist(), strict=True):
            sku = self.items[i][0]
            if sku not in best or score > best[sku][0]:
                best[sku] = (score, i)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
        return [(sku, score, item) for sku, (score, item) in ranked]


def records(vecs: np.ndarray, start: int, version: int, skus: int = 1500, shops: int = 40) -> list[Record]:
    """Items share SKUs (about 3 images each), each SKU lives in one shop."""
    out = []
    for i, v in enumerate(vecs, start):
        sku = i % skus
        out.append(Record(f"i{i}", f"sku{sku}", f"shop{sku % shops}", v, {"n": i}, version))
    return out


def same_as_oracle(hits: list[Hit], expected: list[tuple[str, float, str]]) -> None:
    assert [h.sku for h in hits] == [e[0] for e in expected]
    assert [h.item_id for h in hits] == [e[2] for e in expected]  # the SKU's best image
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=1e-5)


def recall(hits: list[list[Hit]], expected: list[list[tuple[str, float, str]]]) -> float:
    return float(np.mean([len({h.sku for h in h_} & {e[0] for e in e_}) / len(e_) for h_, e_ in zip(hits, expected, strict=True)]))


@pytest.mark.slow
def test_compressed_gallery_against_the_oracle_through_growth_deletes_and_shrinking() -> None:
    rng = np.random.default_rng(0)
    cfg = AnnConfig(threshold=2_000, compress_threshold=3_000, nprobe=16)
    g, oracle = Gallery(DIM, cfg, exact_shop_max=300, apply_chunk=500), Oracle()  # shops hold ~150 items
    first = records(clustered(rng, 4_000), 0, 1)
    g.apply(first)  # one bulk import crossing the threshold mid-way: compressed from the chunk that crossed it
    oracle.apply(first)
    assert g.compressed and g._flat is None  # no float32 copy of the rows stays resident
    assert g._half is not None and g._half.nbytes == 4_000 * DIM * 2

    # Writes while the IVF-PQ index trains in the background: more items, deletes, moved items, re-adds.
    changes = records(clustered(rng, 2_000), 4_000, 2)
    changes += [Record(f"i{i}", "", None, None, version=2, deleted=True) for i in range(0, 600, 3)]
    changes += records(clustered(rng, 50), 100, 2)  # i100..i149 re-added (some were deleted just above) with new vectors
    g.apply(changes)
    oracle.apply(changes)
    assert g.wait_for_index(120) and g.approximate and g.stats()["index"] == "ivf-pq"
    assert len(g) == len(oracle.items)

    queries = clustered(np.random.default_rng(1), 100)
    hits, version = g.search(queries, 10)
    expected = [oracle.search(q, 10) for q in queries]
    assert version == 2 and recall(hits, expected) >= 0.95
    for h_, e_ in zip(hits, expected, strict=True):  # re-scored exactly: a found SKU has its oracle score
        by_sku = {e[0]: e[1] for e in e_}
        assert all(abs(h.score - by_sku[h.sku]) < 1e-5 for h in h_ if h.sku in by_sku)
        assert len({h.sku for h in h_}) == len(h_) == 10
    deleted = {f"i{i}" for i in range(0, 600, 3)} - {f"i{i}" for i in range(100, 150)}
    assert not deleted & {h.item_id for r in hits for h in r}

    # An item moved onto a query after the swap is found first, at (float16) score 1.
    g.apply([Record("i7", "moved", "shop7", queries[0], version=3)])
    oracle.apply([Record("i7", "moved", "shop7", queries[0], version=3)])
    top, _ = g.search(queries[0], 5)
    assert top[0][0].item_id == "i7" and top[0][0].score == pytest.approx(1.0, abs=2e-3)

    # Per-shop search is exact (small shops: gather + matmul over float16 rows) ...
    for shop in ("shop3", "shop7", "shop39"):
        got, _ = g.search(queries[:8], 5, shop)
        for h_, q in zip(got, queries[:8], strict=True):
            same_as_oracle(h_, oracle.search(q, 5, shop))
    # ... and a shop above exact_shop_max goes through the IVF-PQ index with a selector, re-scored.
    g.exact_shop_max = 50
    big, _ = g.search(queries, 10, "shop5")
    assert all(h.shop_id == "shop5" for r in big for h in r)
    for h_, q in zip(big, queries, strict=True):  # every close match (same cluster) is found; the tail of
        # a filtered IVF search (unrelated items of other clusters, score ~0.1) is beyond nprobe, as for IVF-Flat
        close = {sku for sku, score, _ in oracle.search(q, 10, "shop5") if score > 0.5}
        assert close <= {h.sku for h in h_}

    # Shrinking below half the threshold goes back to exact float32 search.
    gone = [Record(i, "", None, None, version=4, deleted=True) for i in list(oracle.items)[:5_000]]
    g.apply(gone)
    oracle.apply(gone)
    assert not g.compressed and not g.approximate and g._half is None
    hits, _ = g.search(queries[:10], 10)
    for h_, q in zip(hits, queries[:10], strict=True):
        same_as_oracle(h_, oracle.search(q, 10))


def test_before_its_index_is_built_a_compressed_gallery_searches_exactly() -> None:
    rng = np.random.default_rng(2)
    g, oracle = Gallery(DIM, AnnConfig(compress_threshold=1_000)), Oracle()
    recs = records(clustered(rng, 1_200), 0, 1, skus=400, shops=4)
    g._start_build = lambda: None  # type: ignore[method-assign]  # hold the IVF-PQ build: the exact path is under test
    g.apply(recs)
    oracle.apply(recs)
    assert g.compressed and not g.approximate
    queries = clustered(np.random.default_rng(3), 5)
    for shop in (None, "shop1"):
        hits, _ = g.search(queries, 7, shop)
        for h_, q in zip(hits, queries, strict=True):
            same_as_oracle(h_, oracle.search(q, 7, shop))
    _, items, vectors = g.export()
    assert len(items) == 1_200 and vectors.dtype == np.float32 and vectors.shape == (1_200, DIM)


def test_half_store_grows_by_blocks_without_copying() -> None:
    store = HalfStore(4, block_bits=3)  # blocks of 8 rows
    store.put(np.array([0, 9, 20]), np.eye(4, dtype=np.float32)[:3])
    first = store._blocks[0]
    store.put(np.array([40]), np.ones((1, 4), np.float32))
    assert store._blocks[0] is first and store.size == 41 and len(store._blocks) == 6
    expected = [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    np.testing.assert_array_equal(store.get(np.array([20, 9, 0, 40, 1])), expected)
    assert sum(len(rows) for _, rows in store.scan(step=16)) == 41


def test_compression_settings_defaults_reach_the_gallery(monkeypatch: pytest.MonkeyPatch) -> None:
    default = Settings(_env_file=None).ann_config()  # type: ignore[call-arg]
    assert default.compress_threshold == 200_000 == AnnConfig().compress_threshold and default.rescore == 300 == AnnConfig().rescore
    monkeypatch.setenv("RICE_COMPRESS_THRESHOLD", "500000")
    monkeypatch.setenv("RICE_ANN_RESCORE", "50")
    changed = Settings(_env_file=None).ann_config()  # type: ignore[call-arg]
    assert changed.compress_threshold == 500_000 and changed.rescore == 50
    assert AnnConfig().pq_subquantizers(1280) == 64 and AnnConfig().pq_subquantizers(512) == 64 and AnnConfig().pq_subquantizers(100) == 50


def _exported_vectors(version: int, items: list[Any], vectors: Any, dim: int) -> np.ndarray:
    """The vectors.npy of the export tar that `export_tar` streams from `Gallery.export`'s answer."""
    body = b"".join(export_tar(Manifest("m", dim, len(items), version), [BulkItem(*it) for it in items], vectors))
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return read_vectors(io.BytesIO(tar.extractfile(VECTORS).read()))  # type: ignore[union-attr]


def test_export_of_a_compressed_gallery_streams_its_float16_rows_a_chunk_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    g = Gallery(DIM, AnnConfig(compress_threshold=1_000))
    g._start_build = lambda: None  # type: ignore[method-assign]  # the index does not matter to the export
    vecs = clustered(rng, 10_000)
    g.apply([Record(f"i{i}", f"s{i % 900}", f"shop{i % 4}", vecs[i], {"i": i}, 1) for i in range(10_000)])
    assert g.compressed
    asked: list[int] = []
    real_get = HalfStore.get

    def counting_get(self: HalfStore, slots: np.ndarray) -> np.ndarray:
        asked.append(len(slots))
        return real_get(self, slots)

    def no_full_copy(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the export built a full float32 copy")

    monkeypatch.setattr(HalfStore, "get", counting_get)
    monkeypatch.setattr(HalfRows, "__array__", no_full_copy)
    version, items, vectors = g.export()
    assert isinstance(vectors, HalfRows) and vectors.shape == (10_000, DIM) and not asked  # nothing read yet
    got = _exported_vectors(version, items, vectors, DIM)
    assert asked and max(asked) <= 4_096 < 10_000  # read in the tar's row chunks, never all at once
    want = np.stack([vecs[int(it[0][1:])] for it in items]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)  # exactly the float16 rows, in the export's item order
    assert np.abs(got - np.stack([vecs[int(it[0][1:])] for it in items])).max() < 2e-3
    assert g._pins == 0  # the last chunk released the pin


def test_an_open_export_keeps_its_rows_while_the_gallery_changes() -> None:
    rng = np.random.default_rng(8)
    g = Gallery(DIM, AnnConfig(compress_threshold=1_000))
    g._start_build = lambda: None  # type: ignore[method-assign]
    first, second = clustered(rng, 1_500), clustered(rng, 300)
    g.apply([Record(f"a{i}", f"s{i}", "shop1", first[i], {}, 1) for i in range(1_500)])
    version, items, vectors = g.export()
    # Deletes free slots and new items would reuse them: the open export must not see the new rows.
    g.apply([Record(f"a{i}", f"s{i}", "shop1", None, {}, 2, deleted=True) for i in range(300)])
    g.apply([Record(f"b{i}", f"t{i}", "shop1", second[i], {}, 3) for i in range(300)])
    assert len(g._held) == 300 and not g._free  # freed while pinned: held, not reused
    got = _exported_vectors(version, items, vectors, DIM)
    np.testing.assert_array_equal(got, first.astype(np.float16).astype(np.float32)[[int(it[0][1:]) for it in items]])
    assert g._pins == 0 and not g._held and len(g._free) == 300  # released once read: reusable, zeroed
    assert not g._half.get(np.asarray(g._free)).any()  # type: ignore[union-attr]
    g.apply([Record(f"c{i}", f"u{i}", "shop1", second[i], {}, 4) for i in range(300)])
    assert not g._free and len(g) == 1_800
    # An export dropped unread (a client that hung up) unpins too.
    _, _, dropped = g.export()
    assert g._pins == 1
    del dropped
    gc.collect()
    assert g._pins == 0
    hits, _ = g.search(second[5], 1)
    assert hits[0][0].sku in {"t5", "u5"}


def test_the_stats_index_description_names_every_value_the_gallery_reports() -> None:
    rng = np.random.default_rng(9)
    g = Gallery(DIM, AnnConfig(compress_threshold=1_000))
    g.apply(records(clustered(rng, 1_200), 0, 1, skus=400, shops=4))
    assert g.wait_for_index(120) and g.stats()["index"] == "ivf-pq"
    described = GalleryStats.model_fields["index"].description or ""
    for value in ("exact", "ivf", "ivf-pq"):  # exact below the thresholds; ivf past RICE_ANN_THRESHOLD uncompressed
        assert f"{value} (" in described, value
