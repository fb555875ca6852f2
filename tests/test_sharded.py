"""Shop-sharded replica groups behind nginx (Debian's, `make proxy`), on loopback, with the routing
config the compose profile deploys (docker/nginx-sharded.conf).

First against tiny echo backends (fast; they say which group and replica answered): nginx's choice
of group is the service's shard_of for hundreds of shop ids, the header wins over the query, a group
spreads over its replicas, and a group that is down fails its shops' requests instead of sending
them to another shard. Then against real `rice serve` shard groups on one Redis."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from index.shards import shard_of
from tests.conftest import RedisServer, jpeg
from tests.serving_helpers import wait_until
from tests.test_replicas import Replica
from tools.democatalog import make_products
from tools.sharded_proxy import CONFIG, SHARD_HEADER, RunningProxy, config_groups, nginx_binary, sharded_nginx

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _nginx_installed() -> None:
    if nginx_binary() is None:
        pytest.fail("the sharded tests need nginx: `make proxy` installs Debian's (apt-get)")


def shop_ids(n: int, seed: int = 19) -> list[str]:
    rng = random.Random(seed)
    return [f"shop-{rng.randrange(10**9)}" for _ in range(n)]


class Echo:
    """A backend that answers every request with JSON naming itself and what it received."""

    def __init__(self, group: int, replica: int) -> None:
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                out = json.dumps(
                    {
                        "group": echo.group,
                        "replica": echo.replica,
                        "path": urlsplit(self.path).path,
                        "query": parse_qs(urlsplit(self.path).query),
                        "shop_header": self.headers.get("x-shop-id"),
                        "body_bytes": len(body),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_DELETE = _answer  # noqa: N815 - http.server's method names

            def log_message(self, *args: object) -> None:
                pass

        self.group, self.replica = group, replica
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo_groups(tmp_path: Path) -> Iterator[tuple[RunningProxy, list[list[Echo]]]]:
    """Group 0 with two replicas, group 1 with one, behind nginx."""
    groups = [[Echo(0, 0), Echo(0, 1)], [Echo(1, 0)]]
    try:
        with sharded_nginx([[e.address for e in g] for g in groups], tmp_path / "nginx") as proxy:
            yield proxy, groups
    finally:
        for g in groups:
            for e in g:
                e.stop()


def test_the_config_lists_the_shard_groups_in_shard_order() -> None:
    assert config_groups() == [0, 1]


def test_the_compose_profiles_nginx_files_pass_nginx_t(tmp_path: Path) -> None:
    """docker/nginx-sharded/ as compose mounts it, the replicas' names (which resolve only inside
    compose) swapped for loopback: `nginx -t` accepts the whole configuration."""
    conf = tmp_path / "conf"
    (conf / "nginx-sharded").mkdir(parents=True)
    (conf / "nginx.conf").symlink_to(CONFIG)
    for f in (ROOT / "docker" / "nginx-sharded").iterdir():
        text = re.sub(r"server api-[\w-]+:", "server 127.0.0.1:", f.read_text())
        (conf / "nginx-sharded" / f.name).write_text(text)
    assert "127.0.0.1:8000" in (conf / "nginx-sharded" / "upstreams.conf").read_text()
    binary = nginx_binary()
    assert binary is not None
    args = [binary, "-t", "-p", f"{tmp_path}/", "-c", str(conf / "nginx.conf"), "-e", "stderr"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "test is successful" in done.stderr, done.stderr


def test_nginx_routes_every_shop_to_its_shard_of_group(echo_groups: tuple[RunningProxy, list[list[Echo]]]) -> None:
    proxy, _ = echo_groups
    shops = shop_ids(300)
    assert set(Counter(shard_of(s, 2) for s in shops).values()) and len({shard_of(s, 2) for s in shops}) == 2
    replicas: Counter[tuple[int, int]] = Counter()
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for i, shop in enumerate(shops):
            # alternate where the shop id goes: the query, the header, both (the header wins)
            if i % 3 == 0:
                r = http.get("/v1/gallery/items", params={"shop_id": shop, "limit": 1})
            elif i % 3 == 1:
                r = http.get("/v1/gallery/items", headers={"X-Shop-Id": shop})
            else:
                r = http.get("/v1/gallery/items", params={"shop_id": f"not-{shop}"}, headers={"X-Shop-Id": shop})
            assert r.status_code == 200, proxy.log()
            answer = r.json()
            assert answer["group"] == shard_of(shop, 2), (shop, answer)
            assert r.headers[SHARD_HEADER] == str(answer["group"])
            replicas[(answer["group"], answer["replica"])] += 1
            # passed through untouched: the service reads the same shop id nginx hashed
            if i % 3 == 0:
                assert answer["query"]["shop_id"] == [shop] and answer["shop_header"] is None
            else:
                assert answer["shop_header"] == shop
    # group 0's two replicas share its shops' requests (round-robin in each nginx worker)
    group0 = replicas[(0, 0)] + replicas[(0, 1)]
    assert min(replicas[(0, 0)], replicas[(0, 1)]) >= group0 // 4, replicas


def test_uploads_pass_and_shopless_requests_reach_some_group(echo_groups: tuple[RunningProxy, list[list[Echo]]]) -> None:
    proxy, _ = echo_groups
    body = random.Random(1).randbytes(3 * 1024 * 1024)  # past nginx's in-memory body buffer: a temp file
    shop = shop_ids(1)[0]
    r = httpx.post(f"{proxy.url}/v1/gallery/items", params={"shop_id": shop}, content=body, timeout=60)
    assert r.status_code == 200 and r.json()["body_bytes"] == len(body) and r.json()["group"] == shard_of(shop, 2), proxy.log()
    # no shop id: round-robin over the groups (the service answers 400 where a shop is needed)
    groups = {httpx.get(f"{proxy.url}/v1/info", timeout=30).json()["group"] for _ in range(6)}
    assert groups == {0, 1}


def test_a_group_that_is_down_fails_its_shops_and_never_falls_over_to_another(echo_groups: tuple[RunningProxy, list[list[Echo]]]) -> None:
    proxy, groups = echo_groups
    groups[1][0].stop()
    shops = shop_ids(40, seed=5)
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for _ in range(3):  # repeated failures must not mark the group failed and rehash its shops
            for shop in shops:
                r = http.get("/v1/gallery/items", params={"shop_id": shop})
                if shard_of(shop, 2) == 1:
                    assert r.status_code == 502, (shop, r.status_code, r.text)
                else:
                    assert r.status_code == 200 and r.json()["group"] == 0


# -- real shard groups: two `rice serve` processes (shard 0 and 1 of 2) on one Redis, behind nginx --


@dataclass
class Sharded:
    proxy: RunningProxy
    shards: list[Replica]  # shard i's replica (each group has one here)
    shops: list[list[str]]  # shop ids of each shard


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sharded]:
    redis = RedisServer(tmp_path_factory.mktemp("sharded-redis"))
    redis.start()
    workdir = tmp_path_factory.mktemp("sharded")
    replicas = [Replica(redis.url, workdir, f"s{i}", RICE_SHARDS="2", RICE_SHARD=str(i), RICE_DECODE_WORKERS="1") for i in range(2)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready(300)  # generous: a loaded 2-core box loads and warms two encoders at once
        with sharded_nginx([[f"127.0.0.1:{r.port}"] for r in replicas], workdir / "nginx") as proxy:
            shops = shop_ids(400, seed=7)
            yield Sharded(proxy, replicas, [[s for s in shops if shard_of(s, 2) == i] for i in range(2)])
    finally:
        for r in replicas:
            r.stop()
        redis.stop()


def _image(seed: int) -> bytes:
    return jpeg(make_products(1, seed=seed)[0].image)


def _add(url: str, shop: str, sku: str, image: bytes, **params: str) -> dict[str, Any]:
    """Add a catalog item; the shop only in the form field, as clients send it (nginx cannot see it)."""
    r = httpx.post(
        f"{url}/v1/gallery/items",
        params=params,
        data={"sku": sku, "shop_id": shop, "item_id": f"{sku}-{shop}"},
        files={"image": ("p.jpg", image, "image/jpeg")},
        timeout=120,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _listed(url: str, shop: str, **headers: str) -> list[str]:
    r = httpx.get(f"{url}/v1/gallery/items", params={"shop_id": shop}, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return [i["item_id"] for i in r.json()["items"]]


def _stats(replica: Replica) -> dict[str, Any]:
    return dict(httpx.get(f"{replica.url}/v1/gallery/stats", timeout=60).json())


@pytest.mark.slow
def test_nginx_sends_each_shop_to_the_group_holding_its_shard(sharded: Sharded) -> None:
    """200 shops through nginx: each answered by its shard's replica (a replica answers 421 for a
    shop it does not hold), and the group nginx chose is shard_of's."""
    infos = [httpx.get(f"{r.url}/v1/info", timeout=60).json() for r in sharded.shards]
    assert [(i["shards"], i["shard"]) for i in infos] == [(2, 0), (2, 1)]
    other = sharded.shops[1][0]
    wrong = httpx.get(f"{sharded.shards[0].url}/v1/gallery/items", params={"shop_id": other}, timeout=60)
    assert wrong.status_code == 421 and wrong.json()["error"]["code"] == "wrong_shard", wrong.text
    shops = sharded.shops[0][:100] + sharded.shops[1][:100]
    with httpx.Client(base_url=sharded.proxy.url, timeout=60) as http:
        for i, shop in enumerate(shops):
            params, headers = ({"shop_id": shop}, {}) if i % 2 else ({}, {"X-Shop-Id": shop})
            r = http.get("/v1/gallery/items", params={**params, "limit": 1}, headers=headers)
            assert r.status_code == 200, (shop, r.status_code, r.text, sharded.proxy.log())
            assert r.headers[SHARD_HEADER] == str(shard_of(shop, 2))


