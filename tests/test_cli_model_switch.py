"""The model-switch trap, closed: a server brought up on a new checkpoint over a gallery that only
holds another model's items says so (log, /v1/info, /metrics, `rice recognize`) and names the fix;
`rice reindex` fixes it on the embedded SQLite store; the ingest journal is per model, so re-running
`rice ingest` after a switch embeds everything again instead of printing "already done"."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import pytest
import torch

from model.checkpoint import LoadedEncoder, load_encoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from model.encoder import build_backbone
from service.server import background_server
from tests.conftest import settings_for
from tests.serving_helpers import metric
from tools.cli import main
from tools.client import RiceClient
from tools.democatalog import DemoProduct

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_new_model_over_another_models_gallery(
    tmp_path: Path,
    encoder: LoadedEncoder,
    products: list[DemoProduct],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    chosen = products[:4]
    (tmp_path / "img").mkdir()
    rows = ["path,sku,shop_id,metadata"]
    for p in chosen:
        cv2.imwrite(str(tmp_path / "img" / f"{p.sku}.jpg"), p.image)
        rows.append(f'img/{p.sku}.jpg,{p.sku},{p.shop_id},"{{""name"": ""{p.name}""}}"')
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("\n".join(rows) + "\n")
    journal = str(tmp_path / "journal.jsonl")
    settings = settings_for(tmp_path, port=0)
    monkeypatch.setenv("RICE_GALLERY_PATH", settings.gallery_path)  # what `rice reindex` opens

    # 1. The first model's catalog, with metadata from the CSV.
    with background_server(settings, encoder) as url:
        assert main(["ingest", str(catalog), "--url", url, "--state", journal, "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["ingested"] == 4
        with RiceClient(url) as client:
            assert {i.sku: i.metadata for i in client.list_items().items} == {p.sku: {"name": p.name} for p in chosen}

    # 2. A new checkpoint over the same gallery file: empty namespace beside a full one.
    torch.manual_seed(0)
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=256, pretrained=True))
    ckpt = tmp_path / "new.pt"
    new_version = save_checkpoint(ckpt, build_backbone(cfg), cfg)
    with caplog.at_level(logging.WARNING, logger="rice.state"), background_server(settings, load_encoder(str(ckpt))) as url:
        logged = [r.getMessage() for r in caplog.records if "empty gallery" in r.getMessage()]
        assert logged and encoder.model_version in logged[0] and "rice reindex" in logged[0]
        with RiceClient(url) as client:
            gallery = client.info()["gallery"]
            assert gallery["items"] == 0 and gallery["other_namespaces"] == {encoder.model_version: 4}
            assert "rice reindex" in gallery["warning"]
        assert metric(url, "rice_gallery_other_namespace_items") == 4
        assert main(["recognize", str(tmp_path / "img" / f"{chosen[0].sku}.jpg"), "--url", url]) == 0
        assert "empty gallery: the served model" in capsys.readouterr().out

        # 3. The fix on the embedded store: reindex writes this model's namespace, the server reloads it.
        assert main(["reindex", "--checkpoint", str(ckpt), "--catalog", str(catalog), "--url", url, "--quiet"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["model_version"] == new_version and report["embedded"] == 4
        assert report["switched"][0]["gallery_items"] == 4
        with RiceClient(url) as client:
            info = client.info()
            assert info["gallery"]["items"] == 4 and info["gallery"]["warning"] is None
            assert {i.sku: i.metadata for i in client.list_items().items} == {p.sku: {"name": p.name} for p in chosen}
            assert client.thumbnail(client.list_items().items[0].item_id)[:3] == b"\xff\xd8\xff"  # a JPEG
            answer = client.recognize(tmp_path / "img" / f"{chosen[2].sku}.jpg")
            assert answer.model_version == new_version and answer.top is not None and answer.top.sku == chosen[2].sku
        assert metric(url, "rice_gallery_other_namespace_items") == 0

        # 4. The journal is per model: the same journal does not call the new model's files done.
        assert main(["ingest", str(catalog), "--url", url, "--state", journal, "--quiet", "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert (summary["ingested"], summary["skipped"], summary["model_version"]) == (4, 0, new_version)
        assert main(["ingest", str(catalog), "--url", url, "--state", journal, "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["skipped"] == 4  # and resumable within one model
