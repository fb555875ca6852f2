"""RICE losses against hand-computed values, same-SKU masking, hard-negative mining, PFR gradients
and frame masks (tiny configs, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ViTConfig
from model.rice import (
    RICE,
    PairwiseMatchingDecoder,
    PatchFeatureReconstruction,
    RICEConfig,
    icl_loss,
    mine_hard_negatives,
    pmd_loss,
)
from model.vit import VisionTransformer

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, embed_dim=16)


def tiny_rice(**kw: object) -> RICE:
    torch.manual_seed(0)
    return RICE(VisionTransformer(TINY_VIT), RICEConfig(decoder_width=32, decoder_heads=4, **kw))  # type: ignore[arg-type]


def test_icl_matches_hand_computed_value() -> None:
    # Orthogonal pairs, scale 1: each row's softmax sees e^1 (positive) and e^0 (negative).
    emb = torch.eye(2)
    loss = icl_loss(emb, emb, torch.tensor([0, 1]), torch.tensor(1.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_icl_masks_same_sku_pairs_out_of_the_negatives() -> None:
    clip = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=-1)
    image = F.normalize(torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    scale = torch.tensor(10.0)
    skus = torch.tensor([7, 7, 3])  # rows 0 and 1 are the same product
    loss = icl_loss(clip, image, skus, scale)
    # By hand: drop (0,1) and (1,0) from both softmaxes.
    s = scale * clip @ image.T
    t = scale * image @ clip.T

    def ce(row: torch.Tensor, pos: int, keep: list[int]) -> float:
        return float(-row[pos] + torch.logsumexp(row[keep], 0))

    expected = (
        ce(s[0], 0, [0, 2])
        + ce(s[1], 1, [1, 2])
        + ce(s[2], 2, [0, 1, 2])
        + ce(t[0], 0, [0, 2])
        + ce(t[1], 1, [1, 2])
        + ce(t[2], 2, [0, 1, 2])
    ) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    unmasked = icl_loss(clip, image, torch.tensor([0, 1, 2]), scale)
    assert unmasked.item() > loss.item()  # the false negative had been penalised


def test_pmd_loss_matches_hand_computed_value_and_ignores_invalid_negatives() -> None:
    loss = pmd_loss(torch.tensor([2.0]), torch.tensor([[1.0, 0.0, 5.0]]), torch.tensor([[True, True, False]]))
    assert loss.item() == pytest.approx(-math.log(math.e**2 / (math.e**2 + math.e + 1)), abs=1e-6)


def test_hard_negative_mining_picks_the_three_most_similar_other_sku_clips() -> None:
    torch.manual_seed(0)
    sim = torch.randn(4, 8)
    sku_all = torch.tensor([0, 1, 2, 3, 0, 1, 5, 6])
    idx, valid = mine_hard_negatives(sim, sku_all[:4], sku_all, k=3)
    for i in range(4):
        candidates = [j for j in range(8) if sku_all[j] != sku_all[i]]
        best = sorted(candidates, key=lambda j: -float(sim[i, j]))[:3]
        assert idx[i].tolist() == best
    assert bool(valid.all())
    # Fewer than k other-SKU clips: the rest are flagged invalid.
    _, valid = mine_hard_negatives(torch.randn(1, 3), torch.tensor([0]), torch.tensor([0, 0, 1]), k=3)
    assert valid.tolist() == [[True, False, False]]


def test_pfr_matches_hand_computed_value() -> None:
    pfr = PatchFeatureReconstruction(heads=2)
    with torch.no_grad():  # W = softmax_keys(relu(p_head0 + p_head1))
        pfr.mix[0].weight.fill_(1.0)
        pfr.mix[0].bias.zero_()
        pfr.mix[2].weight.fill_(1.0)
        pfr.mix[2].bias.zero_()
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 2, 1, 2)  # [B=1, h=2, N=1, K=2]
    clip_tokens = torch.tensor([[[1.0], [0.0]]])  # [1, K=2, d=1]
    image_tokens = torch.zeros(1, 1, 1)
    loss = pfr(probs, clip_tokens, image_tokens, torch.zeros(1, 2, dtype=torch.bool))
    w0 = math.e**2 / (math.e**2 + 1)
    assert loss.item() == pytest.approx(w0**2, abs=1e-6)
    # A padded key gets zero weight: X_hat is then exactly the other token.
    loss = pfr(probs, clip_tokens, image_tokens, torch.tensor([[False, True]]))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_pfr_gradient_reaches_the_model_only_through_attention_logits() -> None:
    torch.manual_seed(0)
    dec = PairwiseMatchingDecoder(token_dim=8, width=16, heads=4)
    pfr = PatchFeatureReconstruction(heads=4)
    image_tokens = torch.randn(2, 5, 8, requires_grad=True)
    clip_tokens = torch.randn(2, 10, 8, requires_grad=True)
    _, probs = dec(image_tokens, clip_tokens, torch.zeros(2, 10, dtype=torch.bool))
    pfr(probs, clip_tokens, image_tokens, torch.zeros(2, 10, dtype=torch.bool)).backward()
    ca = dec.cross_attn
    assert ca.q.weight.grad is not None and ca.q.weight.grad.abs().sum() > 0
    assert ca.k.weight.grad is not None and ca.k.weight.grad.abs().sum() > 0
    for frozen in (ca.v, ca.out, dec.mlp, dec.score):  # values, output and scoring path get nothing
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in frozen.parameters())


def test_padded_frames_do_not_change_any_loss() -> None:
    model = tiny_rice()
    torch.manual_seed(1)
    frames = torch.randn(4, 3, 3, 32, 32)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    images = torch.randn(4, 3, 32, 32)
    skus = torch.arange(4)
    a = model(frames, mask, images, skus)
    garbage = frames.clone()
    garbage[mask == 0] = 1e3
    b = model(garbage, mask, images, skus)
    for key in ("icl", "pmd", "pfr", "loss"):
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-5)
    c = model(garbage, torch.ones_like(mask), images, skus)
    assert c["loss"].item() != pytest.approx(a["loss"].item(), abs=1e-3)


def test_losses_are_switchable_and_config_is_validated() -> None:
    model = tiny_rice(pmd=False, pfr=False)
    out = model(torch.randn(2, 2, 3, 32, 32), torch.ones(2, 2), torch.randn(2, 3, 32, 32), torch.arange(2))
    assert set(out) == {"icl", "loss"} and model.decoder is None
    with pytest.raises(ValueError, match="PFR"):
        RICEConfig(pmd=False, pfr=True)
    assert RICEConfig.from_dict(RICEConfig(pfr_weight=0.05).to_dict()) == RICEConfig(pfr_weight=0.05)


def test_pfr_sum_norm_follows_the_attention_where_softmax_flattens_it() -> None:
    """Each image patch attends to exactly one clip token whose features it equals: with weights
    divided by their sum the reconstruction is exact; the softmax of the authors' code blurs it toward the mean."""
    b, heads, n, k, d = 1, 2, 3, 6, 4
    clip_tokens = torch.randn(b, k, d)
    target = torch.tensor([4, 0, 2])
    image_tokens = clip_tokens[:, target]  # [b, n, d]
    probs = torch.zeros(b, heads, n, k)
    probs[0, :, torch.arange(n), target] = 1.0
    pad = torch.zeros(b, k, dtype=torch.bool)
    exact = PatchFeatureReconstruction(heads, norm="sum")(probs, clip_tokens, image_tokens, pad)
    blurred = PatchFeatureReconstruction(heads, norm="softmax")(probs, clip_tokens, image_tokens, pad)
    assert exact.item() < 1e-10
    assert blurred.item() > 0.1
