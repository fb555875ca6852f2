"""Shop-sharded replica groups behind nginx (Debian's, `make proxy`), on loopback, with the routing
config the compose profile deploys (docker/nginx-sharded.conf).

First against tiny echo backends (fast; they say which group and replica answered): nginx's choice
of group is the service's shard_of for hundreds of shop ids, the header wins over the query, a group
spreads over its replicas, and a group that is down fails its shops' requests instead of sending
them to another shard. Then against real `rice serve` shard groups on one Redis."""

from __future__ import annotations

import json
import random
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tools.sharded_proxy import SHARD_HEADER, RunningProxy, config_groups, nginx_binary, sharded_nginx

pytestmark = pytest.mark.integration


def shard_of(shop_id: str, n: int) -> int:
    return ((zlib.crc32(shop_id.encode()) >> 16) & 0x7FFF) % n


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
