"""`rice gallery export DIR`, `rice gallery import DIR` and `rice reindex --embed-only DIR`: a gallery
as a folder of three files (`index.bulk`: manifest.json, items.jsonl, vectors.npy), with the items'
thumbnails (`thumbnails/<id>.jpg`), local features for verification (`features/<id>.rlf`) and, with
`--originals`, original images (`originals/<id>.jpg`).

Export and import talk to a running service (GET /v1/gallery/export, POST /v1/gallery/bulk), so they
work the same on the embedded and the Redis store and every replica sees the import at once. An
import is all or nothing per request: by default the whole folder is one request; `--rows N` splits
it into requests of N rows (each all or nothing) for catalogs larger than RICE_MAX_BULK_BYTES.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from index.blobs import image_member, image_tar, parse_image_member
from index.bulk import ITEMS, MANIFEST, VECTORS, BulkItem, Manifest, npy_header, read_manifest, write_dir
from index.errors import InvalidBulk
from tools.client import api_error


def _client(url: str, api_key: str | None) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"X-API-Key": api_key} if api_key else {}, timeout=httpx.Timeout(30.0, read=3600.0))


def export_gallery(url: str, api_key: str | None, folder: Path, originals: bool = False) -> Manifest:
    """Stream the served gallery into `folder` with its items' thumbnails (and originals), the
    manifest written last: its presence means complete."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".export.tar"
    params = {"images": "all" if originals else "thumbnails"}
    with _client(url, api_key) as c, c.stream("GET", "/v1/gallery/export", params=params) as r:
        if r.status_code != 200:
            r.read()
            raise api_error(r)  # the CLI's exit status by kind: refused key 4, rejected 5, server 6
        with tmp.open("wb") as f:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
    try:
        with tarfile.open(tmp) as tar:
            for member in tar:  # only known names are extracted, under names made here (never the member's path)
                parsed = parse_image_member(member.name)
                if parsed is not None and member.isfile():
                    target = folder / image_member(*parsed)
                    target.parent.mkdir(exist_ok=True)
                elif member.name in (VECTORS, ITEMS) and member.isfile():
                    target = folder / member.name
                else:
                    continue
                source = tar.extractfile(member)
                assert source is not None  # a regular file
                with target.open("wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            manifest = tar.extractfile(MANIFEST)  # last: its presence means complete
            if manifest is None:
                raise InvalidBulk(f"the export has no {MANIFEST}")
            (folder / MANIFEST).write_bytes(manifest.read())
    except KeyError as exc:
        raise InvalidBulk(f"the export is incomplete: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return read_manifest(folder)


@dataclass
class ImportReport:
    imported: int
    requests: int
    gallery_version: int


def _rows_of(folder: Path, manifest: Manifest) -> tuple[np.ndarray, list[bytes]]:
    vectors = np.load(folder / VECTORS, mmap_mode="r", allow_pickle=False)  # rows are read as they are sent
    if vectors.dtype != np.float32 or vectors.ndim != 2 or vectors.shape != (manifest.count, manifest.dim):
        raise InvalidBulk(
            f"{VECTORS} is {vectors.dtype} {list(vectors.shape)}; the manifest says float32 [{manifest.count}, {manifest.dim}]"
        )
    lines = [line for line in (folder / ITEMS).read_bytes().splitlines() if line.strip()]
    if len(lines) != manifest.count:
        raise InvalidBulk(f"{ITEMS} has {len(lines)} lines; the manifest says {manifest.count}")
    return vectors, lines


def _npy_bytes(rows: np.ndarray) -> Iterator[bytes]:
    yield npy_header(len(rows), rows.shape[1])
    for s in range(0, len(rows), 4096):
        yield np.ascontiguousarray(rows[s : s + 4096], dtype="<f4").tobytes()


def _images_of(folder: Path, lines: list[bytes], originals: bool) -> bytes | None:
    """The rows' thumbnails, local features (and originals) found in `folder`, as the bulk import's `images` tar."""
    kinds = ("thumbnails", "features", "originals") if originals else ("thumbnails", "features")
    members = []
    for line in lines:
        try:
            item_id = str(json.loads(line)["item_id"])
        except (ValueError, KeyError, TypeError):
            continue  # the service rejects the row itself, naming it
        for kind in kinds:
            path = folder / image_member(kind, item_id)
            if path.is_file():
                members.append((image_member(kind, item_id), path.read_bytes()))
    return image_tar(members) if members else None


def import_gallery(
    url: str,
    api_key: str | None,
    folder: Path,
    rows: int = 0,
    progress: Callable[[int], object] | None = None,
    originals: bool = False,
) -> ImportReport:
    """POST the folder to /v1/gallery/bulk, in requests of `rows` rows (0 = one request: all or
    nothing), each with its rows' thumbnails (and, with `originals`, original images) when the folder has them."""
    manifest = read_manifest(folder)
    vectors, lines = _rows_of(folder, manifest)
    step = rows or max(1, manifest.count)
    report = ImportReport(0, 0, 0)
    with _client(url, api_key) as c:
        for start in range(0, manifest.count, step):
            part = vectors[start : start + step]
            body = b"".join(_npy_bytes(part))
            items = b"\n".join(lines[start : start + step]) + b"\n"
            files: dict[str, tuple[str, bytes, str]] = {
                "vectors": ("vectors.npy", body, "application/octet-stream"),
                "items": ("items.jsonl", items, "application/x-ndjson"),
            }
            images = _images_of(folder, lines[start : start + step], originals)
            if images is not None:
                files["images"] = ("images.tar", images, "application/x-tar")
            r = c.post("/v1/gallery/bulk", files=files, data={"model_version": manifest.model_version})
            if r.status_code != 201:
                done = f"{report.imported} rows imported before it" if report.imported else "nothing was imported"
                error = api_error(r)
                error.message = f"import of rows {start}-{start + len(part) - 1} failed ({done}): {error.message}"
                raise error
            answer = r.json()
            report = ImportReport(report.imported + answer["imported"], report.requests + 1, answer["gallery_version"])
            if progress is not None:
                progress(len(part))
    return report


def embed_to_dir(checkpoint: str | None, catalog: Path, shop_id: str | None, folder: Path, quiet: bool = False) -> dict[str, Any]:
    """`rice reindex --embed-only`: embed a catalog with CHECKPOINT into an import folder (no store, no
    server); load it later with `rice gallery import` into a service serving that checkpoint."""
    from tqdm import tqdm

    from model.checkpoint import load_encoder
    from pipeline.engine import EncoderEngine
    from pipeline.originals import original_jpeg
    from service.settings import Settings
    from tools.ingest import read_catalog
    from tools.reindex import embed_catalog

    settings = Settings()
    items = read_catalog(catalog, shop_id)
    engine = EncoderEngine(load_encoder(checkpoint), settings.device, settings.torch_threads, settings.dtype)
    thumbnails: dict[str, bytes] = {}
    features: dict[str, bytes] = {}
    with tqdm(total=len(items), unit="img", disable=quiet) as bar:
        embedded, failed = embed_catalog(items, engine, settings, progress=bar.update, thumbnails=thumbnails, features=features)
    for it, _ in embedded:  # `rice gallery import` sends them with the rows: imported items have images (and verify) too
        (folder / "thumbnails").mkdir(parents=True, exist_ok=True)
        (folder / image_member("thumbnails", it.item_id)).write_bytes(thumbnails[it.item_id])
        (folder / "features").mkdir(exist_ok=True)
        (folder / image_member("features", it.item_id)).write_bytes(features[it.item_id])
        if (original := original_jpeg(it.data())) is not None:
            (folder / "originals").mkdir(exist_ok=True)
            (folder / image_member("originals", it.item_id)).write_bytes(original)
    vectors = np.stack([v for _, v in embedded]).astype(np.float32) if embedded else np.zeros((0, engine.dim), np.float32)
    write_dir(
        folder,
        Manifest(engine.model_version, engine.dim, len(embedded)),
        [BulkItem(it.item_id, it.sku, it.shop_id, {}) for it, _ in embedded],
        vectors,
    )
    return {"model_version": engine.model_version, "embedded": len(embedded), "failed": failed, "out": str(folder)}


def cmd_gallery(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    try:
        if args.gallery_command == "export":
            manifest = export_gallery(args.url, args.api_key, folder, args.originals)
            print(json.dumps({"exported": manifest.count, "gallery_version": manifest.gallery_version, "out": str(folder)}))
        else:
            report = import_gallery(args.url, args.api_key, folder, args.rows, originals=args.originals)
            print(json.dumps({"imported": report.imported, "requests": report.requests, "gallery_version": report.gallery_version}))
    except (InvalidBulk, OSError) as exc:  # the folder: missing, not an export, unreadable (a usage error)
        print(f"rice gallery {args.gallery_command}: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: Any) -> None:
    """Mount `rice gallery export|import` on the CLI's subcommands."""
    g = sub.add_parser("gallery", help="back up or restore a gallery: vectors, items and their thumbnails (originals with --originals)")
    gs = g.add_subparsers(dest="gallery_command", required=True)
    for name, help_text in (
        ("export", "write the served model's gallery into DIR (GET /v1/gallery/export)"),
        ("import", "load DIR (from export or `rice reindex --embed-only`) into the service (POST /v1/gallery/bulk)"),
    ):
        p = gs.add_parser(name, help=help_text)
        p.add_argument("dir", help="the folder")
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
        p.add_argument("--api-key", default=None, help="API key with write rights (or RICE_CLIENT_API_KEY)")
        if name == "import":
            p.add_argument("--rows", type=int, default=0, help="rows per request (each all or nothing); 0 = the whole folder in one")
        p.add_argument(
            "--originals",
            action="store_true",
            help="also carry each item's original image (originals/), which `rice reindex` re-embeds from (thumbnails always go)",
        )
        p.set_defaults(func=cmd_gallery)
