"""`rice reindex` switches the served model under a concurrent query load with zero failed and
zero mixed-version answers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest
import torch

from index.sqlite_store import SQLiteStore
from model.checkpoint import LoadedEncoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from model.encoder import build_backbone
from service.server import background_server
from tests.conftest import settings_for
from tools.democatalog import DemoProduct
from tools.ingest import Journal, http_poster, read_catalog, run_ingest
from tools.reindex import run_reindex

pytestmark = pytest.mark.integration


def test_reindex_switches_models_under_load_without_mixed_answers(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    catalog = tmp_path / "catalog"
    for p in products:
        (catalog / p.sku).mkdir(parents=True)
        cv2.imwrite(str(catalog / p.sku / "front.jpg"), p.image)
    items = read_catalog(catalog)
    # The new model: ImageNet Lite0 plus a 256-d projection (another dimension, another version).
    torch.manual_seed(0)
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=256, pretrained=True))
    new_version = save_checkpoint(tmp_path / "new.pt", build_backbone(cfg), cfg)
    clip = clip_of(products[1], seed=4)
    settings = settings_for(tmp_path, max_batch_size=8)

    with background_server(settings, encoder) as url, httpx.Client(base_url=url, timeout=60) as client:
        journal = Journal(tmp_path / "journal.jsonl")
        assert not run_ingest(items, http_poster(client), journal).failed
        journal.close()
        old = client.post("/v1/recognize", files={"file": ("c.mp4", clip)}).json()
        assert old["model_version"] == encoder.model_version

        answers: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []  # a load thread that dies must fail the test, not shrink the sample
        stop = threading.Event()

        def load() -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as c:
                    while not stop.is_set():
                        r = c.post("/v1/recognize", files={"file": ("c.mp4", clip)})
                        answers.append((r.status_code, r.json()))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        store = SQLiteStore(settings.gallery_path)
        try:
            report = run_reindex(str(tmp_path / "new.pt"), items, store, settings, [url], None)
            assert len(store.features([it.item_id for it in items])) == len(products)  # local features written too
            final = client.post("/v1/recognize", files={"file": ("c.mp4", clip)}).json()
            deadline = time.monotonic() + 20  # keep the load on until it has seen the new model
            while time.monotonic() < deadline and not any(b.get("model_version") == new_version for _, b in answers):
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
            store.close()

        assert report.model_version == new_version and report.previous_model_version == encoder.model_version
        assert report.embedded == len(products) and report.switched[0]["switched"] is True
        assert final["model_version"] == new_version
        stats = client.get("/v1/gallery/stats").json()
        assert stats["items"] == len(products) and stats["dim"] == 256 and stats["namespace"] == new_version

    assert errors == [] and answers, "the load generator must have run without errors"
    assert [s for s, _ in answers if s != 200] == []  # zero failed answers
    reference = {encoder.model_version: old["results"], new_version: final["results"]}
    for _, body in answers:
        expected = reference[body["model_version"]]  # KeyError = an unknown model answered
        got = body["results"]
        # the same clip always gets the same SKUs and scores from the same model + its gallery
        assert [r["sku"] for r in got] == [r["sku"] for r in expected]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for a, b in zip(got, expected, strict=True))
    assert {b["model_version"] for _, b in answers} == set(reference)  # the load spanned the switch
