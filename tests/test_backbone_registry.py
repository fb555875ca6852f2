"""The backbone registry: a toy backbone (tests/toy_backbone.py, one registry line) trains, checkpoints,
serves and interpolates through the same code as the built-in ones; the checkpoint gives back the
trained RICE heads, the patch tokens and the match threshold."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from model.backbones import REGISTRY, Backbone, backbone_names, build_backbone, get_spec
from model.checkpoint import load_encoder
from model.config import EncoderConfig
from model.encoder import clip_embedding, pool_clip
from tests.test_rice_train import _video_dataset
from train.train import build_parser, run
from train.wise import interpolate


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "toy", "tests.toy_backbone:SPEC")  # the one registry line


def _train(manifest: Path, out: Path, *extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser(p)
    argv = "--backbone toy --backbone-options embed_dim=8,token_dim=12 --image-size 32 --decoder-width 16 --decoder-heads 4 \
        --frames 3 --batch-size 4 --max-steps 3 --warmup 1 --workers 0 --no-progress --log-every 1"
    return p.parse_args(["--train", str(manifest), "--out", str(out), *argv.split(), *extra])


def test_builtin_backbones_are_registered_and_unknown_names_list_them() -> None:
    assert {"efficientnet_lite0", "vit"} <= set(backbone_names())
    assert isinstance(build_backbone(EncoderConfig("vit", options={})), Backbone)
    with pytest.raises(ValueError, match=r"registered: .*efficientnet_lite0"):
        get_spec("no-such-net")


def test_new_config_fields_leave_existing_model_versions_alone() -> None:
    """Versions hash EncoderConfig.to_dict(); fields added later stay out of it at their defaults."""
    d = EncoderConfig().to_dict()
    assert "options" not in d and "frame_fit" not in d["preprocess"] and "gelu" not in d["vit"]
    assert EncoderConfig.from_dict(d) == EncoderConfig()
    squash = EncoderConfig.from_dict({**d, "preprocess": {**d["preprocess"], "frame_fit": "squash"}})
    assert squash.to_dict()["preprocess"]["frame_fit"] == "squash"


@pytest.mark.slow
def test_toy_backbone_trains_checkpoints_serves_and_interpolates(tmp_path: Path, toy: None) -> None:
    manifest = _video_dataset(tmp_path)
    assert run(_train(manifest, tmp_path / "run", "--match-threshold", "0.42")) == 0
    loaded = load_encoder(tmp_path / "run" / "final.pt")
    assert loaded.config.backbone == "toy" and loaded.config.options == {"embed_dim": 8, "token_dim": 12}
    assert loaded.model_version.startswith("rice-toy-") and loaded.match_threshold == pytest.approx(0.42)
    assert loaded.config.preprocess.frame_fit == "squash"  # training's default, carried to serving

    # The trained heads come back around the same backbone: tokens and PMD scores for re-ranking.
    assert loaded.rice is not None and loaded.rice.backbone is loaded.backbone and loaded.rice.decoder is not None
    x = torch.randn(5, 3, 32, 32)
    emb, tokens = loaded.encode(x)
    assert emb.shape == (5, 8) and tokens.shape == (5, 5, 12)  # mean token + 2x2 grid
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5) and torch.equal(loaded.patch_tokens(x), tokens)
    scores = loaded.rice.pair_scores(tokens, tokens[:3], torch.tensor([1, 1, 0]))
    assert scores.shape == (5,) and torch.isfinite(scores).all()

    # WiSE uses the registry's zero-shot weights: alpha 0 gives them back exactly.
    interpolate(tmp_path / "run" / "final.pt", 0.0, tmp_path / "wise0.pt")
    zero = get_spec("toy").zero_shot(loaded.config)  # type: ignore[misc]
    wise = load_encoder(tmp_path / "wise0.pt")
    assert all(torch.equal(v, zero[k]) for k, v in wise.backbone.state_dict().items())
    assert wise.match_threshold is None  # a threshold calibrated for one model does not carry over


def test_checkpoints_without_heads_or_threshold_load_as_before(tmp_path: Path) -> None:
    from model.checkpoint import save_checkpoint

    cfg = EncoderConfig("vit", options={})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "plain.pt", build_backbone(cfg), cfg)
    loaded = load_encoder(tmp_path / "plain.pt")
    assert loaded.rice is None and loaded.match_threshold is None
    emb, tokens = loaded.encode(torch.randn(2, 3, 224, 224))
    assert emb.shape == (2, 512) and tokens.shape == (2, 50, 768)


def test_pool_clip_is_the_numpy_twin_of_clip_embedding() -> None:
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(3, 5, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    expected = clip_embedding(torch.from_numpy(frames), torch.from_numpy(mask)).numpy()
    got = pool_clip(frames, mask)
    assert got.dtype == np.float32 and np.allclose(got, expected, atol=1e-6)
    assert np.allclose(pool_clip(frames[1]), expected[1], atol=1e-6)  # one clip [T, D], every frame real
    frames[0, 3:] = 1e6  # padding does not matter
    assert np.allclose(pool_clip(frames, mask)[0], expected[0], atol=1e-6)
