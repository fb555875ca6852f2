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
