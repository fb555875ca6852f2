"""`rice ingest`: feed a catalog (a folder with one sub-folder per SKU or images named by SKU, one
image, or a CSV of path,sku,shop_id,metadata) into a running service, concurrently, resumably, reporting bad files
without stopping.

Item ids are derived from (sku, file path), so running the same catalog twice upserts the same
items: nothing is ever duplicated. A journal (JSONL, one line per finished file) lets an interrupted
run skip what is already done. The journal is per served model: galleries are per model, so a file
ingested for one model is not "done" for the next one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tools.client import IMAGE_SUFFIXES, ApiError, AuthError, RiceClient

CSV_COLUMNS = ("path", "sku", "shop_id", "metadata")


class CatalogError(ValueError):
    """The catalog itself is unusable (a malformed CSV row): a user error, reported in one line."""


@dataclass(frozen=True)
class CatalogImage:
    path: Path
    sku: str
    shop_id: str | None
    item_id: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # returned with search results

    @property
    def label(self) -> str:
        return str(self.path)

    def data(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class IngestReport:
    total: int = 0
    ingested: int = 0
    skipped: int = 0  # already done by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "ingested": self.ingested,
            "skipped": self.skipped,
            "failed": len(self.failed),
            "failures": self.failed,
        }


def stable_item_id(sku: str, path: Path) -> str:
    return "img-" + hashlib.sha1(f"{sku}\x00{path.as_posix()}".encode()).hexdigest()[:20]


def read_catalog(source: Path, shop_id: str | None = None) -> list[CatalogImage]:
    """A folder (each sub-folder's name is the SKU of the images in it; an image directly in the folder
    is its own SKU, named by its file name stem: `cola-330ml.jpg` is SKU `cola-330ml`), one image
    (SKU = its stem), or a CSV with columns path,sku[,shop_id[,metadata]]: a header
    row naming them (any order) is optional; metadata is a JSON object (quoted as CSV needs, e.g.
    `"{""name"": ""Cola""}"`); relative paths are relative to the CSV's folder."""
    items: list[CatalogImage] = []
    if source.is_dir():
        for entry in sorted(source.iterdir()):
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:  # a flat folder: SKU = file name stem
                items.append(CatalogImage(entry, entry.stem, shop_id, stable_item_id(entry.stem, entry.relative_to(source))))
            elif entry.is_dir():
                for f in sorted(entry.rglob("*")):
                    if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                        items.append(CatalogImage(f, entry.name, shop_id, stable_item_id(entry.name, f.relative_to(source))))
        if not items:
            raise CatalogError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or in its sub-folders")
        return items
    if not source.is_file():
        raise CatalogError(f"{source}: no such catalog folder, image or CSV file")
    if source.suffix.lower() in IMAGE_SUFFIXES:  # one image: SKU = its file name stem
        return [CatalogImage(source, source.stem, shop_id, stable_item_id(source.stem, Path(source.name)))]
    try:
        return _read_csv(source, shop_id)
    except UnicodeDecodeError:
        raise CatalogError(f"{source}: not a catalog (a CSV is UTF-8 text; images end in {', '.join(sorted(IMAGE_SUFFIXES))})") from None


def _read_csv(source: Path, shop_id: str | None) -> list[CatalogImage]:
    items: list[CatalogImage] = []
    columns: tuple[str, ...] = CSV_COLUMNS
    with source.open(newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if not row or row[0].startswith("#"):
                continue
            if row[0].strip().lower() == "path":  # a header: its names give the column order
                columns = tuple(c.strip().lower() for c in row)
                unknown = set(columns) - set(CSV_COLUMNS)
                if unknown or "sku" not in columns:
                    raise CatalogError(f"{source}:{line}: header must name path, sku and optionally shop_id, metadata; got {row}")
                continue
            cell = {name: value.strip() for name, value in zip(columns, row, strict=False)}
            if not cell.get("path") or not cell.get("sku"):
                raise CatalogError(f"{source}:{line}: each row needs path,sku[,shop_id[,metadata]]: {row}")
            path = Path(cell["path"])
            full = path if path.is_absolute() else source.parent / path
            meta = _metadata(cell.get("metadata", ""), f"{source}:{line}")
            items.append(CatalogImage(full, cell["sku"], cell.get("shop_id") or shop_id, stable_item_id(cell["sku"], path), meta))
    return items


def _metadata(raw: str, where: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{where}: metadata is not valid JSON ({exc.msg}): {raw[:80]}") from None
    if not isinstance(value, dict):
        raise CatalogError(f"{where}: metadata must be a JSON object, got {raw[:80]}")
    return value


class Poster(Protocol):
    def __call__(self, image: CatalogImage, data: bytes) -> tuple[int, dict[str, Any]]: ...


def http_poster(client: Any) -> Poster:
    """POST /v1/gallery/items with an httpx-compatible client (a real URL or an in-process TestClient)."""

    def post(image: CatalogImage, data: bytes) -> tuple[int, dict[str, Any]]:
        form = {"sku": image.sku, "item_id": image.item_id}
        if image.shop_id:
            form["shop_id"] = image.shop_id
        if image.metadata:
            form["metadata"] = json.dumps(image.metadata)
        r = client.post("/v1/gallery/items", files={"image": (image.path.name, data, "application/octet-stream")}, data=form)
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text[:200]}}
        return r.status_code, body

    return post


