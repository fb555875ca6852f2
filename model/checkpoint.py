"""The only module that reads or writes checkpoint files.

A checkpoint is a plain dict of tensors and primitives (loadable with weights_only=True):
{"format", "encoder_config", "model_version", "encoder", ...training extras}. The service
builds the encoder from the checkpoint alone. Training extras this module reads back:
"rice_config" + "heads" (the RICE decoder etc., for PMD re-ranking) and "match_threshold"
(a calibrated score above which the top answer counts as a match).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.backbones import build_backbone
from model.config import EncoderConfig
from model.efficientnet import packaged_weights_path
from model.rice import RICE, RICEConfig
from model.verdict import VerdictModel

FORMAT = "rice-checkpoint/1"


BUILTIN_SOURCE = "built-in ImageNet EfficientNet-Lite0 (no checkpoint)"  # LoadedEncoder.source of the default encoder


class CheckpointError(ValueError):
    """The file is missing, not a RICE checkpoint, or does not match its own config."""


@dataclass
class LoadedEncoder:
    """What a checkpoint (or the built-in default) gives the service.

    backbone/config/model_version/source: the retrieval encoder. rice: the whole trained RICE model
    (same backbone module plus its heads: the PMD decoder etc.) when the checkpoint carries them,
    else None. match_threshold: the calibrated "this is a match" score, None when not calibrated.
    """

    backbone: nn.Module
    config: EncoderConfig
    model_version: str
    source: str  # the checkpoint path, or a description of the built-in weights
    rice: RICE | None = None
    match_threshold: float | None = None
    verdict: VerdictModel | None = None  # the calibrated verdict (`model.verdict`), when the checkpoint has one

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, H, W] -> (L2-normalised embeddings [B, D], decoder tokens [B, N, d]).

        The tokens are what the PMD decoder reads (`rice.pair_scores`); for backbones without a
        summary token the mean token is prepended, as in training.
        """
        if self.rice is not None:
            emb, tokens = self.rice.encode(images)
        else:
            emb, tokens = self.backbone(images)
            if not getattr(self.backbone, "has_cls_token", False):
                tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)  # [B, 1 + HW, d]
        return torch.nn.functional.normalize(emb.float(), dim=-1), tokens

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images [B, 3, H, W] -> decoder tokens [B, N, d] (see `encode`)."""
        return self.encode(images)[1]


def state_version(state: dict[str, torch.Tensor], config: EncoderConfig) -> str:
    """A short content hash of the weights and config: equal versions mean equal embeddings."""
    h = hashlib.sha256(repr(sorted(config.to_dict().items())).encode())
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


@functools.cache  # the packaged weights never change while the process runs
def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def default_encoder() -> LoadedEncoder:
    """EfficientNet-Lite0 with the packaged ImageNet weights: what the service runs without a checkpoint."""
    cfg = EncoderConfig()
    backbone = build_backbone(cfg)
    # The version covers the preprocessing too: the same weights fed differently embed differently.
    h = hashlib.sha256((_file_hash(packaged_weights_path()) + repr(cfg.to_dict())).encode()).hexdigest()
    version = f"effnet-lite0-imagenet-{h[:8]}"
    return LoadedEncoder(backbone, cfg, version, BUILTIN_SOURCE)


def save_checkpoint(
    path: str | os.PathLike[str],
    backbone: nn.Module,
    config: EncoderConfig,
    extra: dict[str, Any] | None = None,
    match_threshold: float | None = None,
) -> str:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint. Returns the version.
    A match_threshold, when given, is stored (and read back by `load_encoder`); it does not change the
    model version, which names the embeddings only."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    version = f"rice-{config.backbone}-{state_version(state, config)}"
    payload: dict[str, Any] = {
        "format": FORMAT,
        "encoder_config": config.to_dict(),
        "model_version": version,
        "encoder": state,
    }
    payload.update(extra or {})
    if match_threshold is not None:
        payload["match_threshold"] = float(match_threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return version


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw checkpoint dict (tensors and primitives only; never unpickles objects)."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise CheckpointError(f"not a readable checkpoint: {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    return payload


def load_encoder(path: str | os.PathLike[str] | None) -> LoadedEncoder:
    """Build the encoder a checkpoint describes, or the default encoder when path is None."""
    if path is None:
        return default_encoder()
    payload = read_checkpoint(path)
    try:
        config = EncoderConfig.from_dict(payload["encoder_config"])
        backbone = build_backbone(config, pretrained=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed encoder config: {exc}") from exc
    try:
        backbone.load_state_dict(payload["encoder"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored config: {exc}") from exc
    threshold = payload.get("match_threshold")
    verdict = None
    if payload.get("verdict") is not None:  # stored by `python -m model.verdict --checkpoint`
        try:
            verdict = VerdictModel.from_json(str(payload["verdict"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed verdict model: {exc}") from exc
    return LoadedEncoder(
        backbone,
        config,
        str(payload["model_version"]),
        str(path),
        _rice_heads(payload, backbone, path),
        None if threshold is None else float(threshold),
        verdict,
    )


def _rice_heads(payload: dict[str, Any], backbone: nn.Module, path: str | os.PathLike[str]) -> RICE | None:
    """The trained RICE model around `backbone` when the checkpoint carries its heads, else None."""
    if "rice_config" not in payload or "heads" not in payload:
        return None
    config = dict(payload["rice_config"])
    if config.get("decoder") == "v2" and "decoder.proj_score.weight" in payload["heads"]:
        config["decoder"] = "v2-mean"  # written before the authors' v2 decoder replaced this one
    try:
        rice = RICE(backbone, RICEConfig.from_dict(config))
        # The backbone is already loaded; the heads' keys are the rest of RICE's state dict.
        missing, unexpected = rice.load_state_dict(payload["heads"], strict=False)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: RICE heads do not match their stored config: {exc}") from exc
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: RICE heads do not match their stored config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return rice.eval()


def set_checkpoint_fields(path: str | os.PathLike[str], fields: dict[str, Any]) -> None:
    """Add or replace top-level primitive fields (e.g. a calibrated `match_threshold`) in place,
    atomically; the weights and so the model version are unchanged."""
    payload = read_checkpoint(path)
    reserved = {"format", "encoder_config", "model_version", "encoder"} & set(fields)
    if reserved:
        raise CheckpointError(f"refusing to overwrite {sorted(reserved)} in {path}")
    payload.update(fields)
    tmp = Path(path).with_suffix(Path(path).suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