def _as_sent(shop: str) -> str:
    """The shop_id query parameter's value as it appears in the URL httpx sends (what nginx hashes)."""
    return str(httpx.QueryParams(shop_id=shop)).split("=", 1)[1]


@pytest.mark.slow
def test_a_shop_id_nginx_sees_percent_encoded_is_refused_not_answered_by_another_shard(sharded: Sharded) -> None:
    """nginx hashes the query parameter as sent; the service decodes it. Where the two spellings fall
    in different shards the read gets 421 (README); the same id in the header is routed right."""
    shop = next(s for s in (f"shop {i}" for i in range(1000)) if shard_of(_as_sent(s), 2) != shard_of(s, 2))
    r = httpx.get(f"{sharded.proxy.url}/v1/gallery/items", params={"shop_id": shop}, timeout=60)
    assert r.status_code == 421 and r.json()["error"]["code"] == "wrong_shard", r.text
    r = httpx.get(f"{sharded.proxy.url}/v1/gallery/items", headers={"X-Shop-Id": shop}, timeout=60)
    assert r.status_code == 200 and r.headers[SHARD_HEADER] == str(shard_of(shop, 2)), r.text
    for shop in ("магазин-7", "店铺-12", "café+thé"):  # UTF-8 in the header: what nginx hashes is what the service reads
        r = httpx.get(f"{sharded.proxy.url}/v1/gallery/items", headers={"X-Shop-Id": shop.encode()}, timeout=60)
        assert r.status_code == 200 and r.headers[SHARD_HEADER] == str(shard_of(shop, 2)), (shop, r.text)
    assert {shard_of(s, 2) for s in ("магазин-7", "店铺-12", "café+thé")} == {0, 1}


