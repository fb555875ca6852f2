"""Verification with local features (pipeline.local_features, pipeline.verify), the stored catalog
features (both stores, replicated through Redis, removed with the item) and the verdict (model.verdict)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from index.sqlite_store import SQLiteStore
from model.checkpoint import LoadedEncoder
from model.config import PreprocessConfig
from model.verdict import SIGNALS, Candidate, VerdictModel, builtin_verdict, fit, signals
from pipeline.decode import DecodeLimits, decode_catalog, decode_clip
from pipeline.local_features import MAX_CATALOG_FEATURES, MAX_FEATURE_BYTES, LocalFeatures, extract, extract_catalog, match
from pipeline.verify import FeatureCache, _verify, candidates_from_results, fused_score
from service.app import create_app
from service.settings import Settings
from tests.conftest import RedisServer, jpeg, settings_for
from tools.clipsynth import encode_video
from train.calibrate import auroc

H_PLANT = np.array([[0.55, 0.08, 180.0], [-0.04, 0.6, 90.0], [1.5e-4, 1e-4, 1.0]])  # catalog (900x700) -> scene (640x480)


def product_image(seed: int, h: int = 900, w: int = 700) -> np.ndarray:
    """A printed package: coloured shapes and words on white (BGR uint8 [h, w, 3]), distinct per seed."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 255, np.uint8)
    for _ in range(120):
        colour = tuple(int(c) for c in rng.integers(0, 230, 3))
        centre = tuple(int(c) for c in rng.integers(0, [w, h]))
        if rng.random() < 0.5:
            cv2.circle(img, centre, int(rng.integers(6, 60)), colour, -1)
        else:
            cv2.rectangle(img, centre, (centre[0] + int(rng.integers(10, 90)), centre[1] + int(rng.integers(10, 90))), colour, -1)
    for i in range(10):
        cv2.putText(img, f"BRAND {seed}{i} XQ", (20, 60 + i * 85), cv2.FONT_HERSHEY_SIMPLEX, 1.6, (20, 20, 20), 3)
    return img


def scene_with(product: np.ndarray, seed: int = 0) -> np.ndarray:
    """The product warped by H_PLANT into a 640x480 blurred-noise scene (BGR)."""
    rng = np.random.default_rng(seed + 100)
    scene = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3)).astype(np.uint8), (11, 11), 4)
    warped = cv2.warpPerspective(product, H_PLANT, (640, 480))
    mask = cv2.warpPerspective(np.ones(product.shape[:2], np.uint8), H_PLANT, (640, 480)) > 0
    scene[mask] = warped[mask]
    return scene


def planted_corners(h: int = 900, w: int = 700) -> np.ndarray:
    corners = np.array([[[0, 0]], [[w, 0]], [[w, h]], [[0, h]]], np.float64)
    return cv2.perspectiveTransform(corners, H_PLANT)[:, 0]


# -- features ---------------------------------------------------------------------------------------


def test_catalog_features_fit_the_budget_and_round_trip() -> None:
    feats = extract_catalog(cv2.cvtColor(product_image(1), cv2.COLOR_BGR2GRAY))
    assert len(feats) == MAX_CATALOG_FEATURES and not feats.featureless
    assert (feats.width, feats.height) == (700, 900)  # points in the upload's own pixels
    data = feats.to_bytes()
    assert len(data) <= MAX_FEATURE_BYTES
    back = LocalFeatures.from_bytes(data)
    assert np.array_equal(back.descriptors, feats.descriptors)
    assert np.abs(back.points - feats.points).max() <= 0.5  # float16 at < 1024 px
    assert (back.width, back.height) == (700, 900)
    for bad in (b"", data[:10], b"XXXX" + data[4:], data[:-1], data + b"\0"):
        with pytest.raises(ValueError):
            LocalFeatures.from_bytes(bad)


def test_plain_product_is_featureless() -> None:
    apple = np.full((400, 400, 3), 40, np.uint8)
    cv2.circle(apple, (200, 200), 150, (30, 60, 200), -1)
    assert extract_catalog(apple).featureless


def test_matching_finds_the_planted_product_and_its_box() -> None:
    catalog = LocalFeatures.from_bytes(extract_catalog(cv2.cvtColor(product_image(1), cv2.COLOR_BGR2GRAY)).to_bytes())
    query = extract(cv2.cvtColor(scene_with(product_image(1)), cv2.COLOR_BGR2GRAY))
    m = match(query, catalog)
    assert m.inliers >= 40 and m.homography is not None
    assert m.coverage > 0.5 and 0 < m.inlier_ratio <= 1
    assert np.abs(np.array(m.box(catalog.width, catalog.height)) - planted_corners()).max() < 6
    other = extract_catalog(cv2.cvtColor(product_image(2), cv2.COLOR_BGR2GRAY))
    assert match(query, other).inliers < 10  # another print: no geometric agreement
    assert fused_score(0.5, m.inliers) > fused_score(0.55, match(query, other).inliers)


