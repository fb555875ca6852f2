"""Region crops scored against the gallery, and frame-quality pooling: units, then the real app path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.gallery import Hit
from model.checkpoint import LoadedEncoder
from pipeline.quality import agreement_weights, weighted_clip_vector
from pipeline.regions import GRID, fuse_hits, parse_grid, region_boxes, region_crops, region_fusion
from service.app import create_app
from tests.conftest import jpeg, settings_for
from tools.democatalog import DemoProduct


def test_region_boxes_default_centre_crops_and_a_covering_grid() -> None:
    assert parse_grid("0.6:1,0.42:1") == GRID
    assert region_boxes(224) == [(45, 45, 134), (65, 65, 94)]  # centred
    for bad in ("0.5", "0:1", "1.5:2", "0.5:9", "a:b"):
        with pytest.raises(ValueError):
            parse_grid(bad)
    boxes = region_boxes(224, parse_grid("0.5:3,0.7:2"))
    assert len(boxes) == 13
    assert all(x >= 0 and y >= 0 and x + s <= 224 and y + s <= 224 for x, y, s in boxes)
    covered = np.zeros((224, 224), bool)
    for x, y, s in boxes:
        covered[y : y + s, x : x + s] = True
    assert covered.all()
    # every small product box (side 0.3 of the frame) lies at least 80% inside some half-frame crop
    for px in range(0, 224 - 67, 9):
        best = max(max(0, min(px + 67, x + s) - max(px, x)) / 67 for x, _, s in boxes if s == 112)
        assert best >= 0.8


def test_region_crops_are_frame_major_and_resized() -> None:
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[1, :32, :32] = 200  # frame 1's top-left quarter is bright
    boxes = [(0, 0, 32), (32, 32, 32)]
    crops = region_crops(frames, boxes)
    assert crops.shape == (4, 64, 64, 3)
    assert crops[2].min() == 200 and crops[3].max() == 0 and crops[:2].max() == 0


def _hit(sku: str, score: float) -> Hit:
    return Hit(sku, score, f"{sku}-item", None, {})


def test_fuse_hits_max_and_mean() -> None:
    whole = [_hit("a", 0.8), _hit("b", 0.7), _hit("c", 0.5)]
    regions = [[_hit("b", 0.9), _hit("a", 0.6)], [_hit("d", 0.95), _hit("b", 0.85)]]
    by_max = fuse_hits(whole, regions, 3, "max")
    assert [(h.sku, h.score) for h in by_max] == [("d", 0.95), ("b", 0.9), ("a", 0.8)]
    by_mean = {h.sku: h.score for h in fuse_hits(whole, regions, 4, "mean")}
    assert by_mean["b"] == pytest.approx(0.8)  # (0.7 + 0.9) / 2
    assert by_mean["d"] == pytest.approx((0.5 + 0.95) / 2)  # missing from the whole-clip list: its floor
    assert by_mean["a"] == pytest.approx((0.8 + 0.6) / 2)
    with pytest.raises(ValueError):
        region_fusion("median")


def test_agreement_weights_discount_outlier_and_dark_frames() -> None:
    rng = np.random.default_rng(0)
    product = rng.normal(size=64)
    frames = product + 0.3 * rng.normal(size=(10, 64))  # [10, 64] frames showing the product
    frames[:2] = rng.normal(size=(2, 64))  # two frames without it
    w = agreement_weights(frames)
    assert w.sum() == pytest.approx(1.0) and w[:2].max() < 0.02 < w[2:].min()
    unit = product / np.linalg.norm(product)
    plain = weighted_clip_vector(frames, np.full(10, 0.1))
    assert weighted_clip_vector(frames, w) @ unit > plain @ unit
    usable = np.ones(10, bool)
    usable[5] = False
    assert agreement_weights(frames, usable=usable)[5] == 0.0
    assert agreement_weights(frames, usable=np.zeros(10, bool)).min() > 0  # all dark: use them all


@pytest.mark.integration
@pytest.mark.parametrize("fusion", ["max", "mean"])
def test_region_stage_through_the_app(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes], fusion: str
) -> None:
    """With regions on, a clip runs the stage and every SKU's score follows the fusion rule against
    the whole-clip scores of the same request with regions off (same model, same gallery)."""
    clip = clip_of(products[0], seed=3, frames=8, scale=(0.35, 0.45))
    answers = {}
    for on in (False, True):
        settings = settings_for(tmp_path / str(on), regions=on, region_frames=2, region_fusion=fusion, frame_weighting="agreement")
        with TestClient(create_app(settings, encoder=encoder)) as c:
            for p in products[:6]:
                files = {"image": (f"{p.sku}.jpg", jpeg(p.image), "image/jpeg")}
                assert c.post("/v1/gallery/items", files=files, data={"sku": p.sku}).status_code == 201
            r = c.post("/v1/recognize", params={"top_k": 6, "num_frames": 8}, files={"file": ("c.mp4", clip, "video/mp4")})
            assert r.status_code == 200, r.text
            answers[on] = r.json()
    assert "regions" in answers[True]["timings_ms"] and "regions" not in answers[False]["timings_ms"]
    assert "quality" in answers[True]["timings_ms"]
    whole = {x["sku"]: x["score"] for x in answers[False]["results"]}
    fused = {x["sku"]: x["score"] for x in answers[True]["results"]}
    assert set(fused) == set(whole)  # all 6 SKUs in both answers
    if fusion == "max":
        assert all(fused[s] >= whole[s] - 0.02 for s in whole)  # quality pooling moves the whole-clip vector a little
    assert answers[True]["match"] == (answers[True]["results"][0]["score"] >= answers[True]["match_threshold"])
