"""`rice demo`: serve on localhost with the embedded gallery, seed it with the generated demo
catalog, upload demo clips and print the top-k SKUs per clip beside the right answer and the
verdict ("match" or "no match") a client acting on the answer would see."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from service.server import background_server
from service.settings import Settings
from tools.democatalog import write_demo_catalog


def run_demo(settings: Settings, out_dir: Path, products: int, clips_per_product: int, top_k: int, seed: int) -> float:
    """Returns the share of clips whose right SKU ranked first."""
    t = time.perf_counter()
    manifest = write_demo_catalog(out_dir, n_products=products, clips_per_product=clips_per_product, seed=seed)
    print(
        f"generated {len(manifest['products'])} products and {len(manifest['clips'])} clips in {out_dir} ({time.perf_counter() - t:.1f} s)"
    )
    with background_server(settings) as url, httpx.Client(base_url=url, timeout=120.0) as client:
        print(f"service ready at {url}; model {client.get('/v1/info').json()['model_version']}")
        for p in manifest["products"]:
            with (out_dir / p["image"]).open("rb") as f:
                r = client.post(
                    "/v1/gallery/items",
                    files={"image": (Path(p["image"]).name, f, "image/jpeg")},
                    # a stable item id makes re-running the demo an idempotent upsert
                    data={
                        "sku": p["sku"],
                        "shop_id": p["shop_id"],
                        "item_id": f"{p['sku']}-catalog",
                        "metadata": f'{{"name": "{p["name"]}"}}',
                    },
                )
            r.raise_for_status()
        print(f"ingested {len(manifest['products'])} catalog images; gallery version {r.json()['gallery_version']}\n")
        hits = matches = right_matches = 0
        info = client.get("/v1/info").json()
        # the verdict decides "match" when the served model has one (match_probability), else the score threshold
        rule = f"match_probability >= {info['match_probability']:.3f}" if info.get("match_probability") is not None else ""
        rule = rule or f"score >= {info['match_threshold']:.4f}"
        print(f"{'clip':<22} {'truth':<10} {'top-' + str(top_k) + ' (score)':<60} ok  verdict   ms")
        for c in manifest["clips"]:
            with (out_dir / c["path"]).open("rb") as f:
                r = client.post("/v1/recognize", params={"top_k": top_k}, files={"file": (Path(c["path"]).name, f, "video/mp4")})
            r.raise_for_status()
            body = r.json()
            ranked = [(x["sku"], x["score"]) for x in body["results"]]
            ok = bool(ranked) and ranked[0][0] == c["sku"]
            hits += ok
            if body.get("match_probability") is None:
                rule = f"score >= {info['match_threshold']:.4f}"  # this model has no verdict
            matches += body["match"]  # what a client acting on the verdict sees: "match", or "none of these"
            right_matches += body["match"] and ok
            shown = ", ".join(f"{s} ({v:.2f})" for s, v in ranked)
            verdict = "match" if body["match"] else "no match"
            name = Path(c["path"]).name
            print(f"{name:<22} {c['sku']:<10} {shown:<60} {'yes' if ok else 'NO ':<3} {verdict:<9} {body['timings_ms']['total']:.0f}")
    n = len(manifest["clips"])
    share = hits / max(n, 1)
    print(f"\nright SKU ranked first for {hits}/{n} clips (R@1 {share:.0%})")
    print(
        f'answered "match" for {matches}/{n} clips ({matches / max(n, 1):.0%}; {right_matches} of them right) with '
        f'{rule}; the rest said "none of these" (see the README on the verdict)'
    )
    return share
