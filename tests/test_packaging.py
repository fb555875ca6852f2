"""The serving image installs no training code: the wheel built from what the Dockerfile copies
holds model/, index/, pipeline/, service/ and tools/, and nothing of train/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_the_image_installs_has_no_training_code(tmp_path: Path) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    src = tmp_path / "src"
    src.mkdir()
    for line in dockerfile.splitlines():  # the builder stage's COPY lines, as docker would run them
        m = re.fullmatch(r"COPY ([\w.\- ]+) (\./[\w.\-]*|\./)", line.strip())
        if not m:
            continue
        names, dest = m.group(1).split(), m.group(2)
        for name in names:
            target = src / dest / name if dest == "./" else src / dest
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, target)
    assert (src / "model").is_dir() and (src / "service").is_dir() and not (src / "train").exists()
    for cache in src.rglob("__pycache__"):
        shutil.rmtree(cache)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=600)
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("service/") for n in names) and any(n.startswith("model/checkpoint") for n in names)
    assert not [n for n in names if n.startswith("train/")]
    # and the serving entry point imports without it
    code = "import sys; sys.path.insert(0, sys.argv[1]); import service.app; sys.exit(any(m.split('.')[0] == 'train' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code, str(src)], cwd=tmp_path, timeout=300).returncode == 0


_WITHOUT_TRAIN = """
import importlib.abc, sys
class NoTrain(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "train" or name.startswith("train."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTrain())
from tools.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["--help"], 0, "livebench"),
        (["train", "--epochs", "1"], 2, "no training code"),
        (["grocery-check", "--data", "x"], 2, "no training code"),
    ],
)
def test_the_cli_without_the_training_package_answers_in_one_line(argv: list[str], code: int, says: str) -> None:
    """As in the serving image: `rice --help` works and a training command says what it needs, no traceback."""
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TRAIN, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == code, run.stderr[-2000:]
    assert says in run.stdout + run.stderr and "Traceback" not in run.stderr
