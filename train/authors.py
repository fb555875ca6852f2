"""Import the RICE authors' released checkpoints (mmf v2, `rice_final.pth`) into this project's format.

    rice import-checkpoint rice_final.pth --out rice_authors.pt
    python -m train.authors rice_final.pth --out rice_authors.pt

Their file is a state dict (possibly under "model", with "module." prefixes) whose visual tower sits
under `image_encoder.model.*`, in one of the two layouts their encoder factory builds:
- "openai_clip": OpenAI CLIP's `visual` module (conv1, class_embedding, transformer.resblocks.N, ln_post,
  proj): this project's ViT keys exactly;
- "huggingface_clip": transformers' CLIPVisionTransformer (embeddings.patch_embedding,
  encoder.layers.N.self_attn.q_proj, ...) plus `image_encoder.visual_projection.weight`.
The PMD decoder (`transformer.transformer.layers.{0,1}`, `transformer.pooler`, `heads.vim`) and the
PFR convs (`heads.rec`) come along when present, so `rice serve` can re-rank with their decoder.
The written checkpoint carries the preprocessing the authors evaluate with: CLIP normalisation,
frames and shop images squashed, Resize 256 + CenterCrop 224. `rice evaluate --checkpoint`,
`rice serve --checkpoint` and `rice train --init-from` read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import save_checkpoint
from model.config import CLIP_MEAN, CLIP_STD, EncoderConfig, PreprocessConfig, ViTConfig
from model.rice import RICE, RICEConfig
from model.vit import VisionTransformer, convert_clip_state, vit_config_from_clip_state

PREFIX = "image_encoder.model."


def authors_preprocess(image_size: int = 224) -> PreprocessConfig:
    """The authors' evaluation transform: Resize(256) of the squashed frame, CenterCrop(224), shop images too
    (scaled by the same 256/224 for other input sizes)."""
    return PreprocessConfig(round(image_size * 256 / 224), image_size, CLIP_MEAN, CLIP_STD, frame_fit="squash", image_fit="squash")


class AuthorsCheckpointError(ValueError):
    """The file is not one of the authors' RICE checkpoints (no `image_encoder.model.*` visual tower)."""


