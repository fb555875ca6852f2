"""`rice gallery export/import` and `rice reindex --embed-only` against real servers over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from index.blobs import image_member, image_tar
from index.bulk import ITEMS, MANIFEST, VECTORS, read_manifest
from model.checkpoint import LoadedEncoder
from service.server import background_server
from tests.conftest import jpeg, settings_for
from tests.test_bulk import bulk_post, items_for, jsonl, npy, unit
from tools.cli import main
from tools.democatalog import DemoProduct

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_export_then_import_in_parts_restores_the_gallery(tmp_path: Path, encoder: LoadedEncoder) -> None:
    out = tmp_path / "backup"
    with background_server(settings_for(tmp_path / "a"), encoder) as url, httpx.Client(base_url=url) as c:
        dim = c.get("/v1/gallery/stats").json()["dim"]
        vectors = unit(50, dim, seed=3)
        assert bulk_post(c, npy(vectors), jsonl(items_for(50)), encoder.model_version)[0] == 201  # type: ignore[arg-type]
        c.delete("/v1/gallery/items/b7")
        assert main(["gallery", "export", str(out), "--url", url]) == 0
    manifest = read_manifest(out)
    assert (manifest.model_version, manifest.dim, manifest.count, manifest.gallery_version) == (encoder.model_version, dim, 49, 2)
    assert sorted(p.name for p in out.iterdir()) == sorted([ITEMS, MANIFEST, VECTORS])

    with background_server(settings_for(tmp_path / "b"), encoder) as url, httpx.Client(base_url=url) as c:
        assert main(["gallery", "import", str(out), "--url", url, "--rows", "20"]) == 0  # 3 requests
        stats = c.get("/v1/gallery/stats").json()
        assert stats["items"] == 49 and stats["gallery_version"] == 3
        r = c.post("/v1/recognize/image", files={"file": ("x.png", cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes())})
        assert r.status_code == 200

        other = tmp_path / "other-model"
        other.mkdir()
        for name in (ITEMS, VECTORS):
            (other / name).write_bytes((out / name).read_bytes())
        (other / MANIFEST).write_text(json.dumps({**json.loads((out / MANIFEST).read_text()), "model_version": "another"}))
        assert main(["gallery", "import", str(other), "--url", url]) == 5  # 409 (another 4xx: exit 5): nothing written
        assert c.get("/v1/gallery/stats").json()["gallery_version"] == 3


def test_reindex_embed_only_writes_an_importable_folder(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    catalog = tmp_path / "catalog"
    for p in products[:3]:
        (catalog / p.sku).mkdir(parents=True)
        cv2.imwrite(str(catalog / p.sku / "front.jpg"), p.image)
    (catalog / products[0].sku / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "embedded"
    assert main(["reindex", "--catalog", str(catalog), "--embed-only", str(out), "--quiet"]) == 1  # one bad file reported
    manifest = read_manifest(out)
    assert manifest.model_version == encoder.model_version and manifest.count == 3
    with background_server(settings_for(tmp_path), encoder) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert main(["gallery", "import", str(out), "--url", url]) == 0
        image = cv2.imencode(".jpg", products[2].image)[1].tobytes()
        r = c.post("/v1/recognize/image", files={"file": ("p.jpg", image)})
        assert r.json()["results"][0]["sku"] == products[2].sku


def test_a_restored_backup_verifies_like_the_original(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: Callable[..., bytes]
) -> None:
    """Export with --originals, import into another server: the restored items carry their local
    features (before: verifiable false, 0 inliers, until `rice reindex`), so a clip answers the same."""
    out, clip = tmp_path / "backup", clip_of(products[1], seed=3)

    def ask(c: httpx.Client) -> dict[str, Any]:
        r = c.post("/v1/recognize", files={"file": ("c.mp4", clip, "video/mp4")})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    with background_server(settings_for(tmp_path / "a"), encoder) as url, httpx.Client(base_url=url, timeout=60) as c:
        for p in products[:4]:
            files = {"image": ("p.jpg", jpeg(p.image), "image/jpeg")}
            assert c.post("/v1/gallery/items", files=files, data={"sku": p.sku, "item_id": p.sku}).status_code == 201
        before = ask(c)
        assert main(["gallery", "export", str(out), "--url", url, "--originals"]) == 0
    assert len(list((out / "features").iterdir())) == 4
    top = before["results"][0]
    assert top["sku"] == products[1].sku and top["verifiable"] is True and top["inliers"] > 0

    with background_server(settings_for(tmp_path / "b"), encoder) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert main(["gallery", "import", str(out), "--url", url, "--originals"]) == 0
        after = ask(c)
    evidence = ("sku", "inliers", "verifiable", "frames_verified", "score")
    assert [[r.get(k) for k in evidence] for r in after["results"]] == [[r.get(k) for k in evidence] for r in before["results"]]
    assert (after["match"], after["match_probability"]) == (before["match"], before["match_probability"])


def test_an_import_refuses_features_that_are_not_rlf1(tmp_path: Path, encoder: LoadedEncoder) -> None:
    with background_server(settings_for(tmp_path), encoder) as url, httpx.Client(base_url=url) as c:
        dim = c.get("/v1/gallery/stats").json()["dim"]
        tar = image_tar([(image_member("features", "b0"), b"RLF1" + b"\0" * 20)])  # the magic, not the layout
        files = {
            "vectors": ("v.npy", npy(unit(1, dim, seed=1)), "application/octet-stream"),
            "items": ("i.jsonl", jsonl(items_for(1))),
            "images": ("images.tar", tar, "application/x-tar"),
        }
        r = c.post("/v1/gallery/bulk", files=files, data={"model_version": encoder.model_version})
        assert r.status_code == 400 and "features of 'b0'" in r.text, r.text
        assert c.get("/v1/gallery/stats").json()["items"] == 0