def test_small_frames_are_upscaled_for_detection_and_boxes_stay_in_source_pixels() -> None:
    """A 200 px frame (the product about 100 px wide): nothing verifies at its own size (the default,
    RICE_VERIFY_MIN_SIDE=0), upscaled to 512 it does, and the box is still in the source frame's pixels."""
    catalog = LocalFeatures.from_bytes(extract_catalog(cv2.cvtColor(product_image(1), cv2.COLOR_BGR2GRAY)).to_bytes())
    small = cv2.cvtColor(cv2.resize(scene_with(product_image(1)), (200, 150), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    as_is = _verify(small[None], [catalog], 640 / 200, Settings().verify_min_side)[0]
    upscaled = _verify(small[None], [catalog], 640 / 200, 512)[0]
    assert as_is.inliers < 10 and upscaled.inliers >= 25 and upscaled.frames_verified == 1
    assert upscaled.box is not None and np.abs(np.array(upscaled.box) - planted_corners()).max() < 8


def test_feature_cache_is_bounded_and_fetches_once() -> None:
    data = extract_catalog(cv2.cvtColor(product_image(3), cv2.COLOR_BGR2GRAY)).to_bytes()
    calls: list[list[str]] = []

    def fetch(ids: list[str]) -> dict[str, bytes]:
        calls.append(ids)
        return {i: data if i != "bad" else b"junk" for i in ids if i != "none"}

    cache = FeatureCache(fetch, max_items=2)
    got = cache.get(["a", "none", "bad"])
    assert got["a"] is not None and got["none"] is None and got["bad"] is None  # unreadable: no features, no crash
    assert len(cache) == 2 and calls == [["a", "none", "bad"]]
    cache.get(["bad"])
    assert len(calls) == 1  # still cached
    cache.get(["a"])  # evicted by the bound: fetched again
    assert calls[-1] == ["a"]


def test_decode_returns_views_and_catalog_features_from_one_decode() -> None:
    pre = PreprocessConfig()
    frames = [cv2.cvtColor(scene_with(product_image(1), s), cv2.COLOR_BGR2RGB) for s in range(6)]
    clip = decode_clip(encode_video(frames), 4, pre, DecodeLimits(), view_side=320)
    assert clip.views is not None and clip.views.shape == (len(clip.frames), 240, 320) and clip.views.dtype == np.uint8
    assert decode_clip(encode_video(frames), 4, pre, DecodeLimits()).views is None
    cat = decode_catalog(jpeg(product_image(1)), pre, 10**8)
    assert cat.frame.shape == (pre.crop, pre.crop, 3)
    feats = LocalFeatures.from_bytes(cat.features.tobytes())
    assert (feats.width, feats.height) == (700, 900) and len(feats) > 100


# -- the verdict ------------------------------------------------------------------------------------


def test_verdict_fits_separable_signals_and_round_trips() -> None:
    rng = np.random.default_rng(0)

    def inl(lo: int, hi: int) -> int:
        return int(rng.integers(lo, hi))

    right = [signals([Candidate(0.7, inl(20, 90), 0.5, 1.0, True), Candidate(0.65, inl(0, 12))]) for _ in range(60)]
    wrong = [signals([Candidate(0.7, inl(0, 14), 0.1, 0.0, True), Candidate(0.69, inl(0, 14))]) for _ in range(60)]
    x, y = np.array(right + wrong), np.array([1.0] * 60 + [0.0] * 60)
    assert x.shape == (120, len(SIGNALS))
    model = fit(x, y)
    p = model.probability(x)
    assert ((p > 0) & (p < 1)).all() and auroc(p[:60], p[60:]) > 0.95
    assert VerdictModel.from_json(model.to_json()) == model
    with pytest.raises(ValueError):
        VerdictModel.from_json(json.dumps({**json.loads(model.to_json()), "signals": ["other"]}))
    assert signals([]).shape == (len(SIGNALS),)


def test_candidates_rebuilt_from_an_answer_give_the_same_signals() -> None:
    results = [
        {"sku": "a", "score": 0.9, "embedding_score": 0.7, "inliers": 40, "coverage": 0.5, "frames_verified": 2, "verifiable": True},
        {"sku": "b", "score": 0.6, "embedding_score": 0.6, "inliers": 3, "coverage": 0.0, "frames_verified": 0, "verifiable": False},
        {"sku": "c", "score": 0.55},  # an answer without verification evidence
    ]
    got = candidates_from_results(results, 3)  # type: ignore[arg-type]
    assert got[0] == Candidate(0.7, 40, 0.5, 2 / 3, True) and got[2] == Candidate(0.55)


def test_builtin_verdict_is_shipped() -> None:
    model = builtin_verdict()
    assert model is not None and 0 < model.threshold < 1


# -- through the service ----------------------------------------------------------------------------


def _add(c: TestClient, image: np.ndarray, sku: str, item_id: str) -> dict[str, object]:
    r = c.post("/v1/gallery/items", files={"image": ("p.jpg", jpeg(image), "image/jpeg")}, data={"sku": sku, "item_id": item_id})
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def _recognize(c: TestClient, image: np.ndarray, **params: object) -> dict[str, object]:
    r = c.post("/v1/recognize/image", params={"top_k": 10, **params}, files={"file": ("q.jpg", jpeg(image), "image/jpeg")})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_settings_defaults() -> None:
    s = Settings()
    assert s.verify_min_side == 0
    assert (s.verify, s.verify_top_k, s.verify_frames, s.verify_side, s.feature_cache_items, s.match_probability) == (
        True,
        10,
        3,
        640,
        4096,
        None,
    )


@pytest.mark.integration
def test_http_answers_are_verified_localised_and_carry_a_probability(tmp_path: Path, encoder: LoadedEncoder) -> None:
    with TestClient(create_app(settings_for(tmp_path), encoder=encoder)) as c:  # default settings: verification on
        for seed in (1, 2, 3):
            _add(c, product_image(seed), f"sku-{seed}", f"item-{seed}")
        info = c.get("/v1/info").json()
        assert info["verify"] is True and 0 < info["match_probability"] < 1
        # a bulk-imported item: a vector and no image, so no local features
        dim = info["embedding_dim"]
        vec = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
        items = b'{"item_id": "bulk-1", "sku": "bulk"}\n'
        files = {"vectors": ("v.npy", _npy(vec), "application/octet-stream"), "items": ("i.jsonl", items)}
        r = c.post("/v1/gallery/bulk", files=files, data={"model_version": info["model_version"]})
        assert r.status_code == 201, r.text

        body = _recognize(c, scene_with(product_image(2)))
        results = body["results"]
        assert isinstance(results, list) and results[0]["sku"] == "sku-2"
        top = results[0]
        assert top["inliers"] >= 20 and top["verifiable"] is True and top["score"] > top["embedding_score"]
        assert top["box"]["frame"] == 0
        assert np.abs(np.array(top["box"]["polygon"]) - planted_corners()).max() < 8  # in the query image's pixels
        big = _recognize(c, cv2.resize(scene_with(product_image(2)), (1600, 1200)))["results"][0]  # verified at 640 px
        assert np.abs(np.array(big["box"]["polygon"]) - 2.5 * planted_corners()).max() < 20  # in the upload's pixels
        bulk = next(r for r in results if r["sku"] == "bulk")
        assert bulk["verifiable"] is False and bulk["inliers"] == 0 and bulk["box"] is None
        p = body["match_probability"]
        assert isinstance(p, float) and 0 <= p <= 1 and body["match"] == (p >= info["match_probability"])
        # an old client's min_score still decides match on the top-1 score
        assert _recognize(c, scene_with(product_image(2)), min_score=-1.0)["match"] is True
        assert _recognize(c, scene_with(product_image(2)), min_score=1.0)["match"] is False

        # deleted: its features go with it, and a gallery of only a bulk item still answers
        for seed in (1, 2, 3):
            assert c.delete(f"/v1/gallery/items/item-{seed}").status_code == 200
        store = c.app.state.serving.current.replica.store  # type: ignore[attr-defined]
        assert isinstance(store, SQLiteStore) and store.features(["item-1", "item-2", "item-3"]) == {}
        body = _recognize(c, scene_with(product_image(2)))
        assert [r["sku"] for r in body["results"]] == ["bulk"] and 0 <= body["match_probability"] <= 1


@pytest.fixture
def two_replicas(tmp_path: Path, redis_server: RedisServer, encoder: LoadedEncoder) -> Iterator[tuple[TestClient, TestClient]]:
    apps = [create_app(settings_for(tmp_path / n, redis_url=redis_server.url), encoder=encoder) for n in ("a", "b")]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b:
        yield a, b


@pytest.mark.integration
def test_features_are_replicated_and_removed_everywhere_through_redis(two_replicas: tuple[TestClient, TestClient]) -> None:
    a, b = two_replicas
    added = _add(a, product_image(5), "sku-5", "shared-5")
    _add(a, product_image(6), "sku-6", "shared-6")
    body = _recognize(b, scene_with(product_image(5)), min_gallery_version=added["gallery_version"])
    top = body["results"][0]  # type: ignore[index]
    assert top["sku"] == "sku-5" and top["inliers"] >= 20 and top["box"] is not None  # features written through a, read by b
    for c in (a, b):
        assert set(c.app.state.serving.current.replica.features(["shared-5", "shared-6"])) == {"shared-5", "shared-6"}  # type: ignore[attr-defined]
    deleted = b.delete("/v1/gallery/items/shared-5").json()  # deleted through the other replica
    for c in (a, b):
        assert set(c.app.state.serving.current.replica.features(["shared-5", "shared-6"])) == {"shared-6"}  # type: ignore[attr-defined]
    body = _recognize(a, scene_with(product_image(5)), min_gallery_version=deleted["gallery_version"])
    assert [r["sku"] for r in body["results"]] == ["sku-6"]  # type: ignore[union-attr]


def test_verdict_stored_in_a_checkpoint_is_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.checkpoint import CheckpointError, load_encoder, save_checkpoint, set_checkpoint_fields
    from model.config import EfficientNetConfig, EncoderConfig
    from model.encoder import build_backbone
    from service.state import match_probability
    from train import calibrate

    cfg = EncoderConfig(efficientnet=EfficientNetConfig(pretrained=False))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, build_backbone(cfg), cfg)
    assert load_encoder(ckpt).verdict is None
    model = VerdictModel((0.1,) * len(SIGNALS), -0.2, (0.0,) * len(SIGNALS), (1.0,) * len(SIGNALS), 0.42)
    (tmp_path / "v.json").write_text(model.to_json())
    monkeypatch.setattr("sys.argv", ["calibrate", "--verdict", str(tmp_path / "v.json"), "--checkpoint", str(ckpt)])
    calibrate.main()
    loaded = load_encoder(ckpt)
    assert loaded.verdict == model
    assert match_probability(Settings(), loaded.verdict) == 0.42 and match_probability(Settings(match_probability=0.7), model) == 0.7
    set_checkpoint_fields(ckpt, {"verdict": "{}"})
    with pytest.raises(CheckpointError):
        load_encoder(ckpt)


def test_verify_stage_reranks_by_geometry_and_degrades_without_the_store() -> None:
    import asyncio

    from index.errors import StoreUnavailable
    from index.gallery import Hit
    from pipeline.stages import Query
    from pipeline.verify import Verify

    feats = {f"i{s}": extract_catalog(cv2.cvtColor(product_image(s), cv2.COLOR_BGR2GRAY)).to_bytes() for s in (1, 2)}
    scene = scene_with(product_image(2))
    model = VerdictModel((0.5,) * len(SIGNALS), 0.0, (0.0,) * len(SIGNALS), (1.0,) * len(SIGNALS), 0.5)

    def query() -> Query:
        q = Query("image", b"", top_k=1, search_k=10)
        q.frames = np.zeros((1, 224, 224, 3), np.uint8)
        q.views = cv2.cvtColor(scene, cv2.COLOR_BGR2GRAY)[None]
        q.hits = [Hit("s1", 0.62, "i1", None, {}), Hit("s2", 0.60, "i2", None, {}), Hit("bulk", 0.5, "b", None, {})]
        return q

    q = query()
    asyncio.run(Verify(FeatureCache(lambda ids: {i: feats[i] for i in ids if i in feats}), model)(q))
    assert [h.sku for h in q.hits] == ["s2", "s1", "bulk"]  # the embedding's runner-up, verified, moves up
    assert q.evidence["s2"]["inliers"] >= 20 and q.evidence["s2"]["box"] is not None and q.evidence["s2"]["embedding_score"] == 0.6
    assert q.evidence["bulk"]["verifiable"] is False and q.match_probability is not None and 0 < q.match_probability < 1

    def down(ids: list[str]) -> dict[str, bytes]:
        raise StoreUnavailable("redis: connection refused")

    q = query()
    asyncio.run(Verify(FeatureCache(down), model)(q))  # the store is down: the embedding's order, still a verdict
    assert [h.sku for h in q.hits] == ["s1", "s2", "bulk"] and q.evidence["s1"]["inliers"] == 0
    assert q.match_probability is not None and Verify.kinds == frozenset({"clip", "image"})
