"""The README's `rice` command blocks, run as written against a fresh service: every command that
needs no dataset (ingest, recognize, timeline, gallery export/import, manifest, reindex) exits 0, in the order
a new user would meet them, ending with a model switch that keeps every item."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model.checkpoint import LoadedEncoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from model.encoder import build_backbone
from service.server import background_server
from tests.conftest import settings_for
from tools.cli import main
from tools.client import RiceClient
from tools.democatalog import DemoProduct, write_demo_catalog
from tools.longclip import plan_recording, write_recording

pytestmark = [pytest.mark.integration, pytest.mark.slow]
README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_DATA = (
    "train",
    "evaluate",
    "grocery-check",
    "livebench",
    "lpr4m",
    "import-checkpoint",
    "serve",
    "demo",
)  # datasets, or a foreground server


def readme_commands() -> list[str]:
    """Every `rice ...` line of the README's bash blocks (continuations joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            trained = "runs/" in line  # a training run's output (the training walk-through)
            if re.match(r"^(\.venv/bin/)?rice ", line) and shlex.split(line)[1] not in NEEDS_DATA and not trained:
                commands.append(re.sub(r"^\.venv/bin/", "", line))
    return commands


def _user_files(cwd: Path, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    """What the commands name, as a user would have it: clips, stills, catalogs, a recording, a checkpoint."""
    (cwd / "clips").mkdir()
    for i, p in enumerate(products[4:6]):  # named by SKU, of products in ./catalog: `rice manifest` pairs them
        (cwd / "clips" / f"{p.sku}_seller-{i}.mp4").write_bytes(clip_of(p, seed=20 + i, frames=12))
    cv2.imwrite(str(cwd / "shelf.jpg"), products[2].image)
    cv2.imwrite(str(cwd / "cola-330ml.jpg"), products[3].image)
    (cwd / "img").mkdir()
    rows = ["path,sku,shop_id,metadata"]
    for p in products[:4]:
        cv2.imwrite(str(cwd / "img" / f"{p.sku}.jpg"), p.image)
        rows.append(f'img/{p.sku}.jpg,{p.sku},{p.shop_id},"{{""name"": ""product {p.sku}""}}"')
    (cwd / "catalog.csv").write_text("\n".join(rows) + "\n")
    (cwd / "catalog").mkdir()
    for p in products[4:6]:  # one sub-folder per SKU, and one image named by its SKU
        (cwd / "catalog" / p.sku).mkdir()
        cv2.imwrite(str(cwd / "catalog" / p.sku / "front.jpg"), p.image)
    cv2.imwrite(str(cwd / "catalog" / f"{products[6].sku}.jpg"), products[6].image)
    parts = plan_recording([p.sku for p in products[:3]], [], 6.0, np.random.default_rng(0), product_s=(2, 3))
    write_recording(parts, products, cwd / "livestream-1.mp4", fps=5.0)
    torch.manual_seed(0)
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=256, pretrained=True))
    for name in ("new.pt", "ckpt.pt"):
        save_checkpoint(cwd / name, build_backbone(cfg), cfg)


def test_the_readme_command_blocks_run_against_a_fresh_service(
    tmp_path: Path,
    encoder: LoadedEncoder,
    products: list[DemoProduct],
    clip_of: Callable[..., bytes],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = readme_commands()
    assert {shlex.split(c)[1] for c in commands} >= {"ingest", "recognize", "gallery", "reindex", "timeline", "manifest"}
    cwd = tmp_path / "user"
    cwd.mkdir()
    _user_files(cwd, products, clip_of)
    a, b = settings_for(tmp_path / "a", job_dir=str(tmp_path / "a" / "jobs")), settings_for(tmp_path / "b")
    monkeypatch.setenv("RICE_GALLERY_PATH", a.gallery_path)  # where `rice reindex` finds the served gallery
    monkeypatch.chdir(cwd)
    with background_server(a, encoder) as url, background_server(b, encoder) as other:
        switch = [c for c in commands if c.startswith("rice reindex --checkpoint ckpt.pt")]
        assert len(switch) == 1  # the model switch goes last: it changes what the others talk to
        for command in [c for c in commands if c not in switch] + switch:
            if command.startswith("rice reindex --checkpoint ckpt.pt"):
                with RiceClient(url) as client:
                    before = {i.item_id: i for i in client.list_items(limit=500).items}
            line = command.replace("$OTHER_URL", other).replace("$URL", url)
            line = re.sub(r"http://(127\.0\.0\.1:8000|localhost:800[12])", url, line)
            out_file = None
            if " > " in line:
                line, out_file = (part.strip() for part in line.split(" > "))
            args = [m for a in shlex.split(line)[1:] for m in (sorted(str(f.name) for f in cwd.glob(a)) if "*" in a else [a])]
            if args[0] in ("recognize", "ingest", "timeline", "gallery") and "--url" not in args:
                args += ["--url", url]  # the default is port 8000, which this test does not hold
            if args[0] in ("ingest", "timeline", "reindex"):
                args.append("--quiet")
            code = main(args)
            out, err = capsys.readouterr()
            assert code == 0, f"{command}: exit {code}\n{err[-2000:]}"
            assert "Traceback" not in err
            if out_file:
                (cwd / out_file).write_text(out)
        with RiceClient(url) as client:
            after = {i.item_id: i for i in client.list_items(limit=500).items}
            assert client.info()["embedding_dim"] == 256  # switched to the new checkpoint
    assert after == before and len(after) >= 8  # every item, SKU, shop and metadata kept
    assert (cwd / "answers.csv").read_text().startswith("path,status,match,sku")
    assert len((cwd / "data" / "train.jsonl").read_text().splitlines()) == 2
    assert (cwd / "timeline.csv").is_file() and (cwd / "backup" / "manifest.json").is_file()


def readme_curl_walk() -> list[str]:
    """The curl lines of the README's HTTP example block (from `URL=...` up to the backup commands)."""
    block = next(b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if b.startswith("URL=http://127.0.0.1:8000"))
    lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
    return [
        line
        for line in lines[: lines.index("# back up the gallery, restore it elsewhere (same model), or load an offline reindex")]
        if line.startswith("curl ")
    ]


def test_the_readme_curl_examples_succeed_in_order(tmp_path: Path, encoder: LoadedEncoder) -> None:
    """Each example, run as written by curl against a fresh service (with the demo's files), answers 2xx:
    the DELETE of a SKU deletes one an earlier example added (it answered 404 when none did)."""
    commands = readme_curl_walk()
    assert any("DELETE" in c and "/v1/gallery/skus/" in c for c in commands)
    write_demo_catalog(tmp_path / "demo_out", n_products=2, clips_per_product=1)
    (tmp_path / ".curlrc").write_text("fail-with-body\nmax-time = 120\n")  # exit 22 on an HTTP error status
    with background_server(settings_for(tmp_path / "gallery"), encoder) as url:
        env = {**os.environ, "HOME": str(tmp_path), "URL": url}
        for command in commands:
            out = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, f"{command}: exit {out.returncode}\n{out.stdout[-1000:]}{out.stderr[-1000:]}"
