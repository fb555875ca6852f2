"""Several service processes sharing one Redis gallery: convergence under concurrent writers,
read-your-writes across replicas, Redis restarts (AOF), data loss, a SIGKILLed replica, and a
replica whose stream position was trimmed away. Replicas are real `rice serve` subprocesses."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from index.records import Record
from index.redis_store import RedisStore
from service.server import free_port
from tests.conftest import RedisServer, jpeg
from tests.serving_helpers import wait_until
from tools.democatalog import make_products

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DIM = 1280  # the default encoder's embedding size


class Replica:
    """One `rice serve` process on its own port, logging to a file."""

    def __init__(self, redis_url: str, workdir: Path, name: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "RICE_REDIS_URL": redis_url,
            "RICE_GALLERY_PATH": str(workdir / f"{name}-unused.db"),
            "RICE_PORT": str(self.port),
            "RICE_TORCH_THREADS": "1",
            "RICE_MAX_BATCH_SIZE": "4",
            "RICE_LOG_LEVEL": "warning",
            "RICE_SYNC_WAIT_S": "5",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve"], env=self.env, stdout=out, stderr=out)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"replica not ready: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/gallery/stats", timeout=10).json()


@pytest.fixture
def cluster(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Replica]]:
    replicas = [Replica(redis_server.url, tmp_path, f"r{i}", RICE_REDIS_LOG_MAXLEN="200") for i in range(2)]
    for r in replicas:
        r.start()
    try:
        for r in replicas:
            r.wait_ready()
        yield replicas
    finally:
        for r in replicas:
            r.stop()


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def converge(replicas: list[Replica], store: RedisStore, namespace: str, timeout: float = 20) -> dict:
    """Wait until every replica has the store's version; check they hold exactly the live items."""
    target = store.version()
    deadline = time.monotonic() + timeout
    while True:
        stats = [r.stats() for r in replicas]
        if all(s["gallery_version"] == target for s in stats):
            break
        assert time.monotonic() < deadline, (target, stats)
        time.sleep(0.05)
    live = list(store.snapshot(namespace).records)
    for s in stats:
        assert s["items"] == len(live) and s["skus"] == len({r.sku for r in live}), (s, len(live))
    return stats[0]


def search_all(replicas: list[Replica], image: bytes, **params: object) -> list[dict]:
    out = []
    for r in replicas:
        resp = httpx.post(f"{r.url}/v1/recognize/image", params=params, files={"file": ("q.jpg", image, "image/jpeg")}, timeout=30)
        assert resp.status_code == 200, resp.text
        out.append(resp.json())
    return out


def test_replicas_converge_under_concurrent_writers_with_read_your_writes(cluster: list[Replica], redis_server: RedisServer) -> None:
    a, b = cluster
    namespace = httpx.get(f"{a.url}/v1/info").json()["model_version"]
    store = RedisStore(redis_server.url)
    products = make_products(4, seed=4)
    images = [jpeg(p.image) for p in products]
    errors: list[str] = []
    stop = threading.Event()

    def writer(seed: int) -> None:  # direct store writers: upserts, re-upserts and deletes
        rng = random.Random(seed)
        vecs = unit(np.random.default_rng(seed), 60)
        try:
            for i in range(60):
                item = f"w{seed}-{rng.randrange(25)}"
                if rng.random() < 0.25:
                    with contextlib.suppress(LookupError):  # it may not be live right now
                        store.delete_items([item])
                else:
                    store.upsert(namespace, [Record(item, f"sku-{seed}-{i % 7}", f"shop{i % 3}", vecs[i], {"w": seed})])
        except Exception as exc:  # a dead writer must fail the test, not thin the load
            errors.append(f"writer {seed}: {exc!r}")

    def searcher() -> None:  # searches during writes never fail
        try:
            while not stop.is_set():
                for r in cluster:
                    resp = httpx.post(f"{r.url}/v1/recognize/image", files={"file": ("q.jpg", images[0], "image/jpeg")}, timeout=30)
                    if resp.status_code != 200:
                        errors.append(resp.text)
        except Exception as exc:
            errors.append(f"searcher: {exc!r}")

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)] + [threading.Thread(target=searcher)]
    for t in threads:
        t.start()
    # Read-your-writes across replicas, while the others write: add on A, search on B at once.
    for p, image in zip(products, images, strict=True):
        created = httpx.post(f"{a.url}/v1/gallery/items", files={"image": ("p.jpg", image, "image/jpeg")}, data={"sku": p.sku}, timeout=30)
        assert created.status_code == 201, created.text
        version = created.json()["gallery_version"]
        (seen,) = search_all([b], image, min_gallery_version=version, top_k=1)
        assert seen["gallery_version"] >= version and seen["results"][0]["sku"] == p.sku
    for t in threads[:3]:
        t.join()
    stop.set()
    threads[3].join()
    assert errors == []

    converge(cluster, store, namespace)
    answers = search_all(cluster, images[1], top_k=5)
    assert all(x["results"] == answers[0]["results"] for x in answers[1:])
    # A version no one has written yet: a bounded wait, then a clear 503.
    far = store.version() + 1000
    resp = httpx.post(
        f"{b.url}/v1/recognize/image", params={"min_gallery_version": far}, files={"file": ("q.jpg", images[0], "image/jpeg")}, timeout=30
    )
    assert resp.status_code == 503 and "gallery_behind" in resp.json()["error"]["message"]
    store.close()


def test_restarts_kills_trimming_and_data_loss_resync(cluster: list[Replica], redis_server: RedisServer) -> None:
    a, b = cluster
    namespace = httpx.get(f"{a.url}/v1/info").json()["model_version"]
    store = RedisStore(redis_server.url, log_maxlen=200)
    rng = np.random.default_rng(0)

    def write(n: int, tag: str) -> int:
        vecs = unit(rng, n)
        return max(store.upsert(namespace, [Record(f"{tag}{i}", f"sku-{tag}{i % 5}", "shop", vecs[i])]) for i in range(n))

    write(20, "a")
    converge(cluster, store, namespace)

    # Redis killed and restarted with AOF: every acknowledged write is still there; replicas reconnect.
    acked = store.version()
    redis_server.stop(kill=True)
    wait_until(lambda: httpx.get(f"{a.url}/readyz").json()["reasons"] == ["redis_unreachable"], 30, "the replica to notice Redis is gone")
    redis_server.start()
    assert store.version() == acked
    write(10, "b")
    assert converge(cluster, store, namespace)["items"] == 30
    a.wait_ready(10)

    # A replica SIGKILLed while writes go on, then restarted: it boots from the state and catches up.
    b.stop(signal.SIGKILL)
    write(30, "c")
    b.start()
    b.wait_ready()
    converge(cluster, store, namespace)

    # A running replica whose stream position is trimmed away (paused, then far behind): it resyncs.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    write(40, "d")
    store.delete_sku("sku-a0")
    store.trim_log(5)
    b.proc.send_signal(signal.SIGCONT)
    converge(cluster, store, namespace)
    assert "gallery resync: log jumps" in b.log.read_text()

    # Redis lost its data (no persistence to save it): the epoch changes and every replica resyncs.
    redis.Redis.from_url(redis_server.url).flushall()
    write(3, "e")
    assert converge(cluster, store, namespace)["items"] == 3
    assert "gallery resync: store epoch" in a.log.read_text()
    store.close()
