"""index.follower.Follower, driven in-process through a GalleryReplica against a real Redis server:
failures while resyncing, snapshot/version skew, reconnecting to a server that lost its last
writes, and a log trimmed while booting; plus the replica's health check on an embedded store."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index.errors import StoreUnavailable
from index.records import Record, Snapshot
from index.redis_store import RedisStore
from index.replica import GalleryReplica
from index.sqlite_store import SQLiteStore
from tests.conftest import RedisServer
from tests.serving_helpers import wait_until

pytestmark = pytest.mark.integration

DIM = 8
NS = "m"


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def put(store: RedisStore, item_id: str, seed: int = 0) -> int:
    return store.upsert(NS, [Record(item_id, f"sku-{item_id}", None, vec(seed), {})])


def items(replica: GalleryReplica) -> set[str]:
    return set(replica.gallery._ids)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    s = RedisStore(redis_server.url, log_maxlen=0, timeout_s=1.0)
    yield s
    s.close()


@pytest.fixture
def replica(redis_server: RedisServer) -> Iterator[GalleryReplica]:
    """A replica with its own connection (as another process would have), following with short blocks."""
    s = RedisStore(redis_server.url, log_maxlen=0, timeout_s=1.0)
    r = GalleryReplica(s, NS, DIM)
    assert r.follower is not None
    r.follower.block_ms = 50
    yield r
    r.stop()
    s.close()


@pytest.mark.parametrize(
    ("error", "reason"),
    [(StoreUnavailable("redis: gone"), "redis_unreachable"), (RuntimeError("boom"), "gallery_follower_failing: RuntimeError")],
)
def test_a_failing_resync_keeps_the_follower_alive_and_unready(
    replica: GalleryReplica,
    store: RedisStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    reason: str,
) -> None:
    follower = replica.follower
    assert follower is not None
    for i in range(3):
        put(store, f"a{i}", i)
    replica.start()
    assert items(replica) == {"a0", "a1", "a2"} and replica.health() == []

    # Park the follower before its next read, write and trim so that it finds a gap: it resyncs,
    # and the resync's snapshot fails.
    follower_store: Any = follower.store
    real_read_log, real_snapshot = follower_store.read_log, follower_store.snapshot
    gate, parked = threading.Event(), threading.Event()

    def gated_read_log(*args: Any, **kwargs: Any) -> Any:
        if not gate.is_set():
            parked.set()
            gate.wait()
        return real_read_log(*args, **kwargs)

    def failing_snapshot(namespace: str) -> Snapshot:
        raise error

    monkeypatch.setattr(follower_store, "read_log", gated_read_log)
    assert parked.wait(5)
    for i in range(3, 10):
        put(store, f"a{i}", i)
    store.trim_log(2)
    monkeypatch.setattr(follower_store, "snapshot", failing_snapshot)
    caplog.set_level(logging.WARNING, logger="rice.follower")
    gate.set()

    wait_until(lambda: reason in replica.health())
    time.sleep(0.2)  # a few retries, all failing
    assert follower.running and reason in replica.health()
    assert "gallery resync: log jumps" in caplog.text
    if isinstance(error, RuntimeError):  # an unexpected failure is logged with its traceback
        assert any(r.exc_info is not None and r.exc_info[0] is RuntimeError for r in caplog.records)

    # The store works again: the next retry resyncs and the replica is ready with every write.
    monkeypatch.setattr(follower_store, "snapshot", real_snapshot)
    wait_until(lambda: replica.health() == [] and replica.gallery.version == store.version())
    assert items(replica) == {f"a{i}" for i in range(10)} and follower.resyncs == 1 and follower.running


def test_writes_between_the_snapshots_version_and_records_are_not_skipped(
    replica: GalleryReplica, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(store, "a", 1)
    put(store, "b", 2)
    follower = replica.follower
    assert follower is not None
    follower_store: Any = follower.store
    client: Any = follower_store._r
    real_pipeline = client.pipeline
    fired: list[int] = []

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        # The snapshot has read its version and the ids; before it reads the records, another
        # process writes a new item (not among the ids read) and then re-writes one that is.
        if not fired:
            fired.append(put(store, "x", 3))
            fired.append(put(store, "a", 4))
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(client, "pipeline", pipeline)
    replica.start()
    assert fired == [3, 4]
    replica.sync()
    assert replica.gallery.version == store.version() == 4
    assert items(replica) == {"a", "b", "x"}


def test_reconnect_checks_position_after_a_restart_that_lost_the_last_writes(
    replica: GalleryReplica, store: RedisStore, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    follower = replica.follower
    assert follower is not None
    for i in range(3):
        put(store, f"a{i}", i)
    # A copy of the server's files at version 3: restarting on it loses versions 4 and 5 below.
    redis_server.stop()
    backup = tmp_path / "redis-v3"
    shutil.copytree(redis_server.workdir, backup)
    redis_server.start()
    replica.start()
    epoch = follower.epoch
    put(store, "lost4", 4)
    put(store, "lost5", 5)
    wait_until(lambda: replica.gallery.version == 5)

    redis_server.stop(kill=True)
    wait_until(lambda: not follower.connected)
    shutil.rmtree(redis_server.workdir)
    shutil.copytree(backup, redis_server.workdir)

    # Other processes write again as soon as the server is back: versions 4 and 5 again, other items.
    follower_store: Any = follower.store
    real_read_log = follower_store.read_log
    rewritten: list[int] = []
    restored: list[tuple[str | None, int]] = []

    def read_log(*args: Any, **kwargs: Any) -> Any:
        if not rewritten:
            try:
                restored[:] = [store.position()]
                rewritten.append(put(store, "new4", 6))
                rewritten.append(put(store, "new5", 7))
            except StoreUnavailable:
                rewritten.clear()  # still down: the next read tries again
        return real_read_log(*args, **kwargs)

    monkeypatch.setattr(follower_store, "read_log", read_log)
    redis_server.start()
    wait_until(lambda: rewritten == [4, 5] and replica.health() == [] and follower.resyncs == 1)
    assert restored == [(epoch, 3)]  # same epoch, version back to 3: only the position tells
    wait_until(lambda: items(replica) == {"a0", "a1", "a2", "new4", "new5"})
    assert replica.gallery.version == 5 and follower.epoch == epoch


def test_a_log_trimmed_while_booting_raises_store_unavailable_or_retries(
    replica: GalleryReplica, store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    follower = replica.follower
    assert follower is not None
    put(store, "a", 0)
    follower_store: Any = follower.store
    real_snapshot = follower_store.snapshot
    trims = [0]

    def snapshot_then_trim(namespace: str) -> Snapshot:
        snap = real_snapshot(namespace)
        if trims[0] < 3:  # the log moves on and is trimmed past the snapshot before it is replayed
            trims[0] += 1
            for i in range(4):
                put(store, f"t{trims[0]}-{i}", i)
            store.trim_log(2)
        return snap

    monkeypatch.setattr(follower_store, "snapshot", snapshot_then_trim)
    with pytest.raises(StoreUnavailable, match="trimmed"):
        replica.start()
    assert not follower.running

    trims[0] = 2  # one more trim, then a clean snapshot: the boot retries and succeeds
    replica.start()
    assert replica.gallery.version == store.version() and len(items(replica)) == 1 + 4 * 3


def test_health_reports_store_errors_and_logs_unexpected_ones(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    store = SQLiteStore(":memory:")
    replica = GalleryReplica(store, NS, DIM)
    replica.start()
    assert replica.health() == []
    caplog.set_level(logging.ERROR, logger="rice.replica")

    def fail(exc: Exception) -> Callable[[], int]:
        def version() -> int:
            raise exc

        return version

    def locked() -> int:  # what SQLiteStore raises when SQLite fails: StoreUnavailable from the sqlite3 error
        try:
            raise sqlite3.OperationalError("database is locked")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    monkeypatch.setattr(store, "version", locked)
    assert replica.health() == ["gallery_store_unavailable: OperationalError"]
    assert caplog.records == []  # an outage is a readiness reason, not a bug
    monkeypatch.setattr(store, "version", fail(KeyError("bug")))
    assert replica.health() == ["gallery_sync_failed: KeyError"]
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [KeyError]  # a bug keeps its traceback
    store.close()


def test_boot_reads_the_snapshot_lazily_and_applies_it_in_batches(
    store: RedisStore, replica: GalleryReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million-item boot must never hold every record (5 GB of float32 vectors at 1M x 1280):
    the store reads `_CHUNK` records a round trip as the follower iterates, the follower applies
    BOOT_BATCH at a time; an item written while the boot reads is still there once it is done."""
    import index.follower
    import index.redis_store
    from index.gallery import Gallery

    monkeypatch.setattr(index.redis_store, "_CHUNK", 5)
    monkeypatch.setattr(index.follower, "BOOT_BATCH", 7)
    store.upsert(NS, [Record(f"a{i}", f"sku-a{i}", None, vec(i), {}) for i in range(30)])
    sizes: list[int] = []
    rounds = [0]
    real_apply, real_execute = Gallery.apply, index.redis_store.redis.client.Pipeline.execute

    def counting_apply(self: Gallery, records: list[Record], build: bool = True) -> None:
        sizes.append(len(records))
        if len(sizes) == 2:  # mid-boot: a write that the snapshot's version does not cover
            put(store, "late", 99)
        real_apply(self, records, build)

    def counting_execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        rounds[0] += 1
        return real_execute(self, *args, **kwargs)

    monkeypatch.setattr(Gallery, "apply", counting_apply)
    monkeypatch.setattr(index.redis_store.redis.client.Pipeline, "execute", counting_execute)
    snap = store.snapshot(NS)
    assert rounds[0] == 0  # nothing read yet: the records come as they are iterated
    first = next(iter(snap.records))
    assert first.item_id.startswith("a") and rounds[0] == 1  # one chunk of 5
    replica.start()
    assert items(replica) == {f"a{i}" for i in range(30)} | {"late"}
    assert max(sizes) <= 7 and sum(sizes[:5]) >= 30  # 30 snapshot records in batches of at most 7, then the log


def test_boot_starts_one_index_build_once_the_whole_snapshot_is_in(
    store: RedisStore, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the thresholds mid-snapshot, a build per batch would be made stale by the next batch
    (and restarted): the boot defers the decision to its last batch."""
    import index.follower
    from index.ann import AnnConfig
    from index.gallery import Gallery

    monkeypatch.setattr(index.follower, "BOOT_BATCH", 50)
    store.upsert(NS, [Record(f"a{i}", f"sku-a{i}", None, vec(i), {}) for i in range(300)])
    started: list[int] = []
    real_start = Gallery._start_build

    def counting_start(self: Gallery) -> None:
        started.append(len(self))
        real_start(self)

    monkeypatch.setattr(Gallery, "_start_build", counting_start)
    r = GalleryReplica(RedisStore(redis_server.url, log_maxlen=0, timeout_s=1.0), NS, DIM, AnnConfig(threshold=60, compress_threshold=100))
    r.start()
    try:
        assert started == [300] and r.gallery.compressed
        assert r.gallery.wait_for_index(60) and r.gallery.stats()["index"] == "ivf-pq"
    finally:
        r.stop()
