"""`rice retrain` on a tiny run: feedback (with frames) exported into the training manifest, a
candidate trained from the served checkpoint, both evaluated on a pinned set, the gate refusing a
deliberately worse candidate and promoting a better one (reindex + switch on a live server), the
report written either way."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import torch

from index.feedback import Feedback, RequestRecord, SQLiteFeedbackStore
from model.checkpoint import load_encoder, save_checkpoint
from service.app import create_app
from tests.conftest import settings_for
from tests.serving_helpers import live_server
from tests.test_rice_train import _train_args, _video_dataset
from tools.cli import main
from train.data import ClipRow, read_manifest, write_manifest
from train.train import run as train

pytestmark = pytest.mark.slow

TINY = "--backbone vit --vit 32,2,4,8,32,16 --decoder-width 32 --decoder-heads 4 --frames 3 --batch-size 4 --warmup 1 --workers 0"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six coloured products (two clips each), a served checkpoint (a short tiny-ViT run), a zeroed
    copy of it (every embedding the same: the worse model), and an eval set where product 5 is absent."""
    root = tmp_path_factory.mktemp("retrain")
    manifest = _video_dataset(root)
    assert train(_train_args(manifest, root / "served", "--max-steps", "2")) == 0
    served = root / "served" / "final.pt"
    enc = load_encoder(served)
    with torch.no_grad():
        for p in enc.backbone.parameters():
            p.zero_()
    save_checkpoint(root / "worse.pt", enc.backbone, enc.config)
    rows = read_manifest(manifest)
    write_manifest([r for r in rows if r.sku != "sku5"], root / "catalog.jsonl")
    write_manifest(rows, root / "eval.jsonl")  # sku5's clips: queries of a product missing from the gallery
    return {"root": root, "served": served, "worse": root / "worse.pt", "catalog": root / "catalog.jsonl", "eval": root / "eval.jsonl"}


def _retrain(s: dict[str, Path], out: Path, *extra: str, served: str = "served") -> int:
    argv = ["retrain", "--served", str(s[served]), "--catalog-manifest", str(s["catalog"]), "--eval", str(s["eval"]), "--out", str(out)]
    return main([*argv, *extra])


def test_a_worse_candidate_is_gated_and_the_report_says_why(
    setup: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RICE_GALLERY_PATH", str(tmp_path / "g.db"))
    assert _retrain(setup, tmp_path / "out", "--candidate", str(setup["worse"])) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["decision"] == "gated" and not report["passed"] and "below the served" in report["reasons"][0]
    assert report["served"]["recall"]["R@1"] > report["candidate"]["recall"]["R@1"]
    assert report["served"]["absent_queries"] == 2 and "auroc" in report["served"]
    assert "# rice retrain: gated" in (tmp_path / "out" / "report.md").read_text()


def test_a_better_candidate_is_promoted_by_reindex_and_switch(
    setup: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog = tmp_path / "catalog"
    for r in read_manifest(setup["catalog"]):
        (catalog / r.sku).mkdir(parents=True, exist_ok=True)
        shutil.copy(r.image, catalog / r.sku / Path(r.image).name)
    settings = settings_for(tmp_path, checkpoint=str(setup["worse"]), regions=False)
    monkeypatch.setenv("RICE_GALLERY_PATH", settings.gallery_path)  # the store the reindex writes into
    with live_server(create_app(settings)) as srv:
        before = httpx.get(f"{srv.url}/v1/info").json()["model_version"]
        out = tmp_path / "out"
        code = _retrain(setup, out, "--candidate", str(setup["served"]), "--url", srv.url, "--catalog", str(catalog), served="worse")
        report = json.loads((out / "report.json").read_text())
        assert code == 0 and report["decision"] == "promoted", report
        after = httpx.get(f"{srv.url}/v1/info").json()["model_version"]
        assert after == report["candidate"]["model_version"] != before
        assert httpx.get(f"{srv.url}/v1/gallery/stats").json()["items"] == 5  # the catalog, in the candidate's namespace


def test_feedback_with_frames_becomes_training_clips_and_the_dry_run_switches_nothing(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "g.db"
    monkeypatch.setenv("RICE_GALLERY_PATH", str(db))
    store = SQLiteFeedbackStore(db)
    frames = [cv2.imencode(".jpg", np.full((40, 40, 3), c, np.uint8))[1].tobytes() for c in (40, 90, 140)]
    vec = np.ones(16, np.float32) / 4.0
    now = time.time()
    for i, (verdict, sku, kept) in enumerate([("correct", "sku1", frames), ("wrong", "sku2", frames), ("correct", "sku3", [])]):
        rec = RequestRecord(f"{i:032x}", "clip", "m", None, now, [{"sku": sku, "score": 0.5, "item_id": "x"}], vec, vec[None], kept)
        store.put_feedback(Feedback(rec.request_id, verdict, sku, now, rec), 3600)
    store.close()
    out = tmp_path / "out"
    flags = [f"--train-arg={a}" for a in [*TINY.split(), "--max-steps", "1"]]
    code = _retrain(setup, out, *flags, "--dry-run", "--url", "http://127.0.0.1:9")  # nothing listens there: never called
    report = json.loads((out / "report.json").read_text())
    assert code in (0, 1) and report["decision"] in ("gated", "would promote (dry run)")
    assert report["feedback_rows"] == 2 and report["feedback_skipped"]["no_frames"] == 1 and report["train_rows"] == 12
    rows = [ClipRow(**json.loads(line)) for line in (out / "train.jsonl").read_text().splitlines()]
    fed = [r for r in rows if r.group == "feedback"]
    assert len(fed) == 2 and all(len(list((out / str(r.clip)).glob("*.jpg"))) == 3 for r in fed)
    assert (out / "candidate" / "final.pt").is_file() and report["candidate_checkpoint"].endswith("final.pt")
