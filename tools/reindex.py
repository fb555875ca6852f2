"""`rice reindex`: re-embed a catalog with a new checkpoint into that model's gallery namespace,
then switch every replica to it (each swaps model and gallery together: no downtime, no answer
that mixes two models).

Item ids are the ones `rice ingest` gives (derived from SKU + path), and metadata is carried
over from the items the served model already has, so the new namespace mirrors the old one.
Catalog writes made while a reindex runs land only in the old namespace: re-run the reindex
(it is an idempotent upsert) before or after switching to pick them up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from index.records import Record, Store
from model.checkpoint import load_encoder
from pipeline.decode import decode_image
from pipeline.engine import EncoderEngine
from service.errors import ServiceError
from service.settings import Settings
from tools.ingest import CatalogImage


@dataclass
class ReindexReport:
    model_version: str = ""
    previous_model_version: str = ""
    embedded: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    switched: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def embed_catalog(
    items: list[CatalogImage],
    engine: EncoderEngine,
    settings: Settings,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[tuple[CatalogImage, np.ndarray]], dict[str, str]]:
    """Decode (letterboxed, as ingestion does) and embed every catalog image; bad files are reported."""
    pre = engine.config.preprocess
    done: list[tuple[CatalogImage, np.ndarray]] = []
    failed: dict[str, str] = {}
    for start in range(0, len(items), batch_size):
        chunk, frames = [], []
        for it in items[start : start + batch_size]:
            try:
                frames.append(decode_image(it.path.read_bytes(), pre, settings.max_frame_pixels, whole=True))
                chunk.append(it)
            except (OSError, ServiceError) as exc:
                failed[str(it.path)] = str(getattr(exc, "message", exc))
        if frames:
            emb = engine.encode(np.stack(frames))
            done.extend(zip(chunk, emb, strict=True))
        if progress:
            progress(len(items[start : start + batch_size]))
    return done, failed


def write_namespace(store: Store, namespace: str, embedded: list[tuple[CatalogImage, np.ndarray]], old: dict[str, Record]) -> int:
    """Upsert into the new namespace in chunks; returns the last gallery version written."""
    version = 0
    records = [
        Record(it.item_id, it.sku, it.shop_id, vec.astype(np.float32), dict(old[it.item_id].metadata) if it.item_id in old else {})
        for it, vec in embedded
    ]
    for start in range(0, len(records), 256):
        version = store.upsert(namespace, records[start : start + 256])
    return version


def switch_replicas(urls: list[str], checkpoint: str | None, api_key: str | None, min_items: int) -> list[dict[str, Any]]:
    """Ask each replica in turn to swap to the new model (each keeps serving while it loads)."""
    headers = {"X-API-Key": api_key} if api_key else {}
    out = []
    for url in urls:
        body_in = {"checkpoint": checkpoint, "min_gallery_items": min_items}
        r = httpx.post(f"{url}/v1/admin/model", json=body_in, headers=headers, timeout=600)
        body = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"{url}: model switch failed: HTTP {r.status_code} {body.get('error', body)}")
        out.append({"url": url, **body})
    return out


def run_reindex(
    checkpoint: str | None,
    items: list[CatalogImage],
    store: Store,
    settings: Settings,
    urls: list[str],
    api_key: str | None,
    server_checkpoint: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReindexReport:
    t = time.perf_counter()
    report = ReindexReport()
    engine = EncoderEngine(load_encoder(checkpoint), settings.device, settings.torch_threads, settings.dtype)
    report.model_version = engine.model_version
    if urls:
        info = httpx.get(f"{urls[0]}/v1/info", headers={"X-API-Key": api_key} if api_key else {}, timeout=30).json()
        report.previous_model_version = info["model_version"]
    old: dict[str, Record] = {}
    if report.previous_model_version:
        old = {r.item_id: r for r in store.changes_since(report.previous_model_version, 0) if not r.deleted}
    embedded, report.failed = embed_catalog(items, engine, settings, progress=progress)
    report.embedded = len(embedded)
    if embedded:
        write_namespace(store, engine.model_version, embedded, old)
    if urls:
        target = server_checkpoint or (str(Path(checkpoint).resolve()) if checkpoint else None)
        report.switched = switch_replicas(urls, target, api_key, len(embedded))
    report.seconds = round(time.perf_counter() - t, 1)
    return report
