"""Shop-sharded replica groups behind nginx: throughput through the proxy beside one replica asked
directly, in one run, and a write visible only on its shard.

Starts a private redis-server, two `rice serve` processes (RICE_SHARDS=2, shard 0 and shard 1, one
replica per group) and Debian's nginx with docker/nginx-sharded.conf (`make proxy` installs it),
all on loopback. Each shard gets --shops shops holding the same --products generated products
(added through nginx). Then --clients closed-loop clients upload catalog-like still images to
POST /v1/recognize/image for --seconds per phase:

  direct       shard 0's shops, straight to shard 0's replica (the reference);
  nginx, 1     the same shops through nginx (the proxy's own cost);
  nginx, 2     shops of both shards through nginx (both groups serving).

Every answer must be 200 with the query's SKU first among its shop's items (else it is counted).
Then the write check: an item added through nginx for a shard-0 shop is found through nginx, and
shard 1's replica neither holds it (its stats do not move) nor answers for that shop (421); an item
for a shard-1 shop sent straight to shard 0's replica lands in shard 1.

    PYTHONPATH=. .venv/bin/python bench/sharded.py --clients 8 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from index.shards import shard_of
from tests.conftest import RedisServer
from tools.democatalog import DemoProduct, make_products
from tools.service_process import serve
from tools.sharded_proxy import SHARD_HEADER, sharded_nginx


def jpeg(image: np.ndarray) -> bytes:
    return bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())


def shops_by_shard(per_shard: int, seed: int = 19) -> list[list[str]]:
    rng = random.Random(seed)
    out: list[list[str]] = [[], []]
    while min(len(s) for s in out) < per_shard:
        shop = f"shop-{rng.randrange(10**9)}"
        if len(out[shard_of(shop, 2)]) < per_shard:
            out[shard_of(shop, 2)].append(shop)
    return out


@contextmanager
def stack(workdir: Path, extra_env: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """Redis, the two shard groups and nginx; yields (nginx url, [shard 0 url, shard 1 url])."""
    with ExitStack() as es:
        redis = RedisServer(workdir / "redis")
        redis.workdir.mkdir()
        redis.start()
        es.callback(redis.stop)
        urls = []
        for i in range(2):
            env = {
                "RICE_REDIS_URL": redis.url,
                "RICE_SHARDS": "2",
                "RICE_SHARD": str(i),
                "RICE_GALLERY_PATH": str(workdir / f"s{i}-unused.db"),
                "RICE_JOB_DIR": str(workdir / "jobs"),
                "RICE_BLOB_DIR": str(workdir / "originals"),
                "RICE_ALLOW_OPEN": "true",
                **extra_env,
            }
            url, _ = es.enter_context(serve(env, ready_timeout_s=600))
            urls.append(url)
        proxy = es.enter_context(sharded_nginx([[u.removeprefix("http://")] for u in urls], workdir / "nginx"))
        yield proxy.url, urls


def add_catalog(url: str, shops: Sequence[str], products: Sequence[DemoProduct]) -> int:
    version = 0
    with httpx.Client(base_url=url, timeout=300) as c:
        for shop in shops:
            for p in products:
                r = c.post(
                    "/v1/gallery/items",
                    params={"shop_id": shop},  # what nginx routes on (the form field is what the service stores)
                    data={"sku": p.sku, "shop_id": shop, "item_id": f"{p.sku}-{shop}"},
                    files={"image": ("p.jpg", jpeg(p.image), "image/jpeg")},
                )
                r.raise_for_status()
                version = max(version, int(r.json()["gallery_version"]))
    return version


async def closed_loop(url: str, shops: Sequence[str], queries: Sequence[tuple[str, bytes]], clients: int, seconds: float) -> dict[str, Any]:
    """`clients` clients each sending a random (shop, product image) query after the last answer."""
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    shards: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds

    async def client(i: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.perf_counter() < deadline:
            shop = rng.choice(shops)
            sku, image = rng.choice(queries)
            t = time.perf_counter()
            r = await c.post("/v1/recognize/image", params={"shop_id": shop, "top_k": 3}, files={"file": ("q.jpg", image, "image/jpeg")})
            latencies.append(time.perf_counter() - t)
            shards[r.headers.get(SHARD_HEADER, "-")] += 1
            if r.status_code != 200:
                outcomes[str(r.status_code)] += 1
            elif not r.json()["results"] or r.json()["results"][0]["sku"] != sku:
                outcomes["wrong sku"] += 1
            else:
                outcomes["ok"] += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(i, c) for i in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    return {"rps": len(latencies) / wall, "p50": q[49] * 1000, "p99": q[98] * 1000, "outcomes": outcomes, "shards": shards}


def write_check(nginx: str, direct: list[str], shops: list[list[str]], image: bytes) -> list[str]:
    """The write-visible-only-on-its-shard check; returns the report's lines (AssertionError if it fails)."""
    lines = []
    with httpx.Client(timeout=300) as c:

        def stats(i: int) -> dict[str, Any]:
            return dict(c.get(f"{direct[i]}/v1/gallery/stats").json())

        def add(url: str, shop: str, item: str) -> dict[str, Any]:
            data = {"sku": "SKU-W", "shop_id": shop, "item_id": item}
            r = c.post(f"{url}/v1/gallery/items", data=data, files={"image": ("w.jpg", image, "image/jpeg")})
            r.raise_for_status()
            return dict(r.json())

        shop_a, shop_b = shops[0][0], shops[1][0]
        before = [stats(0), stats(1)]
        added = add(nginx, shop_a, "written-through-nginx")  # no shop in the URL: any group takes a write
        listed = c.get(f"{nginx}/v1/gallery/items", params={"shop_id": shop_a, "sku": "SKU-W"}).json()["items"]
        found = c.post(
            f"{nginx}/v1/recognize/image",
            params={"shop_id": shop_a, "min_gallery_version": added["gallery_version"]},
            files={"file": ("q.jpg", image, "image/jpeg")},
        ).json()["results"][0]["item_id"]
        other = c.get(f"{direct[1]}/v1/gallery/items", params={"shop_id": shop_a})
        after1 = stats(1)
        ok = (
            added["shard"] == 0
            and [i["item_id"] for i in listed] == ["written-through-nginx"]
            and found == "written-through-nginx"
            and other.status_code == 421
            and after1["items"] == before[1]["items"]
            and after1["gallery_version"] == before[1]["gallery_version"]
        )
        lines.append(
            f"write through nginx for a shard-0 shop: shard {added['shard']}; listed and recognised through nginx: "
            f"{found == 'written-through-nginx'}; shard 1's items {before[1]['items']} -> {after1['items']}, "
            f"version {before[1]['gallery_version']} -> {after1['gallery_version']}; shard 1 asked for the shop: {other.status_code}"
        )
        assert ok, lines[-1]
        added = add(direct[0], shop_b, "written-to-the-wrong-group")
        deadline = time.monotonic() + 60
        while stats(1)["gallery_version"] < added["gallery_version"]:
            assert time.monotonic() < deadline, "shard 1 never applied the write"
            time.sleep(0.05)
        listed = c.get(f"{nginx}/v1/gallery/items", params={"shop_id": shop_b, "sku": "SKU-W"}).json()["items"]
        after0 = stats(0)
        ok = added["shard"] == 1 and [i["item_id"] for i in listed] == ["written-to-the-wrong-group"]
        ok = ok and after0["items"] == before[0]["items"] + 1  # only the first write
        lines.append(
            f"write for a shard-1 shop sent to shard 0's replica: landed in shard {added['shard']}, listed through nginx: "
            f"{bool(listed)}; shard 0's items {before[0]['items']} -> {after0['items']} (its own write only)"
        )
        assert ok, lines[-1]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--shops", type=int, default=3, help="shops per shard")
    ap.add_argument("--products", type=int, default=4)
    ap.add_argument("--env", action="append", default=[], help="extra RICE_* KEY=VALUE for both groups")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    products = make_products(args.products, seed=4)
    queries = [(p.sku, jpeg(p.image)) for p in products]
    shops = shops_by_shard(args.shops)
    with tempfile.TemporaryDirectory(prefix="rice-sharded-") as tmp, stack(Path(tmp), extra) as (nginx, direct):
        t = time.perf_counter()
        add_catalog(nginx, shops[0] + shops[1], products)
        took = time.perf_counter() - t
        print(f"catalog: {args.products} products in each of {args.shops} shops per shard, added through nginx in {took:.1f} s")
        asyncio.run(closed_loop(direct[0], shops[0], queries, args.clients, min(5.0, args.seconds)))  # warm-up
        phases = [
            ("direct to shard 0's replica", direct[0], shops[0]),
            ("nginx, shard 0's shops", nginx, shops[0]),
            ("nginx, both shards' shops", nginx, shops[0] + shops[1]),
        ]
        results = [(name, asyncio.run(closed_loop(url, s, queries, args.clients, args.seconds))) for name, url, s in phases]
        base = results[0][1]["rps"]
        print(f"\n{args.clients} clients, {args.seconds:.0f} s per phase, POST /v1/recognize/image\n")
        print("| phase | requests/s | vs direct | p50 ms | p99 ms | answers | served by shard (X-Rice-Shard) |")
        print("|---|---|---|---|---|---|---|")
        for name, r in results:
            answers = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()))
            served = ", ".join(f"{k}: {v}" for k, v in sorted(r["shards"].items()))
            print(f"| {name} | {r['rps']:.1f} | {r['rps'] / base:.2f} | {r['p50']:.0f} | {r['p99']:.0f} | {answers} | {served} |")
        print()
        for line in write_check(nginx, direct, shops, jpeg(make_products(1, seed=99)[0].image)):
            print(line)


if __name__ == "__main__":
    main()
