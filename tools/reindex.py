"""`rice reindex`: re-embed a catalog with a new checkpoint into that model's gallery namespace,
then switch every replica to it (each swaps model and gallery together: no downtime, no answer
that mixes two models).

Item ids are the ones `rice ingest` gives (derived from SKU + path), and metadata is carried
over from the items the served model already has (or, when the served model's gallery is empty,
from the fullest other namespace), so the new namespace mirrors the old one; a CSV catalog's own
metadata column wins. Thumbnails and local features (for verification, from the full-resolution
image) are written for every item too, so items bulk-imported without them gain them here.

Works on both stores: the embedded SQLite file (run it on the machine that holds RICE_GALLERY_PATH)
and Redis. It also fixes the model-switch trap: a server already serving the new model with an
empty gallery gets that model's namespace filled, and reloads it when asked to "switch" to itself.
Catalog writes made while a reindex runs land only in the old namespace: re-run the reindex
(it is an idempotent upsert) before or after switching to pick them up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index.records import FeatureStore, Namespaces, Record, Store, Thumbnails
from model.checkpoint import load_encoder
from pipeline.decode import decode_catalog
from pipeline.engine import EncoderEngine
from pipeline.thumbnail import thumbnail_jpeg
from service.errors import ServiceError
from service.settings import Settings
from tools.client import RiceClient
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
    thumbnails: dict[str, bytes] | None = None,
    features: dict[str, bytes] | None = None,
) -> tuple[list[tuple[CatalogImage, np.ndarray]], dict[str, str]]:
    """Decode (letterboxed, as ingestion does) and embed every catalog image; bad files are reported.
    `thumbnails`, when given, receives each item's thumbnail, made from the same decoded frame;
    `features` each item's local features (`pipeline.local_features`), from the same decode."""
    pre = engine.config.preprocess
    done: list[tuple[CatalogImage, np.ndarray]] = []
    failed: dict[str, str] = {}
    for start in range(0, len(items), batch_size):
        chunk, frames = [], []
        for it in items[start : start + batch_size]:
            try:
                decoded = decode_catalog(it.path.read_bytes(), pre, settings.max_frame_pixels)
                frames.append(decoded.frame)
                chunk.append(it)
                if features is not None:
                    features[it.item_id] = decoded.features.tobytes()
                if thumbnails is not None:
                    thumbnails[it.item_id] = thumbnail_jpeg(frames[-1])
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
    records = [Record(it.item_id, it.sku, it.shop_id, vec.astype(np.float32), _metadata(it, old.get(it.item_id))) for it, vec in embedded]
    for start in range(0, len(records), 256):
        version = store.upsert(namespace, records[start : start + 256])
    return version


def _metadata(item: CatalogImage, old: Record | None) -> dict[str, Any]:
    """The catalog's own metadata (a CSV column) over what the item carried before."""
    return {**(old.metadata if old is not None else {}), **item.metadata}


def source_namespace(store: Store, serving: str, new: str) -> str:
    """The namespace whose items' metadata the new one inherits: the serving model's, unless it is
    the new one itself or empty (the model-switch trap), then the fullest other one."""
    if serving and serving != new:
        return serving
    if not isinstance(store, Namespaces):
        return ""
    others = {ns: n for ns, n in store.namespace_counts().items() if ns != new and n > 0}
    return max(others, key=lambda ns: others[ns]) if others else ""


def switch_replicas(urls: list[str], checkpoint: str | None, api_key: str | None, min_items: int) -> list[dict[str, Any]]:
    """Ask each replica in turn to swap to the new model (each keeps serving while it loads). A
    replica already serving it reloads its gallery from the store instead."""
    out = []
    for url in urls:
        with RiceClient(url, api_key, timeout_s=600) as client:
            out.append({"url": url, **client.switch_model(checkpoint, min_items)})
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
        with RiceClient(urls[0], api_key, timeout_s=30) as client:
            report.previous_model_version = client.info()["model_version"]
    old: dict[str, Record] = {}
    source = source_namespace(store, report.previous_model_version, engine.model_version)
    if source:
        old = {r.item_id: r for r in store.changes_since(source, 0) if not r.deleted}
    thumbnails: dict[str, bytes] = {}
    features: dict[str, bytes] = {}
    embedded, report.failed = embed_catalog(items, engine, settings, progress=progress, thumbnails=thumbnails, features=features)
    report.embedded = len(embedded)
    if isinstance(store, Thumbnails):  # before the items: an item any replica can find has its thumbnail
        for item_id, jpeg in thumbnails.items():
            store.put_thumbnail(item_id, jpeg)
    if isinstance(store, FeatureStore):
        for item_id, data in features.items():
            store.put_features(item_id, data)
    if embedded:
        write_namespace(store, engine.model_version, embedded, old)
    if urls:
        target = server_checkpoint or (str(Path(checkpoint).resolve()) if checkpoint else None)
        report.switched = switch_replicas(urls, target, api_key, len(embedded))
    report.seconds = round(time.perf_counter() - t, 1)
    return report
