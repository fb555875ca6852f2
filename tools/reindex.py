"""`rice reindex`: re-embed the gallery with a new checkpoint into that model's namespace, then
switch every replica to it (each swaps model and gallery together: no downtime, no answer that
mixes two models).

The gallery is the source of truth for what the catalog is: every live item of the serving model's
namespace (or, when that is empty, of the fullest other one) is re-embedded from its kept original
image (index/blobs.py), keeping its id, SKU, shop, metadata, thumbnail and any other field it
carries. An item kept without an original (added before originals were kept, or by a bulk import)
is embedded from its thumbnail, and counted as such. `--catalog` is an optional extra source: its
images (with ingest's item ids) are embedded too, replacing the gallery's copy of the same id, and
their originals are kept for next time. Counts are reported before the switch, and the replicas are
not switched when any gallery item could not be embedded (unless allowed).

Works on both stores: the embedded SQLite file (run it on the machine that holds RICE_GALLERY_PATH)
and Redis (with RICE_BLOB_DIR on a volume the replicas share). It also fixes the model-switch trap:
a server already serving the new model with an empty gallery gets that model's namespace filled,
and reloads it when asked to "switch" to itself. Catalog writes made while a reindex runs land only
in the old namespace: re-run the reindex (an idempotent upsert) to pick them up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from index.blobs import Blobs
from index.records import FeatureStore, Namespaces, Record, Store, Thumbnails
from index.views import is_view, view_ids
from model.checkpoint import load_encoder
from pipeline.catalog_views import catalog_views
from pipeline.decode import decode_catalog
from pipeline.engine import EncoderEngine
from pipeline.originals import original_jpeg
from pipeline.thumbnail import thumbnail_jpeg
from service.errors import ServiceError
from service.settings import Settings
from tools.client import RiceClient
from tools.ingest import CatalogError, CatalogImage


@dataclass
class ReindexReport:
    model_version: str = ""
    previous_model_version: str = ""
    source_namespace: str = ""  # the namespace whose items were re-embedded ("" = none had items)
    gallery_items: int = 0  # live items there
    from_originals: int = 0
    from_thumbnails: int = 0  # kept without an original: embedded from the small thumbnail
    from_catalog: int = 0  # images of --catalog (new items, or replacing the gallery's copy)
    embedded: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    missing: list[str] = field(default_factory=list)  # gallery items not in the new namespace
    switched: list[dict[str, Any]] = field(default_factory=list)
    not_switched: str = ""  # why the replicas were left on the old model
    seconds: float = 0.0

    def counts(self) -> str:
        """One line for the operator, printed before the switch."""
        return (
            f"{self.embedded} items embedded for {self.model_version}: {self.from_originals} from kept originals, "
            f"{self.from_thumbnails} from thumbnails (no original kept), {self.from_catalog} from --catalog; "
            f"the source namespace {self.source_namespace or '(none)'} has {self.gallery_items} items, "
            f"{len(self.missing)} of them missing; {len(self.failed)} failed"
        )


class GalleryImage:
    """Reads a gallery item's image when it is embedded (never the whole gallery's images at once):
    its kept original, else its thumbnail; `used` says which."""

    def __init__(self, store: Store, originals: Blobs | None, item_id: str) -> None:
        self.store, self.originals, self.item_id = store, originals, item_id
        self.used = ""  # "original" or "thumbnail" once read

    def __call__(self) -> bytes:
        data = self.originals.get(self.item_id) if self.originals is not None else None
        if data is not None:
            self.used = "original"
            return data
        data = self.store.thumbnail(self.item_id) if isinstance(self.store, Thumbnails) else None
        if data is None:
            raise FileNotFoundError(2, "no original image or thumbnail kept for this item")
        self.used = "thumbnail"
        return data


@dataclass(frozen=True)
class Source:
    """One image to embed: a gallery item's kept original (or thumbnail), or a catalog file."""

    item_id: str
    label: str  # for reports: the file, or "item <id>"
    read: Callable[[], bytes]
    record: Record | None = None  # the gallery's record, carried over with its new vector
    catalog: CatalogImage | None = None

    def data(self) -> bytes:
        return self.read()

    @property
    def from_thumbnail(self) -> bool:
        return isinstance(self.read, GalleryImage) and self.read.used == "thumbnail"


class Embeddable(Protocol):
    """What `embed_catalog` reads: an id, a label for reports, and the image bytes."""

    @property
    def item_id(self) -> str: ...

    @property
    def label(self) -> str: ...

    def data(self) -> bytes: ...


