"""A model switch keeps every item: `rice reindex --checkpoint new.pt` with no folder re-embeds the
gallery itself from each item's kept original, with its shop, metadata and thumbnail; a backup and
an offline embedding carry items' images too."""

from __future__ import annotations

import io
import json
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import pytest
import torch

from index.blobs import DirBlobs, image_tar, originals_dir
from model.checkpoint import LoadedEncoder, save_checkpoint
from model.config import EfficientNetConfig, EncoderConfig
from model.encoder import build_backbone
from service.server import background_server
from tests.conftest import jpeg, settings_for
from tools.cli import main
from tools.client import RiceClient
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration


def _new_checkpoint(path: Path) -> str:
    """Another model: ImageNet Lite0 plus a 256-d projection (another dimension, another version)."""
    torch.manual_seed(0)
    cfg = EncoderConfig(efficientnet=EfficientNetConfig(embed_dim=256, pretrained=True))
    return save_checkpoint(path, build_backbone(cfg), cfg)


def test_reindex_without_a_folder_keeps_every_item_shop_metadata_and_thumbnail(
    tmp_path: Path,
    encoder: LoadedEncoder,
    products: list[DemoProduct],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(tmp_path)
    monkeypatch.setenv("RICE_GALLERY_PATH", settings.gallery_path)  # what `rice reindex` opens (originals beside it)
    new_version = _new_checkpoint(tmp_path / "new.pt")
    big = cv2.resize(products[0].image, (1600, 1200))  # kept bounded: long side 1024
    with background_server(settings, encoder) as url, RiceClient(url) as client:
        added = [client.add_item(jpeg(big), products[0].sku, "shop-a", metadata={"name": "first", "n": 0})]
        for i, p in enumerate(products[1:6], start=1):
            added.append(client.add_item(jpeg(p.image), p.sku, f"shop-{'ab'[i % 2]}", metadata={"name": p.sku, "n": i}))
        gone = client.add_item(jpeg(products[6].image), products[6].sku, "shop-a")
        client.delete_item(gone.item_id)  # deleted before the switch: must stay deleted
        blobs = DirBlobs(str(originals_dir(None, settings.gallery_path)))
        assert blobs.get(gone.item_id) is None  # its original went with it
        kept = blobs.get(added[0].item_id)
        assert kept is not None and max(cv2.imdecode(np.frombuffer(kept, np.uint8), cv2.IMREAD_COLOR).shape[:2]) == 1024
        blobs.delete([added[5].item_id])  # an item from before originals were kept: embedded from its thumbnail
        before = {i.item_id: i for i in client.list_items(limit=100).items}
        builtin = client.info()  # the fallback threshold was measured for the built-in encoder: no warning
        assert builtin["match_threshold_calibrated"] is True and builtin["calibration_warning"] is None
        thumbs = {item_id: client.thumbnail(item_id) for item_id in before}

        assert main(["reindex", "--checkpoint", str(tmp_path / "new.pt"), "--url", url, "--quiet"]) == 0
        out, err = capsys.readouterr()
        assert f"6 items embedded for {new_version}: 5 from kept originals, 1 from thumbnails (no original kept), 0 from" in err
        report = json.loads(out)
        assert report["missing"] == [] and report["switched"][0]["switched"] is True

        info = client.info()
        assert info["model_version"] == new_version and info["gallery"]["items"] == 6
        # a checkpoint without its own calibration says so, in /v1/info and in the log
        assert info["match_threshold_calibrated"] is False and "no calibrated match threshold" in info["calibration_warning"]
        assert any("no calibrated match threshold" in r.getMessage() for r in caplog.records if r.name == "rice.state")
        after = {i.item_id: i for i in client.list_items(limit=100).items}
        assert after == before  # every id, SKU, shop and metadata
        assert gone.item_id not in after
        assert {item_id: client.thumbnail(item_id) for item_id in after} == thumbs
        for p, a in zip(products[:6], added, strict=True):  # per-shop recognition finds each item in its shop
            answer = client.recognize(jpeg(p.image), top_k=1, shop_id=a.shop_id, image=True)
            assert answer.model_version == new_version and answer.top is not None and answer.top.item_id == a.item_id


def test_export_and_import_carry_thumbnails_and_originals(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], monkeypatch: pytest.MonkeyPatch
) -> None:
    backup, embedded = tmp_path / "backup", tmp_path / "embedded"
    with background_server(settings_for(tmp_path / "a"), encoder) as url, RiceClient(url) as client:
        ids = [client.add_item(jpeg(p.image), p.sku, "shop-a", item_id=f"shop-a:{p.sku}@front").item_id for p in products[:3]]
        thumbs = {i: client.thumbnail(i) for i in ids}
        originals = {i: client.http.get(f"/v1/gallery/items/{quote(i, safe='')}/original").content for i in ids}
        assert main(["gallery", "export", str(backup), "--url", url, "--originals"]) == 0
    assert sorted(p.name for p in (backup / "thumbnails").iterdir()) == sorted(f"{quote(i, safe='')}.jpg" for i in ids)

    catalog = tmp_path / "catalog"  # a flat folder, embedded offline: its import gets thumbnails too
    catalog.mkdir()
    cv2.imwrite(str(catalog / f"{products[4].sku}.png"), products[4].image)
    monkeypatch.setenv("RICE_GALLERY_PATH", str(tmp_path / "unused.db"))
    assert main(["reindex", "--catalog", str(catalog), "--embed-only", str(embedded), "--quiet"]) == 0

    with background_server(settings_for(tmp_path / "b"), encoder) as url, RiceClient(url) as client:
        assert main(["gallery", "import", str(backup), "--url", url, "--originals"]) == 0
        assert {i: client.thumbnail(i) for i in ids} == thumbs  # the console shows the same pictures
        assert {i: client.http.get(f"/v1/gallery/items/{quote(i, safe='')}/original").content for i in ids} == originals
        assert main(["gallery", "import", str(embedded), "--url", url]) == 0
        (item,) = client.list_items(sku=products[4].sku).items
        assert client.thumbnail(item.item_id).startswith(b"\xff\xd8\xff")
        # a bad images part is refused whole: nothing of that import is written
        bad = image_tar([("thumbnails/x.jpg", b"not a jpeg")])
        npy = np.ones((1, client.stats()["dim"]), np.float32)
        buf = io.BytesIO()
        np.save(buf, npy)
        r = client.http.post(
            "/v1/gallery/bulk",
            files={
                "vectors": ("v.npy", buf.getvalue()),
                "items": ("i.jsonl", b'{"item_id": "x", "sku": "BAD-IMPORT"}\n'),
                "images": ("i.tar", bad),
            },
            data={"model_version": client.info()["model_version"]},
        )
        assert r.status_code == 400 and "not a JPEG" in r.json()["error"]["message"]
        assert client.list_items(sku="BAD-IMPORT").total == 0


