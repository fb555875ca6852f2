"""Where decoding runs: isolated worker processes, with a bound on how many uploads may wait.

Native decoders fed untrusted bytes can segfault, abort, loop or allocate without bound; inside
the serving process any of these would take every in-flight request with it. So each decode runs
in a worker process (`pipeline/decode_worker.py`) with an address-space limit, and the pool kills
and replaces a worker that crashes, runs out of memory or overruns its time budget. Only the
request that caused it fails, with `UndecodableMedia` (422); the death is counted by cause
through `on_worker_death`.

Workers start from a forkserver that has already imported the decoder (the server has threads,
so plain fork is unsafe; spawning would re-import torch and OpenCV for every replacement).

At most `max_pending` uploads wait for or sit in the pool; past that the request gets 429 with
Retry-After instead of queueing into a timeout.

`isolation="thread"` runs decodes on threads of the serving process instead: for trusted input
and for measuring what isolation costs (bench/decode_isolation.py, bench/decode_efficiency.py).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from index.errors import Overloaded, UndecodableMedia
from pipeline.decode_worker import DecoderRaised, WorkerFailed, receive_result, send_call, worker_main

log = logging.getLogger("rice.decode")

Isolation = Literal["process", "thread"]
# Causes of a worker's death, the label values of the deaths counter.
DEATH_CAUSES = ("crash", "memory", "timeout", "protocol")
# The main module too: a worker then does not re-import it (spawn semantics) on every start.
_PRELOAD = ["__main__", "pipeline.decode", "pipeline.keyframes"]


class _WorkerTimeout(Exception):
    pass


class _Worker:
    """One decode process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, memory_limit_mb: int, cv_threads: int | None) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        args = (child, memory_limit_mb, cv_threads)
        self.process: BaseProcess = ctx.Process(target=worker_main, args=args, daemon=True, name="rice-decode")
        self.process.start()
        child.close()  # the child holds its own copy: EOF on ours means the worker is gone

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class DecodePool:
    """`workers` decode processes (or threads), each call on an idle one; see the module docstring."""

    def __init__(
        self,
        workers: int,
        max_pending: int = 64,
        on_decoded: Callable[[float], object] = lambda seconds: None,
        on_reject: Callable[[str], object] = lambda where: None,
        on_worker_death: Callable[[str], object] = lambda cause: None,
        *,
        isolation: Isolation = "process",
        memory_limit_mb: int = 2048,
        time_budget_s: float = 30.0,
        cv_threads: int | None = None,
    ) -> None:
        self.workers = workers
        self.max_pending = max_pending
        self.on_decoded = on_decoded
        self.on_reject = on_reject
        self.on_worker_death = on_worker_death
        self.isolation = isolation
        self.memory_limit_mb = memory_limit_mb
        self.time_budget_s = time_budget_s
        self.cv_threads = cv_threads
        self.pending = 0
        self.deaths: dict[str, int] = dict.fromkeys(DEATH_CAUSES, 0)
        # One dispatch thread per worker: it hands a call to an idle worker and blocks (GIL released)
        # until the answer, the worker's death or the time budget.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        if isolation == "process":
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(_PRELOAD)
            for _ in range(workers):
                self._idle.put(self._start_worker())

    def _start_worker(self) -> _Worker:
        w = _Worker(self._ctx, self.memory_limit_mb, self.cv_threads)
        with self._lock:
            self._all.add(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self._lock:
            self._all.discard(w)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._all)
            self._all.clear()
        for w in workers:
            w.kill()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one decode, `fn(*args)`, in the pool; 429 when too many uploads are already waiting.
        `fn` must be importable by name (a module-level function) and return arrays, numbers,
        strings or dataclasses of them."""
        if self.pending >= self.max_pending:
            self.on_reject("decode")
            # Each decode takes well under a second on typical clips; one round of the pool per second.
            wait = max(1, self.pending // max(self.workers, 1))
            raise Overloaded(f"{self.pending} uploads are waiting to be decoded; retry later", retry_after_s=wait)
        self.pending += 1
        try:
            call = self._in_process if self.isolation == "process" else self._in_thread
            return await asyncio.get_running_loop().run_in_executor(self._pool, call, fn, *args)
        finally:
            self.pending -= 1

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.on_decoded(time.perf_counter() - t)

    def _in_process(self, fn: Callable[..., Any], *args: Any) -> Any:
        w = self._take()
        t = time.perf_counter()
        deadline = t + self.time_budget_s
        cause = None
        try:

            def wait() -> None:
                if not w.conn.poll(max(0.0, deadline - time.perf_counter())):
                    raise _WorkerTimeout
                # poll() is also true on EOF: recv then raises EOFError, handled below.

            send_call(w.conn, fn, args)
            return receive_result(w.conn, wait)
        except _WorkerTimeout:
            cause = "timeout"
            raise UndecodableMedia(f"decoding did not finish within {self.time_budget_s:g} s; the decoder was stopped") from None
        except MemoryError:
            cause = "memory"
            raise UndecodableMedia(f"decoding needed more than the {self.memory_limit_mb} MB a decoder may use") from None
        except (EOFError, OSError):
            cause = "crash"
            raise UndecodableMedia(f"the decoder crashed on this file ({self._exit_reason(w)})") from None
        except DecoderRaised as e:
            # Not one of our domain errors (e.g. cv2.error): the file is at fault, the worker is fine.
            log.warning("decoder raised on an upload: %s", e)
            raise UndecodableMedia("the decoder could not read this file") from None
        except WorkerFailed as e:
            # A garbled answer: the pipe may be out of step, so this worker is not trusted again.
            log.warning("decode worker sent a garbled answer: %s", e)
            cause = "protocol"
            raise UndecodableMedia("the decoder could not read this file") from None
        finally:
            self.on_decoded(time.perf_counter() - t)
            if cause is None and w.process.is_alive():
                self._idle.put(w)
            else:
                self._replace(w, cause or "protocol")

    def _take(self) -> _Worker:
        """An idle worker; as many dispatch threads as workers, so one is idle or being restarted."""
        while True:
            try:
                w = self._idle.get(timeout=1.0)
            except queue.Empty:
                w = None
            if w is not None:
                if w.process.is_alive():
                    return w
                # Died while idle (e.g. the host's OOM killer): not this upload's fault.
                self._replace(w, "crash")
                continue
            with self._lock:
                missing = self.workers - len(self._all)
            if missing > 0 and not self._closed:  # a replacement failed to start earlier: try again
                return self._start_worker()

    def _exit_reason(self, w: _Worker) -> str:
        w.process.join(1)
        code = w.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit status {code}"

    def _replace(self, w: _Worker, cause: str) -> None:
        self._retire(w)
        if self._closed:  # close() killed it: not a death to count or replace
            return
        self.deaths[cause] = self.deaths.get(cause, 0) + 1
        self.on_worker_death(cause)
        log.warning("decode worker %s replaced after %s", w.process.pid, cause)
        try:
            self._idle.put(self._start_worker())
        except Exception:  # _take() starts it later
            log.exception("could not start a replacement decode worker")
