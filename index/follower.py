"""Keeps a replica's gallery in step with a shared store's change log, on a background thread.

Boot: build a gallery from the store's snapshot, then replay the log from the snapshot's
version. Then follow: blocking reads of the log, each batch applied under the gallery's lock
for a few milliseconds, so searches keep running. Replay is idempotent (versions at or below
the applied one are skipped). Resync, i.e. a fresh gallery built beside the serving one and
swapped in, happens when

- the log skips a version (the entries this replica needed were trimmed away), or
- the store's epoch changed or its version went backwards (the server lost its data).

A restart of the server with its data intact (AOF) needs no resync: the follower reconnects,
checks the epoch and version first (a server that lost its last writes would reuse their
version numbers) and reads on from the version it has.

The thread never dies of an error: an unreachable store clears `connected`, any other failure
sets `error` (both with a backoff and a retry), and `running` says whether the thread is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from index.errors import StoreUnavailable
from index.gallery import Gallery
from index.records import ChangeLog, Record

log = logging.getLogger("rice.follower")

BOOT_BATCH = 16_384  # snapshot records per apply at boot: 84 MB of float32 vectors at 1280-d


class Follower:
    """Applies a change log to the gallery that `get_gallery`/`set_gallery` hold."""

    def __init__(
        self,
        store: ChangeLog,
        namespace: str,
        new_gallery: Callable[[], Gallery],
        get_gallery: Callable[[], Gallery],
        set_gallery: Callable[[Gallery], None],
        block_ms: int = 1000,
        batch: int = 256,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self._new_gallery = new_gallery
        self._get = get_gallery
        self._set = set_gallery
        self.block_ms = block_ms
        self.batch = batch
        self.epoch: str | None = None
        self.connected = False
        self.error: str | None = None  # the last unexpected failure, until a round succeeds again
        self._recheck = False  # set after a failure: check epoch and position before reading on
        self.head = 0  # the store's latest version, as last seen
        self.resyncs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.progress = threading.Condition()

    @property
    def version(self) -> int:
        """The gallery version this replica has applied."""
        return self._get().version

    @property
    def lag(self) -> int:
        """Versions the store is ahead of this replica."""
        return max(0, self.head - self.version)

    @property
    def running(self) -> bool:
        """True while the follower thread is alive (False before start and after stop)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Boot from the snapshot (raises StoreUnavailable if the store cannot be reached), then follow."""
        gallery, epoch = self._boot()
        self._set(gallery)
        self.epoch, self.head, self.connected, self.error = epoch, max(self.head, gallery.version), True, None
        self._thread = threading.Thread(target=self._run, name="gallery-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block_ms / 1000 + 5)

    def _boot(self, attempts: int = 3) -> tuple[Gallery, str]:
        """A new gallery from the snapshot, caught up with the log written meanwhile, and its epoch.

        Raises StoreUnavailable only: also when the log was trimmed past the snapshot on every attempt."""
        for attempt in range(1, attempts + 1):
            t = time.perf_counter()
            snap = self.store.snapshot(self.namespace)
            gallery = self._new_gallery()
            # A batch at a time as the store reads them: at a million items the records with their
            # float32 vectors would be 5+ GB at once, more than the compressed gallery itself. Only
            # the last batch may start the index build: one build over the whole snapshot.
            batch: list[Record] = []
            held: list[Record] = []
            for r in snap.records:
                batch.append(r)
                if len(batch) == BOOT_BATCH:
                    if held:
                        gallery.apply(held, build=False)
                    held, batch = batch, []
            if batch:
                if held:
                    gallery.apply(held, build=False)
                held = batch
            gallery.apply(held)
            # The records are read after the version, so some may be newer than it, and apply()
            # raised the version to theirs; writes between the two reads that the records do not
            # show would then be skipped by the replay. Claim exactly the snapshot's version: the
            # replay from it re-applies everything newer (idempotently).
            gallery.version = snap.version
            try:
                while self._catch_up(gallery, block_ms=0):
                    pass
            except _Gap as gap:
                log.warning("gallery boot: log trimmed while booting (attempt %d of %d): %s", attempt, attempts, gap)
                continue
            log.info("gallery booted from the store: %d items, version %d, %.2f s", len(gallery), gallery.version, time.perf_counter() - t)
            return gallery, snap.epoch
        raise StoreUnavailable(f"the store's log was trimmed past its snapshot {attempts} times while booting")

    def _catch_up(self, gallery: Gallery, block_ms: int) -> bool:
        """Apply one batch of log entries; True if there were any. Raises _Gap when versions were skipped."""
        entries = self.store.read_log(self.namespace, gallery.version, block_ms, self.batch)
        if not entries:
            return False
        expected = gallery.version + 1
        for e in entries:
            if e.version < expected:  # already applied (a replay): idempotent skip
                continue
            if e.version > expected:
                raise _Gap(f"log jumps from version {expected - 1} to {e.version}")
            gallery.apply(e.records)
            gallery.set_version(e.version)
            expected = e.version + 1
        self.head = max(self.head, gallery.version)
        return True

    def _run(self) -> None:
        """Follow until stopped. Every failure is caught, reported (connected, error) and retried."""
        try:
            self._follow()
        finally:  # only a BaseException gets here before stop(): say so, `running` turns False
            if not self._stop.is_set():
                log.critical("gallery follower thread exited unexpectedly")

    def _follow(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._step()
                self.connected, self.error, backoff = True, None, 0.05
            except StoreUnavailable as exc:
                if self.connected:
                    log.warning("gallery store unreachable: %s", exc)
                self.connected = False
                self._recheck = True  # the server may have restarted without our data: check before reading on
                self._stop.wait(backoff)
                backoff = min(1.0, backoff * 2)
            except Exception as exc:  # never let the follower die: log, report, back off, try again
                log.exception("gallery follower failed; retrying in %.2f s", backoff)
                self.error = f"{type(exc).__name__}: {exc}"
                self._recheck = True
                self._stop.wait(backoff)
                backoff = min(1.0, backoff * 2)
            with self.progress:
                self.progress.notify_all()

    def _step(self) -> None:
        """One round: after a reconnect, check the server still holds what we applied; then read on."""
        if self._recheck:
            self._check_epoch(self._get())
            self._recheck = False
        gallery = self._get()
        try:
            if not self._catch_up(gallery, self.block_ms):
                self._check_epoch(gallery)  # idle: a cheap check that the server still has our data
        except _Gap as gap:
            self._resync(str(gap))

    def _check_epoch(self, gallery: Gallery) -> None:
        """Resync if the server lost data: its epoch changed or its version is behind ours."""
        epoch, head = self.store.position()
        self.head = head
        if epoch is None and head == 0 and gallery.version == 0:
            return  # nothing written anywhere yet
        if epoch != self.epoch or head < gallery.version:
            self._resync(f"store epoch {self.epoch} -> {epoch}, version {gallery.version} -> {head}")

    def _resync(self, why: str) -> None:
        """Build a fresh gallery beside the serving one and swap it in; raises StoreUnavailable on failure
        (the serving gallery and the epoch it belongs to are then left as they were, so it is retried)."""
        log.warning("gallery resync: %s", why)
        fresh, epoch = self._boot()
        self._set(fresh)  # one reference assignment: searches see the old gallery or the new one
        self.epoch = epoch
        self.head = fresh.version
        self.resyncs += 1


class _Gap(Exception):
    """The log no longer holds the versions this replica needs."""
