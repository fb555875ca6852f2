"""The RICE heads as the authors built them: PFR's scale and initialisation (the weights follow the
attention), the v2 PMD decoder, fp32 contrastive maths under bf16 autocast, and which parameters go
without gradient (what DDP must be told)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import ViTConfig
from model.rice import RICE, PairwiseMatchingDecoder, PatchFeatureReconstruction, RICEConfig, icl_loss
from model.vit import VisionTransformer

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=32, layers=3, heads=4, embed_dim=16)


def _effective_keys(w: torch.Tensor) -> torch.Tensor:
    """1 / sum(w^2) over the keys: the number of keys a distribution effectively spreads over."""
    w = w / w.sum(dim=-1, keepdim=True)
    return 1.0 / (w**2).sum(dim=-1)


def _peaked_attention(heads: int = 12, n: int = 50, k: int = 500, top: int = 5, mass: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head puts `mass` of each query's attention on the same `top` keys (different per query)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.stack([torch.randperm(k, generator=g)[:top] for _ in range(n)])  # [n, top]
    probs = torch.full((1, heads, n, k), (1 - mass) / (k - top))
    probs[0, :, torch.arange(n)[:, None], keys] = mass / top
    return probs, keys


def test_pfr_weights_concentrate_where_the_attention_does() -> None:
    """The authors' v2 code: PFR reads probabilities x sqrt(head_dim) through 1x1 convs initialised to 1.0/0.
    80% of every head's mass on 5 of 500 keys is ~7.8 effective keys; the authors' PFR weights are at
    least as concentrated. The former init (mean over heads, raw probabilities) spread them over
    nearly all 500 keys, giving the 5 attended keys ~1.2% of the weight: PFR was switched off."""
    heads, head_dim = 12, 64
    probs, keys = _peaked_attention(heads)
    pad = torch.zeros(1, probs.shape[-1], dtype=torch.bool)
    rows = torch.arange(probs.shape[2])[:, None]
    attention_keys = _effective_keys(probs[0, 0])  # [n]
    assert attention_keys.mean().item() == pytest.approx(7.8, abs=0.1)

    authors = PatchFeatureReconstruction(heads).weights(probs * math.sqrt(head_dim), pad)[0]  # [n, K]
    assert (_effective_keys(authors) <= attention_keys).all()
    assert authors[rows, keys].sum(-1).min().item() > 0.99

    former = PatchFeatureReconstruction(heads)
    with torch.no_grad():
        for conv, fan_in in ((former.mix[0], heads), (former.mix[2], heads // 2)):
            conv.weight.fill_(1.0 / fan_in)
    flat = former.weights(probs, pad)[0]
    assert _effective_keys(flat).min().item() > 400
    assert flat[rows, keys].sum(-1).max().item() < 0.02


def test_decoders_hand_pfr_the_probabilities_times_sqrt_head_dim() -> None:
    torch.manual_seed(0)
    dec = PairwiseMatchingDecoder(token_dim=8, width=32, heads=4)  # head_dim 8
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 6:] = True
    _, scaled = dec(torch.randn(2, 5, 8), torch.randn(2, 10, 8), pad)
    assert torch.allclose(scaled.sum(-1), torch.full((2, 4, 5), math.sqrt(8)), atol=1e-5)
    assert scaled[1, ..., 6:].abs().max().item() == 0.0


def test_pfr_v1_form_uses_the_conv_output_as_it_is() -> None:
    attn = torch.tensor([[1.0, 3.0], [2.0, 0.0]]).view(1, 2, 1, 2)  # [B=1, h=2, N=1, K=2]
    w = PatchFeatureReconstruction(2, norm="none").weights(attn, torch.tensor([[False, False]]))
    assert w.flatten().tolist() == [3.0, 3.0]  # relu(1 * relu(p0 + p1)), no normalisation


def test_icl_similarities_stay_fp32_under_bf16_autocast() -> None:
    """All embeddings close together (cosines near 1, as late in training): bf16 logits at scale 100
    move the loss by ~0.05; icl_loss under autocast must equal its fp32 value."""
    torch.manual_seed(0)
    base = torch.ones(64, 32) + 0.1 * torch.randn(64, 32)
    clip = F.normalize(base + 0.03 * torch.randn(64, 32), dim=-1)
    image = F.normalize(base, dim=-1)
    skus, scale = torch.arange(64), torch.tensor(100.0)
    reference = icl_loss(clip, image, skus, scale)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = icl_loss(clip, image, skus, scale)
        naive = F.cross_entropy((scale * clip @ image.T).float(), skus)  # what autocast does to a plain matmul
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference.item(), abs=1e-5)
    assert abs(naive.item() - reference.item()) > 0.01  # the error avoided


def _batch() -> tuple[torch.Tensor, ...]:
    torch.manual_seed(1)
    return torch.randn(4, 2, 3, 32, 32), torch.ones(4, 2), torch.randn(4, 3, 32, 32), torch.arange(4)


@pytest.mark.parametrize("losses", ["icl,pmd,pfr", "icl,pmd", "icl", "pmd", "pmd,pfr"])
def test_parameters_without_gradient_are_exactly_the_declared_case(losses: str) -> None:
    """DDP without find_unused_parameters fails when a trainable parameter gets no gradient: the model
    says when that happens (no ICL: nothing reads the global embedding), and freezes the temperature."""
    on = set(losses.split(","))
    torch.manual_seed(0)
    model = RICE(
        VisionTransformer(TINY_VIT), RICEConfig(icl="icl" in on, pmd="pmd" in on, pfr="pfr" in on, decoder_width=32, decoder_heads=4)
    )
    model(*_batch())["loss"].backward()
    unused = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
    assert model.logit_scale.requires_grad == ("icl" in on)
    assert bool(unused) == model.leaves_parameters_unused
    if unused:
        assert unused == {"backbone.ln_post.weight", "backbone.ln_post.bias", "backbone.proj"}


def test_v2_decoder_starts_from_the_backbones_last_two_blocks_and_scores_within_ten() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(TINY_VIT)
    model = RICE(vit, RICEConfig(decoder="v2", decoder_heads=4))
    dec = model.decoder
    assert dec is not None and model.pfr is not None
    for mine, theirs in ((dec.self_block, vit.transformer.resblocks[1]), (dec.cross_block, vit.transformer.resblocks[2])):  # type: ignore[union-attr]
        ours, source = mine.state_dict(), theirs.state_dict()
        assert ours.keys() == source.keys() and all(torch.equal(ours[k], source[k]) for k in ours)
        assert mine is not theirs  # a copy: the decoder trains apart from the encoder
    out = model(*_batch())
    assert all(torch.isfinite(out[k]) for k in ("icl", "pmd", "pfr"))
    out["loss"].backward()
    assert dec.cross_block.attn.in_proj_weight.grad is not None  # type: ignore[union-attr]
    model.eval()
    with torch.no_grad():
        _, image_tok = model.encode(torch.randn(5, 3, 32, 32))
        _, frame_tok = model.encode(torch.randn(3, 3, 32, 32))
    scores = model.pair_scores(image_tok, frame_tok, torch.tensor([1, 1, 0]))
    assert scores.shape == (5,) and scores.abs().max().item() <= 10.0
    with torch.no_grad():  # a padded frame does not change any score
        frame_tok[2] = 1e3
    assert torch.allclose(model.pair_scores(image_tok, frame_tok, torch.tensor([1, 1, 0])), scores, atol=1e-5)


def test_pfr_runs_in_fp32_under_bf16_autocast() -> None:
    probs, _ = _peaked_attention(heads=8, n=10, k=100)
    pfr = PatchFeatureReconstruction(8)
    pad = torch.zeros(1, 100, dtype=torch.bool)
    clip_tokens, image_tokens = torch.randn(1, 100, 16), torch.randn(1, 10, 16)
    reference = pfr(probs * 8, clip_tokens, image_tokens, pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pfr.weights(probs * 8, pad).dtype == torch.float32
        got = pfr(probs * 8, clip_tokens, image_tokens, pad)
    assert got.item() == pytest.approx(reference.item(), rel=1e-6)
