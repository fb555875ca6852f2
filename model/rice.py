"""RICE (Yang et al., ICCV 2023): instance-level contrastive learning (ICL), the pairwise matching
decoder (PMD) with in-batch hard negatives, and patch feature reconstruction (PFR).

Pure torch. Under DistributedDataParallel every rank encodes its local (clip, image) pairs,
gathers embeddings and clip tokens from all ranks with a differentiable all-gather, and computes
its *share* of each loss (its own rows, divided by the global batch size), so that the shares sum
to the loss of one process on the whole global batch. See `RICE.forward` for the gradient scaling.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.encoder import clip_embedding


@dataclass(frozen=True)
class RICEConfig:
    """Which RICE losses are on, their weights, and the decoder size (stored in checkpoints)."""

    icl: bool = True
    pmd: bool = True
    pfr: bool = True
    icl_weight: float = 1.0
    pmd_weight: float = 1.0
    pfr_weight: float = 1.0  # v2 uses 1.0, v1 0.05
    temperature: float = 0.07  # initial value when learnable
    learn_temperature: bool = True
    hard_negatives: int = 3
    decoder_width: int = 256  # "small" decoder only; "v2" works at the backbone's token width
    decoder_heads: int = 8
    # PFR weights over the keys: "softmax" (v2), "none" (v1: the conv output as it is), "sum" (ours:
    # divided by their sum). See PatchFeatureReconstruction.
    pfr_norm: str = "softmax"
    # "small": a fresh decoder of decoder_width; "v2": the authors' v2 decoder at the token width
    # (768 for ViT-B/32, decoder_heads heads, 8 in their config), its two blocks started from the
    # backbone's last two, CrossPooler, score = 10 x cos(pooled, learned vector); "v2-mean": this
    # project's earlier v2 reading (score against the clip's mean token), for old checkpoints.
    decoder: str = "small"
    decoder_attn_dropout: float = 0.1  # v2: dropout on the cross-attention probabilities

    def __post_init__(self) -> None:
        if self.pfr and not self.pmd:
            raise ValueError("PFR reads the PMD decoder's cross-attention: enable pmd too")
        if not (self.icl or self.pmd):
            raise ValueError("enable at least one of icl and pmd")
        if self.pfr_norm not in ("softmax", "sum", "none"):
            raise ValueError("pfr_norm must be 'softmax', 'none' or 'sum'")
        if self.decoder not in ("small", "v2", "v2-mean"):
            raise ValueError("decoder must be 'small', 'v2' or 'v2-mean'")
        if self.decoder == "small" and self.decoder_width % self.decoder_heads:
            raise ValueError("decoder_width must be a multiple of decoder_heads")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RICEConfig:
        return cls(**d)


# --- distributed helpers -------------------------------------------------------------------------


def world_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (an all_reduce),
    so losses computed on gathered tensors send gradients back to the rank that produced them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n : (rank + 1) * n]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [b, ...] from all ranks in rank order -> [world*b, ...]; identity on one process.
    Every rank must pass the same shape (use drop_last in the sampler)."""
    _, world = world_info()
    if world == 1:
        return x
    if x.requires_grad:
        return _AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


# --- losses --------------------------------------------------------------------------------------


