"""Importing the RICE authors' released checkpoints: state dicts built in their key layout
(`image_encoder.model.*`, OpenAI-CLIP or transformers-CLIP visual towers, their decoder under
`transformer.*` / `heads.*`) convert into this project's checkpoint, and the converted model embeds the
same images as the weights they came from.

Tolerances: the OpenAI layout copies tensors 1:1, so embeddings must be equal to 1e-6; the
transformers layout is checked against an independent forward written here from transformers'
CLIPVisionTransformer semantics (separate q/k/v projections), equal to 1e-5 (float32 summation order).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_encoder, read_checkpoint
from model.config import ViTConfig
from model.rice import RICE, PairwiseMatchingDecoderV2, RICEConfig
from model.vit import VisionTransformer
from train import authors, evaluate, train

TINY = ViTConfig(image_size=32, patch_size=8, width=128, layers=3, heads=2, embed_dim=16)  # CLIP: 64-d heads


def _theirs(model: RICE) -> dict[str, torch.Tensor]:
    """`model` written in the authors' mmf key layout (openai_clip image encoder)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            out["image_encoder.model." + k[len("backbone.") :]] = v
        elif k.startswith("decoder.self_block."):
            out["transformer.transformer.layers.0." + k[len("decoder.self_block.") :]] = v
        elif k.startswith("decoder.cross_block."):
            out["transformer.transformer.layers.1." + k[len("decoder.cross_block.") :]] = v
        elif k.startswith("decoder.pooler."):
            out["transformer.pooler." + k[len("decoder.pooler.") :]] = v
        elif k == "decoder.vim.weight":
            out["heads.vim.weight"] = v
        elif k.startswith("pfr.mix."):
            out["heads.rec." + k[len("pfr.mix.") :]] = v
    # What their CrossModel also holds and nobody reads at retrieval time.
    out["transformer.embeddings.position_embedding.weight"] = torch.randn(77, TINY.width)
    out["transformer.embeddings.class_embedding"] = torch.randn(TINY.width)
    return out


def test_openai_layout_with_decoder_converts_to_identical_embeddings_and_scores(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = RICE(VisionTransformer(TINY), RICEConfig(decoder="v2", decoder_heads=2)).eval()
    with torch.no_grad():
        for p in source.decoder.parameters():  # type: ignore[union-attr]
            p.add_(0.01 * torch.randn_like(p))  # trained-looking, not the copies of the backbone's blocks
    src = tmp_path / "rice_final.pth"
    torch.save({"model": {"module." + k: v for k, v in _theirs(source).items()}}, src)
    out = tmp_path / "ours.pt"
    summary = authors.convert_authors_checkpoint(src, out)
    assert summary["layout"] == "openai_clip" and summary["decoder"]
    loaded = load_encoder(out)
    pre = loaded.config.preprocess
    assert (pre.resize, pre.crop, pre.frame_fit, pre.image_fit) == (37, 32, "squash", "squash")  # 32 * 256/224
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want, _ = source.backbone(images)
        got, _ = loaded.backbone(images)
    assert torch.allclose(got, want, atol=1e-6)
    assert loaded.rice is not None and isinstance(loaded.rice.decoder, PairwiseMatchingDecoderV2)
    assert loaded.rice.decoder.heads == 2  # read from their PFR convs' input channels
    with torch.no_grad():
        _, image_tok = source.encode(images)
        _, frame_tok = source.encode(torch.randn(3, 3, 32, 32))
    mask = torch.tensor([1, 1, 0])
    assert torch.allclose(loaded.rice.pair_scores(image_tok, frame_tok, mask), source.pair_scores(image_tok, frame_tok, mask), atol=1e-5)


def _hf_state(cfg: ViTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in transformers' CLIPVisionModel layout, under the authors' prefixes."""
    g = torch.Generator().manual_seed(seed)
    w, grid = cfg.width, cfg.image_size // cfg.patch_size

    def r(*shape: int) -> torch.Tensor:
        return 0.2 * torch.randn(*shape, generator=g)

    v: dict[str, torch.Tensor] = {
        "embeddings.class_embedding": r(w),
        "embeddings.patch_embedding.weight": r(w, 3, cfg.patch_size, cfg.patch_size),
        "embeddings.position_embedding.weight": r(grid * grid + 1, w),
        "embeddings.position_ids": torch.arange(grid * grid + 1)[None],
        "pre_layrnorm.weight": 1 + r(w),
        "pre_layrnorm.bias": r(w),
        "post_layernorm.weight": 1 + r(w),
        "post_layernorm.bias": r(w),
    }
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            v[p + f"self_attn.{name}.weight"], v[p + f"self_attn.{name}.bias"] = r(w, w), r(w)
        v[p + "layer_norm1.weight"], v[p + "layer_norm1.bias"] = 1 + r(w), r(w)
        v[p + "layer_norm2.weight"], v[p + "layer_norm2.bias"] = 1 + r(w), r(w)
        v[p + "mlp.fc1.weight"], v[p + "mlp.fc1.bias"] = r(4 * w, w), r(4 * w)
        v[p + "mlp.fc2.weight"], v[p + "mlp.fc2.bias"] = r(w, 4 * w), r(w)
    state = {"image_encoder.model." + k: t for k, t in v.items()}
    state["image_encoder.visual_projection.weight"] = r(cfg.embed_dim, w)
    return state


def _hf_forward(state: dict[str, torch.Tensor], cfg: ViTConfig, images: torch.Tensor) -> torch.Tensor:
    """transformers' CLIPVisionModel + visual_projection, written out: the reference embedding."""
    v = {k[len("image_encoder.model.") :]: t for k, t in state.items() if k.startswith("image_encoder.model.")}
    w, h = cfg.width, cfg.heads
    d = w // h

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (w,), v[name + ".weight"], v[name + ".bias"], 1e-5)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, v[name + ".weight"], v[name + ".bias"])

    x = F.conv2d(images, v["embeddings.patch_embedding.weight"], stride=cfg.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([v["embeddings.class_embedding"].expand(x.shape[0], 1, w), x], dim=1) + v["embeddings.position_embedding.weight"]
    x = ln(x, "pre_layrnorm")
    b, n, _ = x.shape
    for i in range(cfg.layers):
        p = f"encoder.layers.{i}."
        y = ln(x, p + "layer_norm1")
        q = (lin(y, p + "self_attn.q_proj") * d**-0.5).view(b, n, h, d).transpose(1, 2)
        k = lin(y, p + "self_attn.k_proj").view(b, n, h, d).transpose(1, 2)
        val = lin(y, p + "self_attn.v_proj").view(b, n, h, d).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)).softmax(-1) @ val).transpose(1, 2).reshape(b, n, w)
        x = x + lin(att, p + "self_attn.out_proj")
        y = lin(ln(x, p + "layer_norm2"), p + "mlp.fc1")
        x = x + lin(y * torch.sigmoid(1.702 * y), p + "mlp.fc2")  # quick_gelu, OpenAI's CLIP activation
    pooled = ln(x[:, 0], "post_layernorm")
    return pooled @ state["image_encoder.visual_projection.weight"].T


