"""Catalog scale end to end over HTTP: clips/s, latency, /livez and RSS with galleries of 0 to 1M items.

For each gallery size, in one run:
1. start the real service (`rice serve`, its own process, an empty SQLite gallery);
2. add 8 generated products through POST /v1/gallery/items (the encoder embeds them), then
   bulk-import N random unit vectors of the served dimension through POST /v1/gallery/bulk in
   requests of --rows rows (distractors: 4 images per SKU, 10 shops), timing the import;
3. wait until a background index build (past RICE_ANN_THRESHOLD) is done: the steady state;
4. --clients closed-loop clients upload 10-frame clips of the 8 products for --seconds while one
   prober calls /livez every 20 ms (`bench/livez_under_load.py`'s load loop).
Prints per size: clips/s, clip p50/p99, /livez p50/p99, share of clips whose right SKU ranks
first, the server's RSS, and clips/s relative to the first size (goal: >= 0.9 at 1M).

    PYTHONPATH=. .venv/bin/python bench/scale.py --sizes 0 100000 1000000 --clients 8
    PYTHONPATH=. .venv/bin/python bench/scale.py --sizes 0 150000 --clients 8     # the 150k check
    PYTHONPATH=. .venv/bin/python bench/scale.py --proj-dim 512 ...    # a 512-d checkpoint (Lite0 + projection)

Extra RICE_* variables for the service can be passed with --env KEY=VALUE (e.g. RICE_ANN_THRESHOLD=100000).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.livez_under_load import load
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct, make_products, render_clip
from tools.service_process import rss_mb, serve


def jpeg(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def bulk_import(c: httpx.Client, model_version: str, dim: int, n: int, rows: int) -> float:
    """n random unit vectors through POST /v1/gallery/bulk; returns seconds."""
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for start in range(0, n, rows):
        m = min(rows, n - start)
        v = rng.standard_normal((m, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        buf = io.BytesIO()
        np.save(buf, v, allow_pickle=False)
        items = "".join(
            json.dumps({"item_id": f"x{start + i}", "sku": f"bulk{(start + i) // 4}", "shop_id": f"shop{(start + i) % 10}"}) + "\n"
            for i in range(m)
        )
        r = c.post(
            "/v1/gallery/bulk",
            files={"vectors": ("v.npy", buf.getvalue()), "items": ("i.jsonl", items.encode())},
            data={"model_version": model_version},
            timeout=3600,
        )
        if r.status_code != 201:
            raise RuntimeError(f"bulk import failed: {r.status_code} {r.text[:300]}")
    return time.perf_counter() - t


def run_size(n: int, args: argparse.Namespace, products: list[DemoProduct], clips: list[bytes], env: dict[str, str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp, serve({"RICE_GALLERY_PATH": f"{tmp}/gallery.db", **env}) as (url, proc):
        with httpx.Client(base_url=url, timeout=600) as c:
            for p in products:
                r = c.post("/v1/gallery/items", files={"image": ("p.jpg", jpeg(p.image))}, data={"sku": p.sku, "shop_id": p.shop_id})
                r.raise_for_status()
            stats = c.get("/v1/gallery/stats").json()
            import_s = bulk_import(c, stats["namespace"], stats["dim"], n, args.rows) if n else 0.0
            t = time.perf_counter()
            while (stats := c.get("/v1/gallery/stats").json())["index_building"]:
                time.sleep(1.0)
            build_s = time.perf_counter() - t
        print(f"{n:,} items: imported in {import_s:.1f} s, index {stats['index']} (waited {build_s:.0f} s for its build)", file=sys.stderr)
        expect = [p.sku for p in products]
        asyncio.run(load(url, clips, args.clients, 3, expect))  # warm-up
        result = asyncio.run(load(url, clips, args.clients, args.seconds, expect))
        return {
            "gallery_items": stats["items"],
            "index": stats["index"],
            "import_s": round(import_s, 1),
            "import_rows_per_s": round(n / import_s) if n else 0,
            **{k: round(v, 3) for k, v in result.items()},
            "server_rss_mb": round(rss_mb(proc.pid)),
        }


def projection_checkpoint(folder: Path, dim: int) -> str:
    """The built-in ImageNet Lite0 plus a random `dim`-d projection, saved as a RICE checkpoint."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.config import EfficientNetConfig, EncoderConfig
    from model.encoder import build_backbone

    torch.manual_seed(0)
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=dim, pretrained=True))
    path = folder / f"lite0-proj{dim}.pt"
    save_checkpoint(path, build_backbone(cfg), cfg)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rows", type=int, default=100_000, help="rows per bulk request")
    p.add_argument(
        "--proj-dim", type=int, default=0, help="serve a Lite0 checkpoint with a projection to this dimension (0 = 1280-d built-in)"
    )
    p.add_argument("--env", action="append", default=[], help="extra RICE_* setting for the service, KEY=VALUE")
    args = p.parse_args()
    products = make_products(8, seed=4)
    rng = np.random.default_rng(1)
    # close-ups, as the tests' clips: with the zero-shot ImageNet encoder every one of these ranks its product first
    clips = [encode_video(render_clip(prod, rng, num_frames=20, scale=(0.8, 0.95))) for prod in products]
    env = dict(kv.split("=", 1) for kv in args.env)
    with tempfile.TemporaryDirectory() as ckpt_dir:
        if args.proj_dim:
            env["RICE_CHECKPOINT"] = projection_checkpoint(Path(ckpt_dir), args.proj_dim)
        rows = [run_size(n, args, products, clips, env) for n in args.sizes]
    for r in rows:
        print(json.dumps(r))
    base = rows[0]
    print(
        "| gallery items | index | clips/s | x first | clip p50 / p99 ms | /livez p50 / p99 ms | right SKU first | RSS MB | import rows/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gallery_items']:,} | {r['index']} | {r['clips_per_s']:.2f} | "
            f"{float(r['clips_per_s']) / float(base['clips_per_s']):.2f} | "  # type: ignore[arg-type]
            f"{r['clip_p50_ms']:.0f} / {r['clip_p99_ms']:.0f} | {r['livez_p50_ms']:.1f} / {r['livez_p99_ms']:.1f} | "
            f"{r.get('right_sku_first', float('nan')):.2f} | {r['server_rss_mb']} | {r['import_rows_per_s']:,} |"
        )


if __name__ == "__main__":
    main()
