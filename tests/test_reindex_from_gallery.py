"""A model switch keeps every item: `rice reindex --checkpoint new.pt` with no folder re-embeds the
gallery itself from each item's kept original, with its shop, metadata and thumbnail."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from index.blobs import DirBlobs, originals_dir
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
        thumbs = {item_id: client.thumbnail(item_id) for item_id in before}

        assert main(["reindex", "--checkpoint", str(tmp_path / "new.pt"), "--url", url, "--quiet"]) == 0
        out, err = capsys.readouterr()
        assert f"6 items embedded for {new_version}: 5 from kept originals, 1 from thumbnails (no original kept), 0 from" in err
        report = json.loads(out)
        assert report["missing"] == [] and report["switched"][0]["switched"] is True

        info = client.info()
        assert info["model_version"] == new_version and info["gallery"]["items"] == 6
        after = {i.item_id: i for i in client.list_items(limit=100).items}
        assert after == before  # every id, SKU, shop and metadata
        assert gone.item_id not in after
        assert {item_id: client.thumbnail(item_id) for item_id in after} == thumbs
        for p, a in zip(products[:6], added, strict=True):  # per-shop recognition finds each item in its shop
            answer = client.recognize(jpeg(p.image), top_k=1, shop_id=a.shop_id, image=True)
            assert answer.model_version == new_version and answer.top is not None and answer.top.item_id == a.item_id