def test_transformers_layout_converts_to_the_same_embeddings(tmp_path: Path) -> None:
    state = _hf_state(TINY)
    src = tmp_path / "rice_final.pth"
    torch.save(state, src)
    out = tmp_path / "ours.pt"
    summary = authors.convert_authors_checkpoint(src, out)
    assert summary["layout"] == "huggingface_clip" and not summary["decoder"]
    loaded = load_encoder(out)
    assert loaded.config.vit.heads == 2 and loaded.config.vit.layers == 3
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, _ = loaded.backbone(images)
    assert torch.allclose(got, _hf_forward(state, TINY, images), atol=1e-5)


def test_a_file_without_their_visual_tower_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "other.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, src)
    with pytest.raises(authors.AuthorsCheckpointError, match=r"image_encoder\.model"):
        authors.convert_authors_checkpoint(src, tmp_path / "x.pt")


def _manifest(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        (root / f"c{i}").mkdir(parents=True)
        for j in range(2):
            cv2.imwrite(str(root / f"c{i}" / f"{j}.jpg"), rng.integers(0, 255, (64, 36, 3), dtype=np.uint8))
        cv2.imwrite(str(root / f"i{i}.jpg"), rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
        rows.append({"clip": f"c{i}", "image": f"i{i}.jpg", "sku": f"s{i}"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def test_converted_checkpoint_evaluates_and_initialises_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    source = RICE(VisionTransformer(TINY), RICEConfig(decoder="v2", decoder_heads=2))
    src, ours = tmp_path / "rice_final.pth", tmp_path / "ours.pt"
    torch.save(_theirs(source), src)
    authors.convert_authors_checkpoint(src, ours)
    manifest = _manifest(tmp_path / "data")
    p = __import__("argparse").ArgumentParser()
    evaluate.build_parser(p)
    assert evaluate.run(p.parse_args(["--queries", str(manifest), "--checkpoint", str(ours), "--workers", "0", "--device", "cpu"])) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 4
    p = __import__("argparse").ArgumentParser()
    train.build_parser(p)
    argv = f"--train {manifest} --out {tmp_path / 'run'} --init-from {ours} --backbone vit --vit 128,3,2,8,32,16 --pmd-form v2"
    argv += " --decoder-heads 2 --batch-size 2 --max-steps 1 --lr-backbone 0 --lr-head 0 --workers 0 --no-progress --device cpu"
    assert train.run(p.parse_args(argv.split(" "))) == 0
    assert "init from" in capsys.readouterr().out
    final = read_checkpoint(tmp_path / "run" / "final.pt")
    assert final["encoder_config"]["preprocess"]["image_fit"] == "squash"  # the checkpoint's preprocessing carried over
    start = read_checkpoint(ours)["encoder"]
    assert all(torch.equal(final["encoder"][k], start[k]) for k in start)  # lr 0: the imported weights, unchanged


@pytest.mark.slow
@pytest.mark.integration
def test_converted_checkpoint_serves(tmp_path: Path) -> None:
    """`rice serve --checkpoint` on the converted file: the service builds the imported model (its
    version) and answers with it, preparing images by the checkpoint's squash transform."""
    from service.server import background_server
    from tests.conftest import settings_for
    from tools.client import RiceClient

    torch.manual_seed(0)
    source = RICE(VisionTransformer(TINY), RICEConfig(decoder="v2", decoder_heads=2))
    src, ours = tmp_path / "rice_final.pth", tmp_path / "ours.pt"
    torch.save(_theirs(source), src)
    version = authors.convert_authors_checkpoint(src, ours)["model_version"]
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(3):
        pictures.append(tmp_path / f"p{i}.jpg")
        cv2.imwrite(
            str(pictures[-1]), cv2.resize(rng.integers(0, 255, (4, 3, 3), dtype=np.uint8), (60, 80), interpolation=cv2.INTER_NEAREST)
        )
    with background_server(settings_for(tmp_path), load_encoder(ours)) as url, RiceClient(url) as client:
        for i, p in enumerate(pictures):
            client.add_item(p, sku=f"sku{i}", shop_id="s")
        answer = client.recognize(pictures[1])
        assert answer.model_version == version and answer.top is not None and answer.top.sku == "sku1"