@pytest.mark.slow
def test_an_item_added_through_nginx_is_found_there_and_only_in_its_shard(sharded: Sharded) -> None:
    shop = sharded.shops[0][1]
    before = _stats(sharded.shards[1])
    image = _image(seed=31)
    added = _add(sharded.proxy.url, shop, "SKU-A", image, shop_id=shop)
    assert added["shard"] == 0
    r = httpx.post(
        f"{sharded.proxy.url}/v1/recognize/image",
        params={"shop_id": shop, "top_k": 3, "min_gallery_version": added["gallery_version"]},
        files={"file": ("q.jpg", image, "image/jpeg")},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["item_id"] == added["item_id"] and r.headers[SHARD_HEADER] == "0"
    assert added["item_id"] in _listed(sharded.proxy.url, shop)
    wait_until(lambda: _stats(sharded.shards[0])["gallery_version"] >= added["gallery_version"], 60, "shard 0 applies the write")
    assert _stats(sharded.shards[0])["items"] >= 1
    after = _stats(sharded.shards[1])
    assert (after["items"], after["gallery_version"]) == (before["items"], before["gallery_version"]), "shard 1 never sees shard 0's items"


@pytest.mark.slow
def test_a_write_sent_to_the_wrong_group_lands_in_its_shops_shard(sharded: Sharded) -> None:
    shop = sharded.shops[1][1]
    before = _stats(sharded.shards[0])
    added = _add(sharded.shards[0].url, shop, "SKU-B", _image(seed=32))  # straight to shard 0's replica
    assert added["shard"] == 1
    wait_until(lambda: _stats(sharded.shards[1])["gallery_version"] >= added["gallery_version"], 60, "shard 1 applies the write")
    assert added["item_id"] in _listed(sharded.proxy.url, shop, **{"X-Shop-Id": shop})
    after = _stats(sharded.shards[0])
    assert (after["items"], after["gallery_version"]) == (before["items"], before["gallery_version"])
    # a delete sent to the wrong group, likewise
    r = httpx.delete(f"{sharded.shards[0].url}/v1/gallery/items/{added['item_id']}", params={"shop_id": shop}, timeout=60)
    assert r.status_code == 200 and r.json()["deleted"] == [added["item_id"]], r.text
    wait_until(lambda: added["item_id"] not in _listed(sharded.proxy.url, shop), 60, "the delete reaches shard 1")


@pytest.mark.slow
def test_rice_ingest_through_nginx_puts_each_row_in_its_shops_shard(sharded: Sharded, tmp_path: Path) -> None:
    """The README's `rice ingest catalog.csv --url <nginx>`: rows of both shards, each where it belongs."""
    shops = [sharded.shops[0][2], sharded.shops[1][2]]
    rows = ["path,sku,shop_id"]
    for i, shop in enumerate(shops):
        (tmp_path / f"p{i}.jpg").write_bytes(_image(seed=40 + i))
        rows.append(f"p{i}.jpg,SKU-I{i},{shop}")
    (tmp_path / "catalog.csv").write_text("\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tools.cli", "ingest", "catalog.csv", "--url", sharded.proxy.url, "--quiet"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for i, shop in enumerate(shops):
        r = httpx.get(f"{sharded.proxy.url}/v1/gallery/items", params={"shop_id": shop}, timeout=60)
        assert r.status_code == 200 and [it["sku"] for it in r.json()["items"]] == [f"SKU-I{i}"], r.text
        assert r.headers[SHARD_HEADER] == str(i)


@pytest.mark.slow
def test_a_gallery_request_without_a_shop_gets_400_shop_required(sharded: Sharded) -> None:
    for r in (
        httpx.get(f"{sharded.proxy.url}/v1/gallery/items", timeout=60),
        httpx.post(f"{sharded.proxy.url}/v1/recognize/image", files={"file": ("q.jpg", _image(seed=33), "image/jpeg")}, timeout=120),
    ):
        assert r.status_code == 400 and r.json()["error"]["code"] == "shop_required", r.text
