"""The only module that reads or writes checkpoint files.

A checkpoint is a plain dict of tensors and primitives (loadable with weights_only=True):
{"format", "encoder_config", "model_version", "encoder", ...training extras}. The service
builds the encoder from the checkpoint alone.
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

from model.config import EncoderConfig
from model.efficientnet import packaged_weights_path
from model.encoder import build_backbone

FORMAT = "rice-checkpoint/1"


class CheckpointError(ValueError):
    """The file is missing, not a RICE checkpoint, or does not match its own config."""


@dataclass
class LoadedEncoder:
    backbone: nn.Module
    config: EncoderConfig
    model_version: str
    source: str  # the checkpoint path, or a description of the built-in weights


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
    return LoadedEncoder(backbone, cfg, version, "built-in ImageNet EfficientNet-Lite0 (no checkpoint)")


def save_checkpoint(
    path: str | os.PathLike[str],
    backbone: nn.Module,
    config: EncoderConfig,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint. Returns the version."""
    state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    version = f"rice-{config.backbone}-{state_version(state, config)}"
    payload: dict[str, Any] = {
        "format": FORMAT,
        "encoder_config": config.to_dict(),
        "model_version": version,
        "encoder": state,
    }
    payload.update(extra or {})
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
    return LoadedEncoder(backbone, config, str(payload["model_version"]), str(path))


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