E = TypeVar("E", bound=Embeddable)


def embed_catalog(
    items: Sequence[E],
    engine: EncoderEngine,
    settings: Settings,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
    thumbnails: dict[str, bytes] | None = None,
    on_image: Callable[[E, bytes, bytes], None] | None = None,
    features: dict[str, bytes] | None = None,
    views: dict[str, np.ndarray] | None = None,
) -> tuple[list[tuple[E, np.ndarray]], dict[str, str]]:
    """Decode (letterboxed, as ingestion does) and embed every image; bad ones are reported.
    `thumbnails`, when given, receives each item's thumbnail, made from the same decoded frame;
    `features` each item's local features (`pipeline.local_features`, for verification), from the
    same decode; `views` each item's `settings.catalog_views` gallery-side view vectors [V, D]
    (`pipeline.catalog_views`, as ingestion makes them); `on_image(item, image bytes, thumbnail)` is
    called for each decoded image."""
    pre = engine.config.preprocess
    done: list[tuple[E, np.ndarray]] = []
    failed: dict[str, str] = {}
    for start in range(0, len(items), batch_size):
        chunk, frames = [], []
        for it in items[start : start + batch_size]:
            try:
                data = it.data()
                decoded = decode_catalog(data, pre, settings.max_frame_pixels)
                frames.append(decoded.frame)
                chunk.append(it)
                if features is not None:
                    features[it.item_id] = decoded.features.tobytes()
                if thumbnails is not None or on_image is not None:
                    thumb = thumbnail_jpeg(frames[-1])
                    if thumbnails is not None:
                        thumbnails[it.item_id] = thumb
                    if on_image is not None:
                        on_image(it, data, thumb)
            except (OSError, ServiceError) as exc:
                failed[it.label] = str(getattr(exc, "message", exc))
        if frames:
            emb = engine.encode(np.stack(frames))
            done.extend(zip(chunk, emb, strict=True))
            n = settings.catalog_views
            if views is not None and n > 0:
                v = engine.encode(np.concatenate([catalog_views(f, n) for f in frames]))
                v /= np.linalg.norm(v, axis=1, keepdims=True).clip(1e-12)
                views.update({it.item_id: v[i * n : (i + 1) * n] for i, it in enumerate(chunk)})
        if progress:
            progress(len(items[start : start + batch_size]))
    return done, failed


def new_record(source: Source, vector: np.ndarray) -> Record:
    """The item in the new namespace: the gallery's record (every field, shop and metadata included)
    with the new vector; a catalog image's SKU, shop and metadata over it."""
    vec = vector.astype(np.float32)
    old, cat = source.record, source.catalog
    if cat is None:
        assert old is not None
        return replace(old, vector=vec, version=0, deleted=False)
    if old is None:
        return Record(cat.item_id, cat.sku, cat.shop_id, vec, dict(cat.metadata))
    return replace(old, sku=cat.sku, shop_id=cat.shop_id or old.shop_id, metadata={**old.metadata, **cat.metadata}, vector=vec, version=0)


def write_namespace(store: Store, namespace: str, records: list[Record]) -> int:
    """Upsert into the new namespace in chunks; returns the last gallery version written."""
    version = 0
    for start in range(0, len(records), 256):
        version = store.upsert(namespace, records[start : start + 256])
    return version


def source_namespace(store: Store, serving: str, new: str) -> str:
    """The namespace to re-embed: the serving model's, unless it is the new one itself or unknown,
    then the fullest other one, else the new one's own (a re-run)."""
    if serving and serving != new:
        return serving
    if not isinstance(store, Namespaces):
        return new
    counts = store.namespace_counts()
    others = {ns: n for ns, n in counts.items() if ns != new and n > 0}
    return max(others, key=lambda ns: others[ns]) if others else new


