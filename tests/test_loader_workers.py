"""`rice evaluate` and `rice train` with their DEFAULT data-loader worker counts finish.

Workers forked after OpenCV/torch have run thread pools can block forever on an inherited lock
(`rice evaluate` hung that way with its 2 default workers), and every other test passes
`--workers 0`. These run the real CLI in a child process with a generous timeout, so a hang
fails the test instead of blocking CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from train import evaluate, train
from train.data import loader_options

TIMEOUT_S = 300  # a normal run takes seconds; only a hang reaches this
TINY_VIT = ["--backbone", "vit", "--no-pretrained", "--vit", "32,2,4,8,32,16", "--image-size", "32"]


def _manifest(root: Path, clips: int = 4, frames: int = 3) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(clips):
        folder = root / f"clip{i}"
        folder.mkdir(parents=True)
        for j in range(frames):
            cv2.imwrite(str(folder / f"{j:04d}.jpg"), rng.integers(0, 255, (40, 64, 3), dtype=np.uint8))
        cv2.imwrite(str(root / f"img{i}.jpg"), rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        rows.append({"clip": f"clip{i}", "image": f"img{i}.jpg", "sku": f"s{i}"})
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rice(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False
    )


def _default_workers(build: object) -> int:
    import argparse

    p = argparse.ArgumentParser()
    build(p)  # type: ignore[operator]
    return int(next(a.default for a in p._actions if a.dest == "workers"))


def test_workers_do_not_start_by_fork() -> None:
    """The loaders' workers come from a forkserver (or spawn), never fork."""
    assert loader_options(0) == {"num_workers": 0}
    opts = loader_options(2)
    assert opts["num_workers"] == 2
    assert opts["multiprocessing_context"].get_start_method() in ("forkserver", "spawn")


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("run", range(3))
def test_evaluate_with_default_workers_finishes(tmp_path: Path, run: int) -> None:
    assert _default_workers(evaluate.build_parser) > 0  # otherwise this would not test the workers
    manifest = _manifest(tmp_path)
    proc = _rice("evaluate", "--queries", str(manifest), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["queries"] == 4 and set(report["recall"]) >= {"R@1", "R@5", "R@10"}


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("run", range(2))
def test_train_with_default_workers_finishes(tmp_path: Path, run: int) -> None:
    """Training (a loader per epoch, after the model has run) and its final evaluation, default workers."""
    assert _default_workers(train.build_parser) > 0
    manifest = _manifest(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--train", str(manifest), "--val", str(manifest), "--out", str(out), "--batch-size", "2"]
    proc = _rice(*args, *TINY_VIT, "--epochs", "2", "--no-progress", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final.pt").is_file() and (out / "eval.json").is_file()
