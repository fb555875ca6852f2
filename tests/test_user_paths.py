"""Small things a new user meets in the first hour: one validation language over HTTP, a client that
does not duplicate items when a snippet is run twice, and a generator whose --help answers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import jpeg
from tools.client import RiceClient
from tools.democatalog import DemoProduct

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