def fp32(x: torch.Tensor) -> AbstractContextManager[Any]:
    """Autocast off on x's device: under bf16 autocast a matmul of fp32 inputs still runs in bf16,
    whose 8-bit mantissa rounds cosines near 1 by ~0.004, x100 at temperature 0.01 = 0.4 nats of logit
    noise, and can swap which clip is the hardest negative."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def same_sku_mask(sku_q: torch.Tensor, sku_all: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """[b, N] True where gallery column j shares row i's SKU but is not row i's own pair
    (row i's own pair is column offset + i): these are false negatives and leave the softmax."""
    same = sku_q[:, None] == sku_all[None, :]  # [b, N]
    own = torch.arange(sku_q.shape[0], device=sku_q.device) + offset
    same[torch.arange(sku_q.shape[0], device=sku_q.device), own] = False
    return same


def icl_loss(
    clip_emb: torch.Tensor,
    image_emb: torch.Tensor,
    skus: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    clip_all: torch.Tensor | None = None,
    image_all: torch.Tensor | None = None,
    sku_all: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE, mean over the given rows, with same-SKU pairs masked out of the negatives.

    clip_emb, image_emb [b, D] (L2-normalised), skus [b] int; logit_scale = 1 / temperature.
    The *_all arguments are the gathered batch [N, ...] (default: the local one); row i's positive
    is column offset + i.
    """
    clip_all = clip_emb if clip_all is None else clip_all
    image_all = image_emb if image_all is None else image_all
    sku_all = skus if sku_all is None else sku_all
    target = torch.arange(clip_emb.shape[0], device=clip_emb.device) + offset  # [b]
    drop = same_sku_mask(skus, sku_all, offset)  # [b, N]
    with fp32(clip_emb):
        scale = logit_scale.float()
        c2i = (scale * clip_emb.float() @ image_all.float().T).masked_fill(drop, float("-inf"))  # [b, N]
        i2c = (scale * image_emb.float() @ clip_all.float().T).masked_fill(drop, float("-inf"))  # [b, N]
        return (F.cross_entropy(c2i, target) + F.cross_entropy(i2c, target)) / 2


@torch.no_grad()
def mine_hard_negatives(sim: torch.Tensor, skus: torch.Tensor, sku_all: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar clips of another SKU for each image row.

    sim [b, N] image-to-clip similarity (no gradient flows through mining), skus [b], sku_all [N]
    -> (column indices [b, k], valid [b, k]); valid is False where fewer than k other-SKU clips exist.
    """
    same = skus[:, None] == sku_all[None, :]  # [b, N]; the positive shares its own SKU, so it is excluded too
    masked = sim.float().masked_fill(same, float("-inf"))  # callers compute sim in fp32 (see `fp32`)
    values, idx = masked.topk(min(k, sim.shape[1]), dim=1)  # [b, k]
    return idx, torch.isfinite(values)


def pmd_loss(pos_score: torch.Tensor, neg_score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over {positive, hard negatives} with the positive as target, mean over rows.
    pos_score [b], neg_score [b, k], valid [b, k]."""
    logits = torch.cat([pos_score[:, None].float(), neg_score.float().masked_fill(~valid, float("-inf"))], dim=1)  # [b, 1+k]
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


# --- modules -------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention that also returns its probabilities (PFR reads them)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, Q, W] attends to mem [B, K, W]; pad [B, K] True = ignore -> ([B, Q, W], probs [B, h, Q, K])."""
        b, q_len, w = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, h, w // h).transpose(1, 2)  # [B, h, L, W/h]

        q, k, v = split(self.q(x)), split(self.k(mem)), split(self.v(mem))
        logits = q @ k.transpose(-2, -1) / math.sqrt(w // h)  # [B, h, Q, K]
        if pad is not None:
            logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
        probs = logits.softmax(dim=-1)  # [B, h, Q, K]
        out = (probs @ v).transpose(1, 2).reshape(b, q_len, w)  # [B, Q, W]
        return self.out(out), probs


class PairwiseMatchingDecoder(nn.Module):
    """Scores one (image, clip) pair: self-attention over the image tokens, cross-attention from
    image tokens to the clip's frame tokens, an MLP, then token 0 -> LN -> Linear -> GELU -> Linear(., 1)."""

    def __init__(self, token_dim: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.input = nn.Linear(token_dim, width)  # shared by both views, like the shared encoder
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.ln_query = nn.LayerNorm(width)
        self.ln_mem = nn.LayerNorm(width)
        self.cross_attn = Attention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.score = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, image_tokens: torch.Tensor, clip_tokens: torch.Tensor, clip_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [P, N, d], clip_tokens [P, K, d], clip_pad [P, K] -> (score [P], PFR input [P, h, N, K]).

        The PFR input is the cross-attention probabilities divided by the attention scale
        (x sqrt(head_dim)), as the authors' decoder returns them: see PatchFeatureReconstruction.
        """
        x = self.input(image_tokens)  # [P, N, W]
        mem = self.ln_mem(self.input(clip_tokens))  # [P, K, W]
        h = self.ln_self(x)
        x = x + self.self_attn(h, h)[0]
        attn, probs = self.cross_attn(self.ln_query(x), mem, clip_pad)
        x = x + attn
        x = x + self.mlp(self.ln_mlp(x))
        return self.score(x[:, 0]).squeeze(-1), probs * math.sqrt(self.cross_attn.head_dim)


def _copy_blocks(backbone: nn.Module, width: int, n: int) -> list[dict[str, torch.Tensor]] | None:
    """State dicts of the backbone's last `n` blocks (CLIP layout) when it offers them at `width`."""
    source = getattr(backbone, "last_blocks", None)
    blocks = source(n) if callable(source) else None
    if not blocks or any(b.attn.embed_dim != width for b in blocks):
        return None
    return [b.state_dict() for b in blocks]


class CrossAttentionBlock(nn.Module):
    """The authors' `CrossTransformerLayer`: pre-LN on the query only (keys/values enter as they are),
    multi-head attention with dropout on the probabilities, then the CLIP MLP. Parameter names are
    CLIP's (attn.in_proj_weight/in_proj_bias/out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2), so a CLIP
    block's weights load 1:1 whatever the head count (the head split does not change any shape)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        from model.vit import ResidualAttentionBlock

        template = ResidualAttentionBlock(width, heads)
        self.attn, self.ln_1, self.mlp, self.ln_2 = template.attn, template.ln_1, template.mlp, template.ln_2
        self.heads, self.head_dim, self.dropout = heads, width // heads, dropout

    def forward(self, x: torch.Tensor, mem: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [P, N, W] attends to mem [P, K, W] (pad [P, K] True = ignore) -> (x [P, N, W], probs / scale [P, h, N, K]).

        The probabilities are returned before dropout and divided by the scale 1/sqrt(head_dim), as the
        authors' `MultiHeadAttention` returns them for PFR."""
        p, n, w = x.shape
        h, d = self.heads, self.head_dim
        wq, wk, wv = self.attn.in_proj_weight.split(w)
        bq, bk, bv = self.attn.in_proj_bias.split(w)
        scale = d**-0.5
        q = (F.linear(self.ln_1(x), wq, bq) * scale).view(p, n, h, d).transpose(1, 2)  # [P, h, N, d]
        k = F.linear(mem, wk, bk).view(p, -1, h, d).transpose(1, 2)  # [P, h, K, d]
        v = F.linear(mem, wv, bv).view(p, -1, h, d).transpose(1, 2)  # [P, h, K, d]
        logits = (q @ k.transpose(-2, -1)).masked_fill(pad[:, None, None, :], float("-inf"))  # [P, h, N, K]
        probs = logits.softmax(dim=-1)
        out = F.dropout(probs, self.dropout, self.training) @ v  # [P, h, N, d]
        x = x + self.attn.out_proj(out.transpose(1, 2).reshape(p, n, w))
        x = x + self.mlp(self.ln_2(x))
        return x, probs / scale


class CrossPooler(nn.Module):
    """The authors' `CrossPooler`: LayerNorm over the decoded tokens, token 0, Linear (no bias), ReLU."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(width)
        self.dense = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.dense.weight, std=0.02)  # CrossModel.initialize_weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [P, N, W] -> pooled [P, W] (>= 0)."""
        return F.relu(self.dense(self.layer_norm(hidden)[:, 0]))


class PairwiseMatchingDecoderV2(nn.Module):
    """The authors' v2 PMD (mmf `CrossModel`, one layer pair, and the "vim" head):
    a self-attention block over the image tokens (CLIP layout, TF-style LayerNorm eps 1e-12, no
    attention dropout), a `CrossAttentionBlock` from them to the clip tokens (LN on the query only,
    attention dropout 0.1), `CrossPooler`, and score = 10 x cos(pooled, a learned vector `vim`).
    Width = the backbone's token width; `heads` defaults to 8 (their CrossConfig default, which no RICE
    config overrides), not the backbone's 12. Both blocks start from the backbone's last two blocks
    when it offers them (`last_blocks`), else freshly initialised.
    """

    logit_scale = 10.0

    def __init__(self, backbone: nn.Module, width: int, heads: int, attn_dropout: float = 0.1) -> None:
        super().__init__()
        from model.vit import ResidualAttentionBlock

        self.self_block = ResidualAttentionBlock(width, heads)
        self.cross_block = CrossAttentionBlock(width, heads, attn_dropout)
        copied = _copy_blocks(backbone, width, 2)
        if copied is not None:
            self.self_block.load_state_dict(copied[0])
            self.cross_block.load_state_dict(copied[1])
        for ln in (self.self_block.ln_1, self.self_block.ln_2):
            ln.eps = 1e-12  # their TorchTransformerLayer's TF-style LayerNorm
        self.heads = heads
        self.head_dim = width // heads
        self.pooler = CrossPooler(width)
        self.vim = nn.Linear(width, 1, bias=False)  # heads["vim"]: only its weight is read, as a vector

    def forward(self, image_tokens: torch.Tensor, clip_tokens: torch.Tensor, clip_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [P, N, W], clip_tokens [P, K, W], clip_pad [P, K] -> (score [P], PFR input [P, h, N, K])."""
        x = self.self_block(image_tokens)  # [P, N, W]
        x, probs = self.cross_block(x, clip_tokens, clip_pad)  # [P, N, W], [P, h, N, K]
        pooled = self.pooler(x).float()  # [P, W]
        score = F.normalize(pooled, dim=-1) @ F.normalize(self.vim.weight.float(), dim=-1).T  # [P, 1]
        return self.logit_scale * score.squeeze(-1), probs


class PairwiseMatchingDecoderV2Mean(nn.Module):
    """This project's earlier reading of the v2 PMD (`decoder="v2-mean"`, kept so checkpoints trained with it
    still load; new runs use PairwiseMatchingDecoderV2): two pre-LN transformer blocks at the backbone's token width (768, 12 heads
    for ViT-B/32), started from copies of the backbone's last two blocks when it offers them
    (`last_blocks(n)`), else freshly initialised. Block 1 self-attends over the image tokens, block 2
    cross-attends from them to the clip tokens. Score = 10 x cosine between the decoded token 0 and the
    clip's masked-mean token, both through one LayerNorm + Linear: a bounded logit (+-10) like the
    authors' cosine head, so the 4-way PMD softmax cannot saturate early.
    """

    logit_scale = 10.0

    def __init__(self, backbone: nn.Module, width: int, heads: int) -> None:
        super().__init__()
        from model.vit import ResidualAttentionBlock  # the CLIP block layout, so weights copy 1:1

        source = getattr(backbone, "last_blocks", None)
        blocks = source(2) if callable(source) else None
        if not blocks or any(b.attn.embed_dim != width for b in blocks):
            blocks = [ResidualAttentionBlock(width, heads) for _ in range(2)]
        self.self_block, self.cross_block = blocks
        self.heads = self.cross_block.attn.num_heads
        self.head_dim = width // self.heads
        self.ln_score = nn.LayerNorm(width)
        self.proj_score = nn.Linear(width, width)

    def forward(self, image_tokens: torch.Tensor, clip_tokens: torch.Tensor, clip_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens [P, N, W], clip_tokens [P, K, W], clip_pad [P, K] -> (score [P], PFR input [P, h, N, K])."""
        x = self.self_block(image_tokens)  # [P, N, W]
        blk = self.cross_block
        q, mem = blk.ln_1(x), blk.ln_1(clip_tokens)  # [P, N, W], [P, K, W]
        attn, probs = blk.attn(q, mem, mem, key_padding_mask=clip_pad, need_weights=True, average_attn_weights=False)
        x = x + attn  # probs [P, h, N, K]
        x = x + blk.mlp(blk.ln_2(x))
        keep = (~clip_pad).to(clip_tokens.dtype).unsqueeze(-1)  # [P, K, 1]
        pooled = (clip_tokens * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # [P, W]
        a = F.normalize(self.proj_score(self.ln_score(x[:, 0])).float(), dim=-1)  # [P, W]
        b = F.normalize(self.proj_score(self.ln_score(pooled)).float(), dim=-1)  # [P, W]
        return self.logit_scale * (a * b).sum(-1), probs * math.sqrt(self.head_dim)


class PatchFeatureReconstruction(nn.Module):
    """PFR: a 1x1 conv over attention heads turns cross-attention maps into reconstruction weights
    W [B, N, K]; X_hat = W @ sg(clip tokens) should equal sg(image tokens). Both token sets are
    detached, so the loss trains the model only through the attention logits.

    As the authors built it (v2 `module_crossattn.py`, `initialize_head_weights`): the input is the
    probabilities divided by the attention scale (x sqrt(head_dim), done by the decoders) and both
    convs start at weight 1.0, bias 0, so the first W is softmax(sum over heads of sqrt(d) * p): much
    sharper than the attention. With raw probabilities and a mean-over-heads init the softmax over 500
    keys is near uniform (80% of a head's mass on 5 keys gives them ~1.2% of W) and PFR does nothing.
    norm "softmax" (v2), "none" (v1: W is the ReLU'd conv output, weight 0.05), "sum" (W divided by
    its sum: the attention's shape whatever the scale). With this scale and init, "none" gives W rows
    summing to heads x sqrt(head_dim) x heads/2 (181 for 8 heads of 32), so X_hat is ~100x the tokens:
    on grocery its loss was ~10^4 and, even at weight 0.05, 99% of the total (docs/RESULTS.md).
    """

    def __init__(self, heads: int, norm: str = "softmax") -> None:
        super().__init__()
        self.norm = norm
        mid = max(heads // 2, 1)
        first, second = nn.Conv2d(heads, mid, 1), nn.Conv2d(mid, 1, 1)
        for conv in (first, second):
            nn.init.ones_(conv.weight)  # the authors' init (also keeps the final ReLU alive at the start)
            nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
        self.mix = nn.Sequential(first, nn.ReLU(), second, nn.ReLU())

    def weights(self, attn: torch.Tensor, clip_pad: torch.Tensor) -> torch.Tensor:
        """attn [B, h, N, K] (scaled probabilities), clip_pad [B, K] -> reconstruction weights [B, N, K].

        In fp32 even under autocast: the conv outputs reach ~100 (heads x sqrt(head_dim) x p), where
        bf16's spacing is 0.5, i.e. a softmax logit error of up to 0.25."""
        with fp32(attn):
            return self._weights(attn.float(), clip_pad)

    def _weights(self, attn: torch.Tensor, clip_pad: torch.Tensor) -> torch.Tensor:
        w = self.mix(attn).squeeze(1)  # [B, N, K], >= 0
        if self.norm == "sum":
            w = w.masked_fill(clip_pad[:, None, :], 0.0)
            return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        if self.norm == "none":
            return w.masked_fill(clip_pad[:, None, :], 0.0)
        return w.masked_fill(clip_pad[:, None, :], float("-inf")).softmax(dim=-1)

    def forward(self, probs: torch.Tensor, clip_tokens: torch.Tensor, image_tokens: torch.Tensor, clip_pad: torch.Tensor) -> torch.Tensor:
        """probs [B, h, N, K], clip_tokens [B, K, d], image_tokens [B, N, d], clip_pad [B, K] -> MSE (scalar)."""
        w = self.weights(probs, clip_pad)  # [B, N, K] fp32
        with fp32(w):
            x_hat = w @ clip_tokens.detach().float()  # [B, N, d]
            return F.mse_loss(x_hat, image_tokens.detach().float())


class RICE(nn.Module):
    """Shared encoder + RICE heads. `forward` returns the training losses; retrieval uses the
    backbone's embeddings alone (the heads are training-time only, as in the released code)."""

    def __init__(self, backbone: nn.Module, cfg: RICEConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        # CNN backbones have no CLS token; their mean token plays token 0 for the decoder's pooling.
        self.add_global_token = not getattr(backbone, "has_cls_token", False)
        token_dim = int(backbone.token_dim)  # type: ignore[arg-type]
        # Without ICL the temperature is never used: frozen, so no optimiser step moves it and DDP
        # does not wait for its gradient.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)), requires_grad=cfg.learn_temperature and cfg.icl)
        self.decoder: PairwiseMatchingDecoder | PairwiseMatchingDecoderV2 | PairwiseMatchingDecoderV2Mean | None = None
        if cfg.pmd and cfg.decoder in ("v2", "v2-mean"):
            if token_dim % cfg.decoder_heads:
                raise ValueError(f"the v2 decoder works at the token width {token_dim}: not a multiple of {cfg.decoder_heads} heads")
            if cfg.decoder == "v2":
                self.decoder = PairwiseMatchingDecoderV2(backbone, token_dim, cfg.decoder_heads, cfg.decoder_attn_dropout)
            else:
                self.decoder = PairwiseMatchingDecoderV2Mean(backbone, token_dim, cfg.decoder_heads)
        elif cfg.pmd:
            self.decoder = PairwiseMatchingDecoder(token_dim, cfg.decoder_width, cfg.decoder_heads)
        self.pfr = PatchFeatureReconstruction(self.decoder.heads, cfg.pfr_norm) if cfg.pfr and self.decoder is not None else None

    @property
    def leaves_parameters_unused(self) -> bool:
        """True when some trainable parameters get no gradient (DDP then needs find_unused_parameters):
        without ICL nothing reads the global embedding, so the backbone's projection gets none."""
        return not self.cfg.icl

    @torch.no_grad()
    def pair_scores(self, image_tokens: torch.Tensor, frame_tokens: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """PMD scores of one clip against G candidate images (for re-ranking a shortlist).

        image_tokens [G, N, d] and frame_tokens [T, N, d] as `encode` returns them, frame_mask [T]
        (1 = real frame) -> [G], higher = better match. Needs the PMD decoder.
        """
        if self.decoder is None:
            raise ValueError("this model was trained without PMD: no decoder to score pairs")
        g = image_tokens.shape[0]
        clip_tok = frame_tokens.flatten(0, 1).unsqueeze(0).expand(g, -1, -1)  # [G, T*N, d]
        pad = (~frame_mask.bool()).repeat_interleave(frame_tokens.shape[1]).unsqueeze(0).expand(g, -1)  # [G, T*N]
        return self.decoder(image_tokens, clip_tok, pad)[0]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W] -> (embedding [B, D], decoder tokens [B, N, d])."""
        emb, tokens = self.backbone(images)
        if self.add_global_token:
            tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [B, 1 + HW, d]
        return emb, tokens

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, images: torch.Tensor, skus: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames [b, T, 3, H, W] (padded), mask [b, T] 1 = real frame, images [b, 3, H, W], skus [b] int.

        Returns this rank's share of each loss and of the weighted total ("loss"). Shares sum over
        ranks to the single-process loss on the global batch. DDP averages gradients over ranks, so
        the caller multiplies "loss" by the world size before backward to get that loss's gradient.
        """
        b, t = mask.shape
        real = mask.bool()
        f = int(real.sum())
        # One backbone pass over the real frames and the images; padded frames are never encoded.
        emb, tokens = self.encode(torch.cat([frames[real], images]))  # [f + b, D], [f + b, N, d]
        n_tok = tokens.shape[1]
        frame_emb = emb.new_zeros(b, t, emb.shape[1])
        frame_emb[real] = emb[:f]  # [b, T, D]
        frame_tok = tokens.new_zeros(b, t, n_tok, tokens.shape[2])
        frame_tok[real] = tokens[:f]  # [b, T, N, d]
        clip_emb = clip_embedding(frame_emb, mask)  # [b, D]
        image_emb = F.normalize(emb[f:].float(), dim=-1)  # [b, D]
        image_tok = tokens[f:]  # [b, N, d]
        clip_tok = frame_tok.flatten(1, 2)  # [b, T*N, d]
        clip_pad = (~real).repeat_interleave(n_tok, dim=1)  # [b, T*N]

        rank, _ = world_info()
        offset = rank * b
        clip_all, image_all, sku_all = gather_batch(clip_emb), gather_batch(image_emb), gather_batch(skus)
        share = b / clip_all.shape[0]
        out: dict[str, torch.Tensor] = {}
        total = clip_emb.new_zeros(())
        if self.cfg.icl:
            out["icl"] = share * icl_loss(
                clip_emb, image_emb, skus, self.logit_scale.exp(), clip_all=clip_all, image_all=image_all, sku_all=sku_all, offset=offset
            )
            total = total + self.cfg.icl_weight * out["icl"]
        if self.decoder is not None:
            k = self.cfg.hard_negatives
            with fp32(image_emb):
                sim = image_emb.detach().float() @ clip_all.detach().float().T  # [b, N]
            neg_idx, valid = mine_hard_negatives(sim, skus, sku_all, k)
            clip_tok_all, pad_all = gather_batch(clip_tok), gather_batch(clip_pad)
            pos_score, probs = self.decoder(image_tok, clip_tok, clip_pad)  # [b], [b, h, N, T*N]
            k = neg_idx.shape[1]
            neg = neg_idx.flatten()  # [b*k]
            neg_score, _ = self.decoder(image_tok.repeat_interleave(k, dim=0), clip_tok_all[neg], pad_all[neg])
            out["pmd"] = share * pmd_loss(pos_score, neg_score.view(b, k), valid)
            total = total + self.cfg.pmd_weight * out["pmd"]
            if self.pfr is not None:
                out["pfr"] = share * self.pfr(probs, clip_tok, image_tok, clip_pad)
                total = total + self.cfg.pfr_weight * out["pfr"]
        out["loss"] = total
        return out
