"""The search batcher: concurrent queries become one gallery batch per shop filter, each request gets
exactly what its own search would have returned, a failure stays within its batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from index.gallery import Gallery, Hit
from index.records import Record
from pipeline.search_batcher import SearchBatcher, _Waiting, take_batch


def gallery(n: int = 200, dim: int = 16) -> tuple[Gallery, np.ndarray]:
    v = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    g = Gallery(dim)
    g.apply([Record(f"i{i}", f"s{i // 2}", f"shop{i % 2}", v[i], version=1) for i in range(n)])
    return g, v


class GatedSearch:
    """The gallery's search, recording each batch; the first call waits for `gate`."""

    def __init__(self, g: Gallery) -> None:
        self.g = g
        self.gate = threading.Event()
        self.started = threading.Event()
        self.batches: list[tuple[int, int, str | None]] = []
        self.fail_shop: str | None = None

    def __call__(self, q: np.ndarray, k: int, shop: str | None) -> tuple[list[list[Hit]], int]:
        self.started.set()
        assert self.gate.wait(30)
        self.batches.append((len(q), k, shop))
        if shop is not None and shop == self.fail_shop:
            raise RuntimeError("search failed")
        return self.g.search(q, k, shop)


def test_take_batch_groups_by_shop_and_drops_cancelled() -> None:
    loop = asyncio.new_event_loop()
    try:
        ws = [_Waiting(np.zeros(2, np.float32), 1, shop, loop.create_future()) for shop in ("a", None, "a", "a", "b", "a")]
        ws[2].future.cancel()
        waiting = list(ws)
        assert take_batch(waiting, 2) == [ws[0], ws[3]]
        assert waiting == [ws[1], ws[4], ws[5]]
        assert take_batch(waiting, 64) == [ws[1]]
        assert take_batch(waiting, 64) == [ws[4]]
        assert take_batch(waiting, 64) == [ws[5]] and waiting == [] and take_batch(waiting, 64) == []
    finally:
        loop.close()


@pytest.mark.anyio
async def test_waiting_queries_are_searched_together_and_answered_like_alone() -> None:
    g, v = gallery()
    search = GatedSearch(g)
    batcher = SearchBatcher(search, threads=1)
    try:
        first = asyncio.create_task(batcher.search(v[0], 3, None))
        await asyncio.to_thread(search.started.wait, 30)  # the only thread is busy with the first query
        ks = [1, 5, 2]
        unfiltered = [asyncio.create_task(batcher.search(v[i], ks[i - 1], None)) for i in (1, 2, 3)]
        shop = [asyncio.create_task(batcher.search(v[i], 4, "shop1")) for i in (5, 7)]
        while batcher.waiting < 5:
            await asyncio.sleep(0.001)
        search.gate.set()
        results = await asyncio.gather(first, *unfiltered, *shop)
    finally:
        batcher.close()
    assert search.batches == [(1, 3, None), (3, 5, None), (2, 4, "shop1")]
    for (hits, version), (i, k, s) in zip(
        results, [(0, 3, None), (1, 1, None), (2, 5, None), (3, 2, None), (5, 4, "shop1"), (7, 4, "shop1")], strict=True
    ):
        alone, _ = g.search(v[i], k, s)
        assert version == 1 and len(hits) == k
        assert [h.item_id for h in hits] == [h.item_id for h in alone[0]]  # batched BLAS may differ in the last float bit
        assert [h.score for h in hits] == pytest.approx([h.score for h in alone[0]], abs=1e-5)


@pytest.mark.anyio
async def test_a_failed_batch_fails_only_its_requests() -> None:
    g, v = gallery()
    search = GatedSearch(g)
    search.fail_shop = "shop0"
    batcher = SearchBatcher(search, threads=1)
    try:
        blocker = asyncio.create_task(batcher.search(v[0], 1, None))
        await asyncio.to_thread(search.started.wait, 30)
        bad = asyncio.create_task(batcher.search(v[1], 1, "shop0"))
        good = asyncio.create_task(batcher.search(v[3], 1, "shop1"))  # odd items are shop1's
        gone = asyncio.create_task(batcher.search(v[5], 1, "shop1"))
        while batcher.waiting < 3:
            await asyncio.sleep(0.001)
        gone.cancel()
        search.gate.set()
        await blocker
        with pytest.raises(RuntimeError, match="search failed"):
            await bad
        hits, _ = await good
        assert hits[0].item_id == "i3"
    finally:
        batcher.close()
    assert search.batches[-1] == (1, 1, "shop1")  # the cancelled request was not searched
