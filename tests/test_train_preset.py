"""`rice train --preset lpr4m-v2 / lpr4m-v1`: the authors' hyper-parameters as one flag, explicit flags
winning, the global batch divided over processes, and the applied values printed at start."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from train.train import PRESETS, apply_preset, build_parser, rice_config, run


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build_parser(p)
    return p.parse_args(["--train", "x.jsonl", "--out", "o", *argv])


def test_v2_preset_sets_the_authors_recipe_and_explicit_flags_win() -> None:
    args = _args("--preset", "lpr4m-v2", "--clip-weights", "ViT-B-32.pt", "--lr-head", "5e-5")
    applied = apply_preset(args, world=2)
    assert (args.lr_backbone, args.lr_head, args.adam_beta2, args.warmup, args.max_steps) == (1e-6, 5e-5, 0.999, 500, 5000)
    assert args.batch_size == 48 and applied["batch_size"] == 48  # global 96 over 2 processes
    assert (args.backbone, args.vit, args.pmd_form, args.frame_fit, args.image_fit, args.per_shop) == (
        "vit",
        "768,12,12,32,224,512",
        "v2",
        "squash",
        "squash",
        True,
    )
    assert "lr_head" not in applied
    cfg = rice_config(args)
    assert (cfg.decoder, cfg.decoder_heads, cfg.pfr_norm, cfg.pfr_weight, cfg.learn_temperature) == ("v2", 8, "softmax", 1.0, True)


def test_v1_preset() -> None:
    args = _args("--preset", "lpr4m-v1", "--clip-weights", "ViT-B-32.pt")
    apply_preset(args)
    cfg = rice_config(args)
    assert (args.lr_backbone, args.lr_head, args.batch_size, args.warmup_fraction) == (3e-7, 3e-4, 128, 0.1)
    assert (cfg.decoder, cfg.pfr_weight, cfg.pfr_norm, cfg.temperature, cfg.learn_temperature) == ("small", 0.05, "none", 0.01, False)


def test_preset_needs_starting_weights() -> None:
    with pytest.raises(ValueError, match="--clip-weights"):
        apply_preset(_args("--preset", "lpr4m-v2"))
    assert set(PRESETS) == {"lpr4m-v1", "lpr4m-v2"}


@pytest.mark.slow
def test_preset_is_printed_at_start_of_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        (tmp_path / f"c{i}").mkdir()
        for j in range(2):
            cv2.imwrite(str(tmp_path / f"c{i}" / f"{j}.jpg"), rng.integers(0, 255, (40, 24, 3), dtype=np.uint8))
        cv2.imwrite(str(tmp_path / f"i{i}.jpg"), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
        rows.append({"clip": f"c{i}", "image": f"i{i}.jpg", "sku": f"s{i}"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = "--vit 32,2,4,8,32,16 --image-size 32 --no-pretrained --decoder-heads 4 --batch-size 2 --max-steps 1 --workers 0"
    argv = ["--train", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "run"), "--preset", "lpr4m-v2", *tiny.split(" ")]
    p = argparse.ArgumentParser()
    build_parser(p)
    assert run(p.parse_args([*argv, "--no-progress", "--device", "cpu"])) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("preset lpr4m-v2: ") and "--lr-backbone 1e-06" in first and "--pmd-form v2" in first