def gallery_sources(store: Store, namespace: str, originals: Blobs | None) -> list[Source]:
    """Every live item of `namespace`; its image is read when embedded: its kept original, else its
    thumbnail (an item with neither fails to embed, and is reported missing)."""
    live: dict[str, Record] = {}
    for r in store.changes_since(namespace, 0):  # in version order: the last record of an id wins
        if is_view(r.item_id):  # an item's views are made again from its image, not embedded as items
            continue
        if r.deleted:
            live.pop(r.item_id, None)
        else:
            live[r.item_id] = r
    return [Source(item_id, f"item {item_id}", GalleryImage(store, originals, item_id), rec) for item_id, rec in live.items()]


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
    catalog: list[CatalogImage],
    store: Store,
    settings: Settings,
    urls: list[str],
    api_key: str | None,
    server_checkpoint: str | None = None,
    progress: Callable[[int], None] | None = None,
    originals: Blobs | None = None,
    on_counts: Callable[[ReindexReport], None] | None = None,
    allow_missing: bool = False,
    on_total: Callable[[int], None] | None = None,
) -> ReindexReport:
    """Re-embed the gallery (and `catalog`, if any) with `checkpoint` into its namespace, report the
    counts (`on_counts`), then switch `urls` unless a gallery item is missing and not `allow_missing`."""
    t = time.perf_counter()
    report = ReindexReport()
    engine = EncoderEngine(load_encoder(checkpoint), settings.device, settings.torch_threads, settings.dtype)
    report.model_version = engine.model_version
    if urls:
        with RiceClient(urls[0], api_key, timeout_s=30) as client:
            report.previous_model_version = client.info()["model_version"]
    report.source_namespace = source_namespace(store, report.previous_model_version, engine.model_version)
    from_gallery = gallery_sources(store, report.source_namespace, originals)
    report.gallery_items = len(from_gallery)
    by_id = {s.item_id: s for s in from_gallery}
    for c in catalog:  # the catalog's image replaces the gallery's copy of the same item
        by_id[c.item_id] = Source(c.item_id, str(c.path), c.path.read_bytes, by_id[c.item_id].record if c.item_id in by_id else None, c)
    sources = list(by_id.values())
    if not sources:
        raise CatalogError("nothing to reindex: the gallery has no items and no --catalog was given")
    if on_total is not None:
        on_total(len(sources))
    # before the items are written: an item any replica can find has its images
    features: dict[str, bytes] = {}
    keeper = _image_keeper(store, originals)
    views: dict[str, np.ndarray] = {}
    embedded, report.failed = embed_catalog(sources, engine, settings, progress=progress, on_image=keeper, features=features, views=views)
    if isinstance(store, FeatureStore):  # a catalog image's features; a gallery item's only when it had none (a bulk import)
        have = store.features([s.item_id for s, _ in embedded if s.catalog is None])
        for s, _ in embedded:
            if s.catalog is not None or s.item_id not in have:
                store.put_features(s.item_id, features[s.item_id])
    report.embedded = len(embedded)
    report.from_catalog = sum(s.catalog is not None for s, _ in embedded)
    report.from_thumbnails = sum(s.from_thumbnail for s, _ in embedded)
    report.from_originals = report.embedded - report.from_catalog - report.from_thumbnails
    done = {s.item_id for s, _ in embedded}
    report.missing = sorted(s.item_id for s in from_gallery if s.item_id not in done)
    if embedded:
        records = [new_record(s, v) for s, v in embedded]
        records += [
            replace(r, item_id=vid, vector=vec.astype(np.float32))
            for r in records[: len(embedded)]
            for vid, vec in zip(view_ids(r.item_id, len(views.get(r.item_id, ()))), views.get(r.item_id, ()), strict=True)
        ]
        write_namespace(store, engine.model_version, records)
    if on_counts is not None:
        on_counts(report)
    if urls and report.missing and not allow_missing:
        report.not_switched = f"{len(report.missing)} gallery items could not be embedded (see failed); --allow-missing switches anyway"
    elif urls:
        target = server_checkpoint or (str(Path(checkpoint).resolve()) if checkpoint else None)
        report.switched = switch_replicas(urls, target, api_key, len(embedded))
    report.seconds = round(time.perf_counter() - t, 1)
    return report


def _image_keeper(store: Store, originals: Blobs | None) -> Callable[[Source, bytes, bytes], None]:
    """What each embedded image leaves behind: a catalog image its thumbnail and original; a gallery
    item that had no thumbnail (a bulk import's) the one made from its original."""

    def keep(s: Source, data: bytes, thumbnail: bytes) -> None:
        if s.catalog is not None:
            if originals is not None and (jpeg := original_jpeg(data)) is not None:
                originals.put(s.item_id, jpeg)
            if isinstance(store, Thumbnails):
                store.put_thumbnail(s.item_id, thumbnail)
        elif isinstance(store, Thumbnails) and not s.from_thumbnail and store.thumbnail(s.item_id) is None:
            store.put_thumbnail(s.item_id, thumbnail)

    return keep
