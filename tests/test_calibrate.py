"""Open-set calibration: AUROC, rates at a threshold, threshold choice, storing it in a checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import CheckpointError, read_checkpoint, save_checkpoint, set_checkpoint_fields
from train.calibrate import auroc, pick_threshold, rates_at


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    present = rng.normal(0.6, 0.1, 40).round(2)  # rounding makes ties
    absent = rng.normal(0.5, 0.1, 30).round(2)
    pairs = [(p > a) + 0.5 * (p == a) for p in present for a in absent]
    assert auroc(present, absent) == pytest.approx(float(np.mean(pairs)))
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.1]), np.array([0.9])) == 0.0
    with pytest.raises(ValueError):
        auroc(np.array([]), absent)


def test_rates_weight_present_and_absent_equally() -> None:
    present = np.array([0.9, 0.8, 0.7, 0.4])
    absent = np.array([0.75, 0.3])
    precision, accepted, rejected = rates_at(present, absent, 0.7)
    assert accepted == 0.75 and rejected == 0.5
    assert precision == pytest.approx(0.75 / (0.75 + 0.5))  # TPR / (TPR + FPR) at an absent share of 1/2


def test_pick_threshold_reaches_target_and_keeps_most_present() -> None:
    present = np.array([0.95, 0.9, 0.85, 0.8, 0.6, 0.5])
    absent = np.array([0.7, 0.55, 0.4, 0.3])
    cal = pick_threshold(present, absent, target_precision=0.9)
    # 0.8 is the lowest present score with no absent clip above it; the threshold sits between 0.8
    # and the highest absent score below (0.7), and makes the same decisions as 0.8 on this data.
    assert 0.7 < cal.threshold <= 0.8
    assert cal.precision == 1.0 and cal.present_accepted == pytest.approx(4 / 6) and cal.absent_rejected == 1.0
    looser = pick_threshold(present, absent, target_precision=0.5)
    assert looser.threshold < cal.threshold and looser.present_accepted > cal.present_accepted


def test_pick_threshold_when_target_is_unreachable() -> None:
    present = np.array([0.5, 0.4])
    absent = np.array([0.9, 0.8])
    cal = pick_threshold(present, absent, target_precision=0.99)
    assert cal.precision < 0.99  # reported honestly, the best threshold available
    with pytest.raises(ValueError):
        pick_threshold(present, np.array([]))


def test_threshold_stored_in_checkpoint_keeps_the_model(tmp_path: Path) -> None:
    from model.config import EfficientNetConfig, EncoderConfig
    from model.encoder import build_backbone

    cfg = EncoderConfig(efficientnet=EfficientNetConfig(pretrained=False))
    path = tmp_path / "m.pt"
    backbone = build_backbone(cfg)
    version = save_checkpoint(path, backbone, cfg)
    set_checkpoint_fields(path, {"match_threshold": 0.61})
    payload = read_checkpoint(path)
    assert payload["match_threshold"] == 0.61 and payload["model_version"] == version
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in payload["encoder"].items())
    with pytest.raises(CheckpointError):
        set_checkpoint_fields(path, {"model_version": "forged"})


def test_calibrate_command_stores_the_threshold_of_a_livebench_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from model.config import EfficientNetConfig, EncoderConfig
    from model.encoder import build_backbone
    from train import calibrate

    cfg = EncoderConfig(efficientnet=EfficientNetConfig(pretrained=False))
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, build_backbone(cfg), cfg)
    report = tmp_path / "live.json"
    report.write_text(json.dumps({"open_set_scores": {"present": [0.9, 0.8, 0.5], "absent": [0.6, 0.4]}}))
    monkeypatch.setattr("sys.argv", ["calibrate", "--scores", str(report), "--precision", "0.9", "--checkpoint", str(ckpt)])
    calibrate.main()
    printed = json.loads(capsys.readouterr().out)
    assert 0.6 < printed["threshold"] <= 0.8  # above every absent score, keeping 0.9 and 0.8
    stored = read_checkpoint(ckpt)
    assert stored["match_threshold"] == printed["threshold"] and stored["match_calibration"]["present"] == 3
