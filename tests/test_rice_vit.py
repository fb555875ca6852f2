"""The CLIP-compatible ViT, its importer for OpenAI / open_clip weight files, and the dataset readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import PreprocessConfig, ViTConfig
from model.preprocess import prepare_frame
from model.vit import CLIPImportError, VisionTransformer, convert_clip_state, load_clip_weights, vit_config_from_clip_state
from train.data import lpr4m_live_id, read_lpr4m, read_movingfashion
from train.evaluate import rank_gallery

TINY = ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, embed_dim=16)


def _openai_state(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A full CLIP state dict as OpenAI ships it: `visual.*` plus text-tower keys."""
    state = {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
    state["token_embedding.weight"] = torch.zeros(10, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def test_vit_b32_has_clips_shapes_and_size() -> None:
    model = VisionTransformer(ViTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["conv1.weight"] == (768, 3, 32, 32)
    assert shapes["positional_embedding"] == (50, 768)
    assert shapes["proj"] == (768, 512)
    assert shapes["transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert shapes["transformer.resblocks.11.mlp.c_fc.weight"] == (3072, 768)
    assert sum(v.numel() for v in model.parameters()) / 1e6 == pytest.approx(87.85, abs=0.01)
    emb, tokens = VisionTransformer(TINY)(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 16) and tokens.shape == (2, 17, 64)


def test_importer_loads_openai_key_names_and_rejects_a_wrong_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = VisionTransformer(TINY)
    torch.save(_openai_state(source), tmp_path / "clip.pt")
    assert vit_config_from_clip_state(_openai_state(source)) == TINY
    target = VisionTransformer(TINY)
    load_clip_weights(target, tmp_path / "clip.pt")
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(target(x)[0], source(x)[0])
    bad = _openai_state(source)
    bad["visual.proj"] = torch.zeros(64, 8)
    with pytest.raises(CLIPImportError, match="proj"):
        convert_clip_state(bad, target)
    del bad["visual.ln_post.weight"]
    with pytest.raises(CLIPImportError, match=r"missing ln_post\.weight"):
        convert_clip_state(bad, target)


def test_lpr4m_reader(tmp_path: Path) -> None:
    live = "0a1b2c3d-1111-2222-3333-444455556666"
    clip_id = f"{live}-1000-9000"
    (tmp_path / "annotations").mkdir()
    row = [
        clip_id,
        repr([f"training_video_01/{clip_id}/{clip_id}-0001.jpg"]),
        "x",
        "img7",
        "training_image/img7.jpg",
        "t",
        "3",
        "c",
        "spu9",
        "asr",
    ]
    (tmp_path / "annotations" / "training_videoinfo_0.txt").write_text("\t".join(row) + "\n")
    rows, _ = read_lpr4m(tmp_path, "train")
    assert lpr4m_live_id(clip_id) == live
    assert rows[0].sku == "spu9" and rows[0].shop == live and rows[0].clip == (str(tmp_path / row[1][2:-2]),)
    (tmp_path / "annotations" / "test_videoid_to_gtimage_1.json").write_text(json.dumps({clip_id: ["g1.jpg", "g2.jpg"]}))
    (tmp_path / "annotations" / "test_liveid_to_gallery_1.json").write_text(json.dumps({live: ["g1.jpg", "g2.jpg", "g3.jpg"]}))
    queries, gallery = read_lpr4m(tmp_path, "test")
    assert queries[0].truth == {"g1", "g2"} and queries[0].clip == str(tmp_path / "query" / clip_id)
    assert [g.image for g in gallery] == [str(tmp_path / "gallery" / live / f"g{i}.jpg") for i in (1, 2, 3)]


def test_movingfashion_reader(tmp_path: Path) -> None:
    table = {"a": {"img_path": "imgs/a.jpg", "source": "shopA", "video_paths": ["videos/a1.mp4", "videos/a2.mp4"]}}
    (tmp_path / "train.json").write_text(json.dumps(table))
    rows, gallery = read_movingfashion(tmp_path, "train")
    assert [r.clip for r in rows] == [str(tmp_path / "videos/a1.mp4"), str(tmp_path / "videos/a2.mp4")]
    assert len(gallery) == 1 and gallery[0].sku == "a"


def test_per_shop_gallery_only_ranks_the_querys_own_shop() -> None:
    g = torch.eye(3)
    q = torch.tensor([[0.0, 1.0, 0.0]])
    assert rank_gallery(q, g, ["a", "b", "c"])[0][0] == "b"
    ranked = rank_gallery(q, g, ["a", "b", "c"], ["s1"], ["s1", "s2", "s1"])  # "b" is another shop's
    assert sorted(ranked[0]) == ["a", "c"]


# Building the archive uses torch.jit.trace/save, which torch now marks deprecated (and warns about
# tracing nn.MultiheadAttention); the code under test only reads the archive.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_importer_accepts_openai_torchscript_archives(tmp_path: Path) -> None:
    """OpenAI's ViT-B-32.pt is a TorchScript archive (fp16 weights, `visual.*` names): accepted via its state_dict()."""

    class ClipArchive(torch.nn.Module):
        def __init__(self, visual: VisionTransformer) -> None:
            super().__init__()
            self.visual = visual
            self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)[0] * self.logit_scale

    torch.manual_seed(0)
    source = VisionTransformer(TINY)
    torch.jit.save(torch.jit.trace(ClipArchive(source), torch.randn(1, 3, 32, 32)), str(tmp_path / "ViT-B-32.pt"))
    target = VisionTransformer(TINY)
    load_clip_weights(target, tmp_path / "ViT-B-32.pt")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_exact_gelu_option_for_open_clip_laion_weights() -> None:
    quick = VisionTransformer(TINY)
    exact = VisionTransformer(ViTConfig(**{**TINY.__dict__, "gelu": "exact"}))
    assert isinstance(exact.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert exact.state_dict().keys() == quick.state_dict().keys()  # same weight files load into either
    exact.load_state_dict(quick.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert not torch.allclose(exact(x)[0], quick(x)[0], atol=1e-6)
    with pytest.raises(ValueError, match="gelu"):
        ViTConfig(gelu="tanh")


def test_squash_keeps_the_top_and_bottom_of_portrait_frames() -> None:
    """A 9:16 livestream frame with the product at the top: the centre crop loses it, squash keeps it."""
    frame = np.zeros((960, 540, 3), np.uint8)
    frame[:200] = (0, 0, 255)  # the product, red in BGR, in the top fifth
    crop = prepare_frame(frame, PreprocessConfig(224, 224))
    squash = prepare_frame(frame, PreprocessConfig(224, 224, frame_fit="squash"))
    assert crop.shape == squash.shape == (224, 224, 3)
    assert crop[..., 0].max() == 0  # gone
    assert (squash[..., 0] > 200).mean() == pytest.approx(200 / 960, abs=0.01)  # whole frame, aspect squashed


def test_lpr4m_test_protocol_uses_image_ids_and_main_views(tmp_path: Path) -> None:
    live = "0a1b2c3d-1111-2222-3333-444455556666"
    clip_id = f"{live}-1000-9000"
    a, b = "aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test_videoid_to_gtimage_1.json").write_text(json.dumps({clip_id: [f"{a}-2.jpg", f"{a}-0.jpg"]}))
    views = [f"{a}-2.jpg", f"{a}-0.jpg", f"{a}-1.jpg", f"{b}-1.jpg", f"{b}.jpg"]
    (tmp_path / "annotations" / "test_liveid_to_gallery_1.json").write_text(json.dumps({live: views}))
    queries, gallery = read_lpr4m(tmp_path, "test")
    assert [(g.sku, Path(g.image).name) for g in gallery] == [(a, f"{a}-0.jpg"), (b, f"{b}.jpg")]  # one main view per id
    assert queries[0].truth == {a} and Path(queries[0].image).name == f"{a}-0.jpg"


def test_movingfashion_source_is_a_group_not_a_shop(tmp_path: Path) -> None:
    table = {"a": {"img_path": "imgs/a.jpg", "source": "street2shop", "video_paths": ["videos/a1.mp4"]}}
    (tmp_path / "test.json").write_text(json.dumps(table))
    rows, _ = read_movingfashion(tmp_path, "test")
    assert rows[0].shop is None and rows[0].group == "street2shop"