def client_poster(client: RiceClient) -> Poster:
    """POST /v1/gallery/items through the `tools.client` client (retries 429/503 as the server asks).
    An AuthError propagates: a refused key would refuse every file, so the run stops."""

    def post(image: CatalogImage, data: bytes) -> tuple[int, dict[str, Any]]:
        try:
            client.add_item(data, image.sku, image.shop_id, image.item_id, image.metadata or None, filename=image.path.name)
        except AuthError:
            raise
        except ApiError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.detail}}
        return 201, {}

    return post


class Journal:
    """Append-only record of finished files; thread-safe; survives interruption line by line.

    With a `namespace` (the served model's version) only files finished for that model count as
    done, so the same journal never hides a new model's empty gallery."""

    def __init__(self, path: Path, namespace: str | None = None) -> None:
        self.path = path
        self.namespace = namespace
        self.done: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the interruption: that file is simply redone
                if rec.get("status") == "ok" and (namespace is None or rec.get("model") == namespace):
                    self.done.add(rec["item_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a")
        self._lock = threading.Lock()

    def record(self, item_id: str, status: str, detail: str = "") -> None:
        with self._lock:
            line = {"item_id": item_id, "status": status, "detail": detail}
            if self.namespace is not None:
                line["model"] = self.namespace
            self._fh.write(json.dumps(line) + "\n")
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def run_ingest(
    items: list[CatalogImage],
    post: Poster,
    journal: Journal,
    workers: int = 4,
    progress: Callable[[int], None] | None = None,
    fatal: tuple[type[Exception], ...] = (),
) -> IngestReport:
    """Post every item not yet done; a failure fails its file only, except `fatal` errors, which
    stop the run (queued files are dropped; the journal keeps what finished) and propagate."""
    report = IngestReport(total=len(items))
    todo = [it for it in items if it.item_id not in journal.done]
    report.skipped = len(items) - len(todo)

    def one(image: CatalogImage) -> tuple[CatalogImage, str | None]:
        try:
            data = image.path.read_bytes()
        except OSError as exc:
            return image, f"unreadable: {exc.strerror or exc}"
        try:
            status, body = post(image, data)
        except fatal:
            raise
        except Exception as exc:  # a timeout or dropped connection fails this file, not the run
            return image, f"request failed: {type(exc).__name__}: {exc}"
        if status == 201:
            return image, None
        err = body.get("error", {}) if isinstance(body, dict) else {}
        return image, f"HTTP {status}: {err.get('message', body)}"

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        futures = [pool.submit(one, it) for it in todo]
        for fut in as_completed(futures):
            image, error = fut.result()
            if error is None:
                report.ingested += 1
                journal.record(image.item_id, "ok")
            else:
                report.failed[str(image.path)] = error
                journal.record(image.item_id, "failed", error)
            if progress:
                progress(1)
    finally:
        # On Ctrl-C, drop queued uploads instead of finishing them: the journal resumes the rest.
        pool.shutdown(wait=True, cancel_futures=True)
    return report


@contextmanager
def ingest_client(url: str | None, api_key: str | None, in_process: bool) -> Iterator[Any]:
    """An httpx client for a running service, or an in-process app built from RICE_* settings."""
    headers = {"X-API-Key": api_key} if api_key else {}
    if in_process:
        from fastapi.testclient import TestClient

        from service.app import create_app

        with TestClient(create_app(), headers=headers) as c:
            yield c
        return
    import httpx

    with httpx.Client(base_url=url or "http://127.0.0.1:8000", headers=headers, timeout=120.0) as c:
        yield c
