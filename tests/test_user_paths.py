"""Small things a new user meets in the first hour: one validation language over HTTP, a client that
does not duplicate items when a snippet is run twice, a generator whose --help answers, and a
command that turns the user's own catalog and clips into a training manifest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import jpeg
from tools.cli import main
from tools.client import RiceClient
from tools.democatalog import DemoProduct
from train.data import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_top_k_out_of_range_speaks_one_language(client: TestClient, products: list[DemoProduct]) -> None:
    image = {"file": ("x.jpg", jpeg(products[0].image))}
    low = client.post("/v1/recognize/image?top_k=0", files=image)
    high = client.post("/v1/recognize/image?top_k=100000", files=image)
    assert low.status_code == high.status_code == 422
    assert low.json()["error"] == {"code": "invalid_request", "message": "query.top_k: Input should be greater than or equal to 1"}
    assert high.json()["error"] == {"code": "invalid_request", "message": "query.top_k: Input should be less than or equal to 100"}


def test_add_item_without_an_id_is_idempotent(client: TestClient, products: list[DemoProduct]) -> None:
    rice = RiceClient(http=client)
    first = rice.add_item(jpeg(products[0].image), "SKU-A", "shop-1")
    again = rice.add_item(jpeg(products[0].image), "SKU-A", "shop-1")  # the README snippet, run twice
    other_shop = rice.add_item(jpeg(products[0].image), "SKU-A", "shop-2")
    assert first.item_id == again.item_id != other_shop.item_id
    assert rice.list_items().total == 2


def test_longclip_help_prints_usage() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "tools.longclip", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: python -m tools.longclip" in out.stdout and "--seconds" in out.stdout


def test_a_users_catalog_and_clips_become_a_training_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog, clips = tmp_path / "catalog", tmp_path / "clips"
    (catalog / "COLA_330").mkdir(parents=True)
    (catalog / "COLA_330" / "front.jpg").write_bytes(b"jpeg")
    (catalog / "COLA_330" / "back.jpg").write_bytes(b"jpeg")
    (catalog / "COLA").mkdir()
    (catalog / "COLA" / "front.jpg").write_bytes(b"jpeg")
    (catalog / "TEA.jpg").write_bytes(b"jpeg")
    (clips / "TEA").mkdir(parents=True)
    (clips / "TEA" / "live-1.mp4").write_bytes(b"mp4")  # in the SKU's sub-folder
    (clips / "COLA_330_live-2.mp4").write_bytes(b"mp4")  # the longest SKU its name starts with
    (clips / "COLA.mp4").write_bytes(b"mp4")
    (clips / "unknown-3.mp4").write_bytes(b"mp4")
    out = tmp_path / "train.jsonl"
    assert main(["manifest", "--catalog", str(catalog), "--clips", str(clips), "--out", str(out), "--shop-id", "shop-1"]) == 1
    assert "unknown-3.mp4: no catalog SKU matches" in capsys.readouterr().err
    rows = read_manifest(out)
    got = sorted((Path(str(r.clip)).name, Path(r.image).parent.name + "/" + Path(r.image).name, r.sku, r.shop) for r in rows)
    assert got == [
        ("COLA.mp4", "COLA/front.jpg", "COLA", "shop-1"),
        ("COLA_330_live-2.mp4", "COLA_330/back.jpg", "COLA_330", "shop-1"),
        ("COLA_330_live-2.mp4", "COLA_330/front.jpg", "COLA_330", "shop-1"),
        ("live-1.mp4", "catalog/TEA.jpg", "TEA", "shop-1"),
    ]
    assert main(["manifest", "--catalog", str(catalog), "--clips", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_an_item_id_with_a_slash_has_its_thumbnail_and_can_be_deleted(client: TestClient, products: list[DemoProduct]) -> None:
    rice = RiceClient(http=client)
    item = rice.add_item(jpeg(products[0].image), "SKU-A", "shop-1", item_id="shop-1/SKU-A/front")  # ids may hold "/"
    assert rice.thumbnail(item.item_id).startswith(b"\xff\xd8\xff")
    assert rice.delete_item(item.item_id).deleted == ["shop-1/SKU-A/front"]