def _flat_state(raw: Any) -> dict[str, torch.Tensor]:
    """The tensor dict of a saved file: unwrap {"model": ...} / {"state_dict": ...}, drop "module." prefixes."""
    for key in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise AuthorsCheckpointError(f"expected a state dict, got {type(raw).__name__}")
    return {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _hf_to_openai(v: dict[str, torch.Tensor], projection: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers CLIPVisionTransformer keys (+ visual_projection [embed, width]) -> OpenAI CLIP `visual` keys."""
    out = {
        "conv1.weight": v["embeddings.patch_embedding.weight"],
        "class_embedding": v["embeddings.class_embedding"],
        "positional_embedding": v["embeddings.position_embedding.weight"],
        "ln_pre.weight": v["pre_layrnorm.weight"],  # sic: transformers' spelling
        "ln_pre.bias": v["pre_layrnorm.bias"],
        "ln_post.weight": v["post_layernorm.weight"],
        "ln_post.bias": v["post_layernorm.bias"],
        "proj": projection.T,  # Linear weight [embed, width] -> proj [width, embed]
    }
    layers = sorted({int(k.split(".")[2]) for k in v if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        att = src + "self_attn."
        out[dst + "attn.in_proj_weight"] = torch.cat([v[f"{att}{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([v[f"{att}{p}_proj.bias"] for p in "qkv"])
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1"}
        pairs["mlp.c_proj"] = "mlp.fc2"
        for ours, theirs in pairs.items():
            for t in ("weight", "bias"):
                out[f"{dst}{ours}.{t}"] = v[f"{src}{theirs}.{t}"]
    return out


def visual_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The visual tower in OpenAI CLIP keys, and which layout the file used ("openai_clip" / "huggingface_clip")."""
    v = {k[len(PREFIX) :]: t for k, t in state.items() if k.startswith(PREFIX)}
    if not v:
        raise AuthorsCheckpointError(f"no {PREFIX}* keys: not a RICE authors' checkpoint")
    if "embeddings.patch_embedding.weight" in v:
        projection = state.get("image_encoder.visual_projection.weight")
        if projection is None:
            raise AuthorsCheckpointError("huggingface_clip layout without image_encoder.visual_projection.weight")
        try:
            return _hf_to_openai(v, projection), "huggingface_clip"
        except KeyError as exc:
            raise AuthorsCheckpointError(f"huggingface_clip layout: missing {exc}") from exc
    return v, "openai_clip"


def decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Their PMD decoder and PFR convs in this project's RICE keys (`decoder.*`, `pfr.*`); None when absent."""
    layers = "transformer.transformer.layers."
    if not any(k.startswith(layers) for k in state) or "heads.vim.weight" not in state:
        return None
    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        if k.startswith(layers + "0."):
            out["decoder.self_block." + k[len(layers) + 2 :]] = t
        elif k.startswith(layers + "1."):
            out["decoder.cross_block." + k[len(layers) + 2 :]] = t
        elif k.startswith("transformer.pooler."):
            out["decoder.pooler." + k[len("transformer.pooler.") :]] = t
        elif k.startswith("heads.rec."):  # Sequential(conv, relu, conv, relu): indices 0 and 2, as ours
            out["pfr.mix." + k[len("heads.rec.") :]] = t
    out["decoder.vim.weight"] = state["heads.vim.weight"]
    return out


def convert_authors_checkpoint(src: str | Path, out: str | Path, decoder_heads: int | None = None) -> dict[str, Any]:
    """Read their file, write ours; returns a summary (layout, architecture, version, decoder imported)."""
    raw = torch.load(src, map_location="cpu", weights_only=True)
    state = _flat_state(raw)
    visual, layout = visual_state(state)
    vit = vit_config_from_clip_state(visual)
    cfg = EncoderConfig("vit", vit=ViTConfig(vit.image_size, vit.patch_size, vit.width, vit.layers, vit.heads, vit.embed_dim))
    cfg = EncoderConfig("vit", vit=cfg.vit, preprocess=authors_preprocess(vit.image_size))
    backbone = VisionTransformer(cfg.vit)
    backbone.load_state_dict(convert_clip_state(visual, backbone), strict=True)
    extra: dict[str, Any] = {"imported_from": {"file": Path(src).name, "layout": layout}}
    heads = decoder_state(state)
    if heads is not None:
        rec = heads.get("pfr.mix.0.weight")
        n_heads = decoder_heads or (int(rec.shape[1]) if rec is not None else 8)  # PFR's input channels = heads
        rcfg = RICEConfig(decoder="v2", decoder_heads=n_heads, pfr=rec is not None, temperature=0.01)
        model = RICE(backbone, rcfg)
        missing, unexpected = model.load_state_dict(
            {**{f"backbone.{k}": t for k, t in backbone.state_dict().items()}, **heads}, strict=False
        )
        missing = [k for k in missing if k != "logit_scale"]  # ICL's temperature: training-only, not imported
        if missing or unexpected:
            raise AuthorsCheckpointError(f"their decoder does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
        extra["rice_config"] = rcfg.to_dict()
        extra["heads"] = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    version = save_checkpoint(out, backbone, cfg, extra)
    return {"layout": layout, "vit": cfg.vit.__dict__, "model_version": version, "decoder": heads is not None, "out": str(out)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `rice import-checkpoint` / `python -m train.authors`."""
    parser.add_argument("src", help="the authors' checkpoint (e.g. rice_final.pth from their README's table)")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint (this project's format)")
    parser.add_argument("--decoder-heads", type=int, help="their decoder's heads (default: read from the PFR convs, else 8)")


def run(args: argparse.Namespace) -> int:
    import json

    summary = convert_authors_checkpoint(args.src, args.out, args.decoder_heads)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    sys.exit(run(p.parse_args()))
