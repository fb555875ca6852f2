"""Weight-space ensembling with the zero-shot encoder (WiSE-FT, Wortsman et al., CVPR 2022).

theta = alpha * theta_finetuned + (1 - alpha) * theta_zero_shot. Fine-tuning on a shop's few
products sharpens them but drifts away from what recognises products never trained on; the
interpolated weights keep most of the gain on trained products and recover never-trained ones.
The zero-shot end is the packaged ImageNet backbone with the projection at the identity: the point
`--identity-proj` training starts from, so both ends share one architecture.

    python -m train.wise --checkpoint runs/full/final.pt --alpha 0.5 --out runs/full/wise50.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from model.backbones import get_spec
from model.checkpoint import load_encoder, save_checkpoint
from model.config import EncoderConfig


def zero_shot_state(cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """The pretrained weights fine-tuning started from, as the backbone's registry entry defines them
    (EfficientNet-Lite0: packaged ImageNet weights, identity projection)."""
    spec = get_spec(cfg.backbone)
    if spec.zero_shot is None:
        raise ValueError(f"backbone {cfg.backbone!r} has no packaged zero-shot weights to interpolate with")
    return spec.zero_shot(cfg)


def interpolate(path: str | Path, alpha: float, out: str | Path) -> str:
    """Write the alpha-interpolated checkpoint; returns its model version."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    tuned = load_encoder(path)
    zero = zero_shot_state(tuned.config)
    state = tuned.backbone.state_dict()
    mixed = {k: alpha * v + (1 - alpha) * zero[k] if v.is_floating_point() else v for k, v in state.items()}
    tuned.backbone.load_state_dict(mixed, strict=True)
    return save_checkpoint(out, tuned.backbone, tuned.config, extra={"wise_alpha": alpha, "wise_from": tuned.model_version})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checkpoint", required=True, help="a fine-tuned RICE checkpoint whose backbone has zero-shot weights (EfficientNet-Lite0)"
    )
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the fine-tuned end (1 = unchanged)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    print(interpolate(args.checkpoint, args.alpha, args.out))


if __name__ == "__main__":
    main()
