"""Coalesces concurrent requests' gallery searches into one faiss batch, like `pipeline.batcher` does
for the encoder.

Requests wait in one list; whenever a search thread is free, the dispatcher takes the oldest waiting
request and every other waiting one with the same shop filter (up to `max_batch`), searches them as
one [Q, D] query matrix with the largest top_k asked, and hands each request its own top_k. So an
idle service searches at once (no added wait), and a busy one answers many queries per pass over
the gallery (on a GPU, one kernel launch instead of many; on the CPU, the IVF lists and BLAS blocks
are read once per batch). A request cancelled while it waits is dropped from its batch. A request
may bring several vectors (region search: the whole clip and each region); its rows stay together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from index.gallery import Hit

# (queries [Q, D], k, shop_id) -> (hits per query, gallery version seen)
SearchFn = Callable[[np.ndarray, int, str | None], tuple[list[list[Hit]], int]]


@dataclass
class _Waiting:
    vectors: np.ndarray  # [M, D]: one row per query vector of this request
    k: int
    shop_id: str | None
    future: asyncio.Future[tuple[list[list[Hit]], int]]


def take_batch(waiting: list[_Waiting], max_batch: int) -> list[_Waiting]:
    """Remove and return the oldest live request and up to `max_batch - 1` more with its shop filter
    (pure: tested without threads). Cancelled requests are dropped on the way."""
    waiting[:] = [w for w in waiting if not w.future.done()]
    if not waiting:
        return []
    shop = waiting[0].shop_id
    batch = [w for w in waiting if w.shop_id == shop][:max_batch]
    taken = {id(w) for w in batch}
    waiting[:] = [w for w in waiting if id(w) not in taken]
    return batch


class SearchBatcher:
    """One per serving state; `search` is called on the event loop, the searches run on its threads."""

    def __init__(self, search: SearchFn, threads: int = 2, max_batch: int = 64, on_batch: Callable[[int], object] | None = None) -> None:
        self._search = search
        self.threads = threads
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._waiting: list[_Waiting] = []
        self._running = 0  # batches on the threads now
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="search")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def search(self, vector: np.ndarray, k: int, shop_id: str | None) -> tuple[list[Hit], int]:
        """Top-k SKUs for one clip vector [D], and the gallery version the search saw."""
        hits, version = await self.search_many(np.asarray(vector, np.float32).reshape(1, -1), k, shop_id)
        return hits[0], version

    async def search_many(self, vectors: np.ndarray, k: int, shop_id: str | None) -> tuple[list[list[Hit]], int]:
        """Top-k SKUs for each of one request's vectors [M, D], searched in one batch, and the gallery version."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[list[list[Hit]], int]] = loop.create_future()
        self._waiting.append(_Waiting(np.asarray(vectors, np.float32).reshape(len(vectors), -1), k, shop_id, future))
        self._dispatch(loop)
        return await future

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running < self.threads:
            batch = take_batch(self._waiting, self.max_batch)
            if not batch:
                return
            self._running += 1
            queries = np.concatenate([w.vectors for w in batch])  # [sum of M, D]
            k = max(w.k for w in batch)
            done = self._pool.submit(self._search, queries, k, batch[0].shop_id)
            done.add_done_callback(lambda f, b=batch: _call_on(loop, self._finish, loop, b, f))  # type: ignore[misc]
            if self.on_batch is not None:
                self.on_batch(len(queries))

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting], done: Future[tuple[list[list[Hit]], int]]) -> None:
        """On the event loop: hand each request its rows (or the batch's error), then start the next batch."""
        self._running -= 1
        if done.cancelled():  # the pool shut down under it (the serving state is closing)
            for w in batch:
                w.future.cancel()
            return
        try:
            hits, version = done.result()
        except Exception as exc:  # one failed search fails only the requests searched with it
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
        else:
            start = 0
            for w in batch:
                rows, start = hits[start : start + len(w.vectors)], start + len(w.vectors)
                if not w.future.done():
                    w.future.set_result(([row[: w.k] for row in rows], version))
        self._dispatch(loop)


def _call_on(loop: asyncio.AbstractEventLoop, fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting any more
        loop.call_soon_threadsafe(fn, *args)