def test_reindex_does_not_switch_when_an_item_would_be_lost(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path)
    monkeypatch.setenv("RICE_GALLERY_PATH", settings.gallery_path)
    new_version = _new_checkpoint(tmp_path / "new.pt")
    with background_server(settings, encoder) as url, RiceClient(url) as client:
        client.add_item(jpeg(products[0].image), products[0].sku, "shop-a")
        buf = io.BytesIO()  # an item imported as a bare vector: no original, no thumbnail to re-embed from
        np.save(buf, np.ones((1, client.stats()["dim"]), np.float32))
        r = client.http.post(
            "/v1/gallery/bulk",
            files={"vectors": ("v.npy", buf.getvalue()), "items": ("i.jsonl", b'{"item_id": "bare", "sku": "BARE"}\n')},
            data={"model_version": encoder.model_version},
        )
        assert r.status_code == 201
        args = ["reindex", "--checkpoint", str(tmp_path / "new.pt"), "--url", url, "--quiet"]
        assert main(args) == 1  # the item is reported, and the replica stays on the old model
        out, err = capsys.readouterr()
        assert json.loads(out)["missing"] == ["bare"] and "not switched: 1 gallery items could not be embedded" in err
        assert client.info()["model_version"] == encoder.model_version
        assert main([*args, "--allow-missing"]) == 1  # switched on purpose; the loss is still reported
        assert json.loads(capsys.readouterr().out)["switched"][0]["switched"] is True
        assert client.info()["model_version"] == new_version and client.info()["gallery"]["items"] == 1
