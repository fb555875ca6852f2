"""`rice grocery-check`: the real-data check. Ingests a grocery-layout folder's catalog images
through the service's HTTP API (in process), turns each `val` photo into a hand-held clip written
as a real MP4, recognises every clip through the API, and reports R@1/5/10 as JSON."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from fastapi.testclient import TestClient

from model.checkpoint import load_encoder
from service.app import create_app
from service.settings import Settings
from tools.clipsynth import camera_motion_clip, encode_video
from train.grocery import read_grocery
from train.recall import recall_at_k


def run_grocery_check(
    data_root: str | Path,
    checkpoint: str | None = None,
    split: str = "val",
    clip_frames: int = 16,
    num_frames: int = 10,
    seed: int = 0,
    skus: set[str] | None = None,
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """R@1/5/10 of clips (and of single photos, for reference) against the catalog images.
    `skus` restricts gallery and queries to those products (for held-out evaluations);
    `overrides`: service settings for this run (e.g. {"verify": "false"})."""
    data = read_grocery(data_root)
    products = [p for p in data.products if skus is None or p.sku in skus]
    group = {p.sku: p.group for p in products}
    photos = [ph for ph in data.photos(split) if ph.sku in group]
    rng = np.random.default_rng(seed)
    settings = Settings(gallery_path=":memory:", checkpoint=checkpoint, **(overrides or {}))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    ranked_clip: list[list[str]] = []
    ranked_photo: list[list[str]] = []
    with TestClient(create_app(settings, encoder=load_encoder(checkpoint))) as client:
        for p in products:
            r = client.post(
                "/v1/gallery/items",
                files={"image": (p.catalog_image.name, p.catalog_image.read_bytes(), "image/jpeg")},
                data={"sku": p.sku},
            )
            r.raise_for_status()
        model_version = client.get("/v1/info").json()["model_version"]
        for ph in photos:
            raw = ph.path.read_bytes()
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
            if image is None:
                raise ValueError(f"unreadable photo: {ph.path}")
            clip = encode_video(camera_motion_clip(image, rng, num_frames=clip_frames, out_size=(256, 256)))
            r = client.post(
                "/v1/recognize", params={"top_k": 10, "num_frames": num_frames}, files={"file": ("clip.mp4", clip, "video/mp4")}
            )
            r.raise_for_status()
            ranked_clip.append([x["sku"] for x in r.json()["results"]])
            r = client.post("/v1/recognize/image", params={"top_k": 10}, files={"file": (ph.path.name, raw, "image/jpeg")})
            r.raise_for_status()
            ranked_photo.append([x["sku"] for x in r.json()["results"]])
    truth = [ph.sku for ph in photos]
    report: dict[str, Any] = {
        "data": str(data_root),
        "split": split,
        "model_version": model_version,
        "settings": overrides or {},
        "products": len(products),
        "queries": len(photos),
        "clip": recall_at_k(ranked_clip, truth),
        "single_photo": recall_at_k(ranked_photo, truth),
        "by_group": {},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    idx_by_group: dict[str, list[int]] = defaultdict(list)
    for i, ph in enumerate(photos):
        idx_by_group["packaged" if group[ph.sku] == "Packages" else "fresh"].append(i)
    for g, idx in sorted(idx_by_group.items()):
        report["by_group"][g] = {
            "queries": len(idx),
            "clip": recall_at_k([ranked_clip[i] for i in idx], [truth[i] for i in idx]),
            "single_photo": recall_at_k([ranked_photo[i] for i in idx], [truth[i] for i in idx]),
        }
    return report
