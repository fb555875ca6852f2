"""Where decoding runs, with a bound on how many uploads may wait for it.

At most `max_pending` uploads wait for or sit in the pool; past that the request gets 429 with
Retry-After instead of queueing into a timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.errors import Overloaded


class DecodePool:
    def __init__(
        self,
        workers: int,
        max_pending: int = 64,
        on_decoded: Callable[[float], object] = lambda seconds: None,
        on_reject: Callable[[str], object] = lambda where: None,
    ) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.on_decoded = on_decoded
        self.on_reject = on_reject
        self.pending = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one decode in the pool; 429 when too many uploads are already waiting for it."""
        if self.pending >= self.max_pending:
            self.on_reject("decode")
            # Each decode takes well under a second on typical clips; one round of the pool per second.
            wait = max(1, self.pending // max(self.workers, 1))
            raise Overloaded(f"{self.pending} uploads are waiting to be decoded; retry later", headers={"Retry-After": str(wait)})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn, *args)
        finally:
            self.pending -= 1

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.on_decoded(time.perf_counter() - t)
