"""The backbone protocol and registry: a new backbone is one file plus one line in `REGISTRY`.

A backbone maps images [B, 3, H, W] to (global embedding [B, embed_dim], patch tokens
[B, T, token_dim]). Its file defines a `BackboneSpec` saying how to build it from an
`EncoderConfig`, how the training CLI configures it, which preprocessing it expects, which part of
it trains under `--train-blocks`, and (optionally) where its zero-shot weights are for WiSE-FT.
Config, encoder, training and WiSE look the spec up here instead of branching on the name.

    REGISTRY["my_net"] = "model.my_net:SPEC"     # or register_backbone(SPEC) at run time
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from model.config import EncoderConfig, PreprocessConfig


@runtime_checkable
class Backbone(Protocol):
    """What RICE, the encoder and the service need from a backbone module."""

    embed_dim: int  # size of the global embedding
    token_dim: int  # size of each patch token

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the rest of `model/` needs to know about one backbone type.

    build(cfg, pretrained): the module; `pretrained` None = as the config says, False = skip
        loading pretrained weights (a checkpoint's own weights replace them anyway).
    from_args(args): the EncoderConfig `rice train` writes, from its parsed arguments (training
        then applies `--frame-fit` to its preprocessing).
    preprocess(image_size): the normalisation and crop size the backbone's weights expect.
    trainable(module): (blocks, tail): the blocks in input-to-output order and the parts after them
        (norms, projections); `--train-blocks N` trains the last N blocks plus the tail.
    prepare(module, args): optional start-of-training hook (import weight files, identity projection).
    zero_shot(cfg): optional state dict of the weights fine-tuning starts from (WiSE-FT's other end).
    has_cls_token: whether token 0 is a learned summary token; otherwise RICE prepends the mean token.
    """

    name: str
    build: Callable[[EncoderConfig, bool | None], nn.Module]
    from_args: Callable[[argparse.Namespace], EncoderConfig]
    preprocess: Callable[[int], PreprocessConfig]
    trainable: Callable[[nn.Module], tuple[list[nn.Module], list[nn.Module | nn.Parameter]]]
    prepare: Callable[[nn.Module, argparse.Namespace], None] | None = None
    zero_shot: Callable[[EncoderConfig], dict[str, torch.Tensor]] | None = None


# name -> "module:attribute" of its BackboneSpec, imported on first use (so the service does not
# import backbones it never builds).
REGISTRY: dict[str, str | BackboneSpec] = {
    "efficientnet_lite0": "model.efficientnet:SPEC",
    "vit": "model.vit:SPEC",
}


def register_backbone(spec: BackboneSpec) -> None:
    """Add (or replace) a backbone at run time, e.g. from a plugin or a test."""
    REGISTRY[spec.name] = spec


def backbone_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec registered under `name`; ValueError naming the known ones otherwise."""
    entry = REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(backbone_names())}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        if not isinstance(entry, BackboneSpec) or entry.name != name:
            raise TypeError(f"{REGISTRY[name]} is not the BackboneSpec of {name!r}")
        REGISTRY[name] = entry
    return entry


def build_backbone(cfg: EncoderConfig, pretrained: bool | None = None) -> nn.Module:
    """Construct the backbone the config names (see `BackboneSpec.build` for `pretrained`)."""
    module = get_spec(cfg.backbone).build(cfg, pretrained)
    if not isinstance(module, Backbone):
        raise TypeError(f"backbone {cfg.backbone!r} lacks embed_dim/token_dim")
    return module


def parse_backbone_options(text: str) -> dict[str, Any]:
    """`key=value,...` (the training CLI's --backbone-options) -> dict; values parsed as JSON when they
    are (numbers, booleans), else kept as strings. For backbones without flags of their own."""
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"backbone options are key=value pairs, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out
