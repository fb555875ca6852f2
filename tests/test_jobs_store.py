"""The timeline job stores, SQLite and Redis, behave the same: claim order, leases, cancel, give up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from index.errors import JobNotFound
from index.jobs import JobStore, SQLiteJobStore
from index.redis_jobs import RedisJobStore
from tests.conftest import RedisServer


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        s: JobStore = SQLiteJobStore(tmp_path / "gallery.db")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        s = RedisJobStore(server.url)
    assert isinstance(s, JobStore)
    try:
        yield s
    finally:
        s.close()


def test_jobs_are_claimed_oldest_first_once_and_finish(store: JobStore) -> None:
    store.create("a", {"window_s": 2.0}, "/jobs/a.upload", 100.0)
    store.create("b", {"window_s": 1.0, "shop_id": "s1"}, "/jobs/b.upload", 101.0)
    first = store.claim("r1", 30.0, 102.0, 3)
    second = store.claim("r2", 30.0, 102.0, 3)
    assert first is not None and second is not None
    assert (first.job_id, first.owner, first.status, first.attempts) == ("a", "r1", "running", 1)
    assert second.job_id == "b" and second.params == {"window_s": 1.0, "shop_id": "s1"}
    assert store.claim("r3", 30.0, 102.0, 3) is None  # nothing left, and leases still good
    assert store.heartbeat("a", "r1", 0.5, 30.0, 110.0)
    assert not store.heartbeat("a", "r2", 0.9, 30.0, 110.0)  # not r2's job
    assert store.get("a").progress == 0.5
    assert store.finish("a", "r1", "done", 120.0, result={"segments": []})
    done = store.get("a")
    assert (done.status, done.progress, done.result, done.owner) == ("done", 1.0, {"segments": []}, None)
    assert store.finish("b", "r2", "failed", 121.0, error={"code": "invalid_media", "message": "truncated"})
    assert store.get("b").error == {"code": "invalid_media", "message": "truncated"}
    with pytest.raises(JobNotFound):
        store.get("zzz")


def test_cancel_stops_a_queued_job_and_tells_a_running_one(store: JobStore) -> None:
    store.create("q", {}, "/q", 1.0)
    store.create("r", {}, "/r", 2.0)
    assert store.cancel("q", 3.0).status == "cancelled"
    running = store.claim("r1", 30.0, 4.0, 3)
    assert running is not None and running.job_id == "r"  # the cancelled one is never claimed
    assert store.cancel("r", 5.0).status == "cancelled"
    assert not store.heartbeat("r", "r1", 0.3, 30.0, 6.0)  # the worker learns it and stops
    assert not store.finish("r", "r1", "done", 7.0, result={})  # and cannot overwrite it
    assert store.get("r").status == "cancelled"
    assert store.cancel("r", 8.0).status == "cancelled"  # idempotent
    with pytest.raises(JobNotFound):
        store.cancel("zzz", 9.0)


def test_an_expired_lease_is_claimed_again_and_a_job_that_keeps_dying_is_given_up(store: JobStore) -> None:
    store.create("j", {}, "/j", 1.0)
    assert store.claim("r1", 10.0, 2.0, 2) is not None
    assert store.claim("r2", 10.0, 5.0, 2) is None  # r1's lease runs to 12
    again = store.claim("r2", 10.0, 13.0, 2)
    assert again is not None and (again.owner, again.attempts) == ("r2", 2)
    assert not store.heartbeat("j", "r1", 0.1, 10.0, 13.5)  # r1 came back too late: no longer its job
    assert store.claim("r3", 10.0, 30.0, 2) is None  # r2 died too: the job is failed, not claimed a third time
    failed = store.get("j")
    assert failed.status == "failed" and failed.error is not None and failed.error["code"] == "job_abandoned"


def test_a_job_released_on_shutdown_goes_back_to_the_queue(store: JobStore) -> None:
    store.create("j", {}, "/j", 1.0)
    assert store.claim("r1", 10.0, 2.0, 3) is not None
    assert store.finish("j", "r1", "queued", 3.0)
    assert store.get("j").status == "queued"
    again = store.claim("r2", 10.0, 4.0, 3)
    assert again is not None and again.owner == "r2"
