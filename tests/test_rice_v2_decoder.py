"""The authors' v2 PMD decoder: head count, LayerNorm on the query only, attention dropout 0.1,
CrossPooler (ReLU(Linear(LN(h)[0]))) and score = 10 x cos(pooled, learned vector), pinned on a small
case computed by hand; `--decoder-heads` is honoured, never silently replaced by the backbone's."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from torch import nn

from model.config import ViTConfig
from model.rice import RICE, PairwiseMatchingDecoderV2, RICEConfig
from model.vit import VisionTransformer
from train.train import build_model, build_parser, encoder_config, rice_config

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, embed_dim=16)


def _hand_decoder() -> PairwiseMatchingDecoderV2:
    """Width 4, 2 heads; self-attention and both residual branches zeroed (the blocks pass x through),
    identity query/key projections, pooler dense = I, vim = [1, 1, 0, 0]."""
    dec = PairwiseMatchingDecoderV2(nn.Module(), width=4, heads=2)  # no last_blocks: fresh blocks
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        for ln in (dec.self_block.ln_1, dec.self_block.ln_2, dec.cross_block.ln_1, dec.cross_block.ln_2, dec.pooler.layer_norm):
            ln.weight.fill_(1.0)
        eye = torch.eye(4)
        dec.cross_block.attn.in_proj_weight.copy_(torch.cat([eye, eye, eye]))  # Wq = Wk = Wv = I
        dec.pooler.dense.weight.copy_(eye)
        dec.vim.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    return dec.eval()


def test_v2_decoder_matches_a_hand_computed_case() -> None:
    dec = _hand_decoder()
    image = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])  # [1, N=2, 4]
    # Key 0 would read differently if K/V were layer-normalised ([1, -1, 0, 0] -> [1.41, -1.41, 0, 0]);
    # key 2 is padding with a value that would dominate any softmax it entered.
    clip = torch.tensor([[[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [50.0, -50.0, 50.0, -50.0]]])  # [1, K=3, 4]
    pad = torch.tensor([[False, False, True]])
    with torch.no_grad():
        score, probs = dec(image, clip, pad)
    # Pooler: LN([1, -1, 1, -1]) = [1, -1, 1, -1] (mean 0, variance 1), Linear = I, ReLU -> [1, 0, 1, 0];
    # cos with [1, 1, 0, 0] = 1 / (sqrt 2 * sqrt 2) = 0.5; x 10 = 5.
    assert score.shape == (1,)
    assert score.item() == pytest.approx(5.0, abs=1e-4)
    # Head 0 (dims 0-1): q = [1, -1] / sqrt(2), keys [1, -1] and [0, 0] -> logits [sqrt 2, 0];
    # head 1 (dims 2-3): keys all zero -> logits [0, 0]. Returned: probabilities x sqrt(head_dim).
    p0 = 1 / (1 + math.exp(-math.sqrt(2)))
    expected = torch.tensor([[p0, 1 - p0, 0.0], [0.5, 0.5, 0.0]]) * math.sqrt(2)
    assert probs.shape == (1, 2, 2, 3)
    assert torch.allclose(probs[0, :, 0], expected, atol=1e-4)


def test_v2_score_is_ten_times_the_cosine_with_the_learned_vector() -> None:
    dec = _hand_decoder()
    with torch.no_grad():
        dec.vim.weight.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))  # parallel to the pooled [1, 0, 1, 0]
        top, _ = dec(torch.tensor([[[1.0, -1.0, 1.0, -1.0]]]), torch.ones(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool))
        dec.vim.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 1.0]]))  # orthogonal
        zero, _ = dec(torch.tensor([[[1.0, -1.0, 1.0, -1.0]]]), torch.ones(1, 1, 4), torch.zeros(1, 1, dtype=torch.bool))
    assert top.item() == pytest.approx(10.0, abs=1e-4)
    assert zero.item() == pytest.approx(0.0, abs=1e-4)


def test_attention_dropout_drops_values_but_pfr_reads_the_undropped_probabilities() -> None:
    torch.manual_seed(0)
    dec = PairwiseMatchingDecoderV2(nn.Module(), width=16, heads=2)
    assert dec.cross_block.dropout == 0.1 and dec.self_block.attn.dropout == 0.0  # only the cross-attention drops
    x, mem, pad = torch.randn(2, 5, 16), torch.randn(2, 40, 16), torch.zeros(2, 40, dtype=torch.bool)
    dec.train()
    s1, p1 = dec(x, mem, pad)
    s2, p2 = dec(x, mem, pad)
    assert not torch.equal(s1, s2)  # dropout is on in training
    assert torch.equal(p1, p2)  # the returned probabilities are taken before it
    dec.eval()
    assert torch.equal(dec(x, mem, pad)[0], dec(x, mem, pad)[0])


def _args(*extra: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser(p)
    base = ["--train", "x", "--out", "y", "--backbone", "vit", "--no-pretrained", "--vit", "32,3,4,8,32,16"]
    base += ["--image-size", "32", "--pmd-form", "v2"]
    return p.parse_args([*base, *extra])


def test_v2_defaults_to_eight_heads_and_honours_decoder_heads() -> None:
    assert rice_config(_args()).decoder_heads == 8
    args = _args("--decoder-heads", "2")
    model = build_model(args, encoder_config(args))
    assert isinstance(model.decoder, PairwiseMatchingDecoderV2)
    assert model.decoder.heads == 2 and model.decoder.cross_block.heads == 2  # not the backbone's 4
    # Started from the backbone's last two blocks: same weights, split into 2 heads instead of 4.
    vit = model.backbone
    assert isinstance(vit, VisionTransformer)
    for mine, theirs in (
        (model.decoder.self_block, vit.transformer.resblocks[1]),
        (model.decoder.cross_block, vit.transformer.resblocks[2]),
    ):
        ours, source = mine.state_dict(), theirs.state_dict()
        assert ours.keys() == source.keys() and all(torch.equal(ours[k], source[k]) for k in ours)
    out = model(torch.randn(4, 2, 3, 32, 32), torch.ones(4, 2), torch.randn(4, 3, 32, 32), torch.arange(4))
    assert all(torch.isfinite(out[k]) for k in ("icl", "pmd", "pfr"))
    assert model.pfr is not None and model.pfr.mix[0].in_channels == 2  # PFR reads 2 heads' maps


def test_v2_mean_refuses_a_head_count_it_cannot_use() -> None:
    """The earlier v2 copies the backbone's blocks with their own heads: asking for others is an error, not ignored."""
    args = _args("--pmd-form", "v2-mean", "--decoder-heads", "2")
    with pytest.raises(ValueError, match="--decoder-heads 2"):
        build_model(args, encoder_config(args))
    args = _args("--pmd-form", "v2-mean")
    assert build_model(args, encoder_config(args)).decoder.heads == 4  # type: ignore[union-attr]


def test_v2_decoder_on_the_backbone_width() -> None:
    torch.manual_seed(0)
    model = RICE(VisionTransformer(TINY_VIT), RICEConfig(decoder="v2", decoder_heads=8))
    assert isinstance(model.decoder, PairwiseMatchingDecoderV2) and model.decoder.head_dim == 4


def test_checkpoints_written_with_the_earlier_v2_still_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    from model.checkpoint import load_encoder, save_checkpoint
    from model.config import EncoderConfig
    from model.rice import PairwiseMatchingDecoderV2Mean

    torch.manual_seed(0)
    model = RICE(VisionTransformer(TINY_VIT), RICEConfig(decoder="v2-mean", decoder_heads=4))
    old_config = replace(model.cfg, decoder="v2").to_dict()  # how such checkpoints recorded it
    old_config.pop("decoder_attn_dropout")  # a field added later
    heads = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    path = tmp_path / "old.pt"
    save_checkpoint(path, model.backbone, EncoderConfig("vit", vit=TINY_VIT), {"rice_config": old_config, "heads": heads})
    loaded = load_encoder(path)
    assert loaded.rice is not None and isinstance(loaded.rice.decoder, PairwiseMatchingDecoderV2Mean)
