"""Feedback on answers, and gallery enrichment from confirmed (or corrected) answers.

`FeedbackKeeper.remember` keeps a record of each answered request in the feedback store
(`index.feedback`), on a thread and without ever failing the answer: a failed write is logged and
counted. `FeedbackKeeper.judge` takes a verdict on any request any replica answered, and under the
enrichment policy turns the request's clip vector into a gallery view of the right SKU:

- `off`: verdicts are kept (for `rice retrain`), the gallery is untouched;
- `confirmed`: a `correct` verdict adds the clip vector as a view of the answered top-1 SKU;
- `corrected`: also a `wrong` verdict that names the right SKU adds a view of that SKU.

A view is a gallery item with `source: feedback`, item id `fb-<request_id>` (so a second verdict on
the request replaces or removes the same view), no thumbnail (it is never shown as a catalog
image), and at most `max_views` per SKU and shop: the oldest go first. Search already scores a SKU
by its best item, so the views act as extra images of the product.

On a shop-sharded deployment the replica routes the view's writes to the shop's shard (any replica
takes any verdict: request records are not sharded). Only a replica of that shard holds the shop's
gallery, so elsewhere the SKU is not checked (`unknown_sku`), the view is the clip vector, and the
cap is applied by the next verdict on that SKU that a replica of the shop's shard takes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from index.errors import BadRequest, ItemNotFound, NotFound, RequestNotFound, ServiceError
from index.feedback import Feedback, FeedbackStore, RequestRecord
from index.records import ID_PATTERN, ID_RULE
from index.replica import GalleryReplica
from pipeline.stages import Recognition

log = logging.getLogger("rice.feedback")

EnrichPolicy = Literal["off", "confirmed", "corrected"]
ViewChoice = Literal["clip", "closest"]
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # what new_request_id makes
VIEW_PREFIX = "fb-"


class UnknownSku(ServiceError):
    """A feedback SKU that this model's gallery does not hold (422: not a product of the shop)."""

    code = "unknown_sku"


@dataclass(frozen=True)
class FeedbackConfig:
    record_ttl_s: float = 24 * 3600.0  # how long an answered request can still take feedback
    retention_s: float = 30 * 86400.0  # how long a verdict (and its vectors) is kept
    keep_frames: bool = False  # also keep the sampled frames as JPEG (privacy: off by default)
    enrich: EnrichPolicy = "off"
    max_views: int = 10  # feedback views per SKU and shop; the oldest go first
    # Which vector becomes the view: the whole clip's, or of the clip and its region crops (when the
    # region stage ran) the one closest to the SKU's catalog images: the product, not the scene.
    view: ViewChoice = "closest"  # measured better than "clip" at K = 3 and 10 (docs/RESULTS.md)
    # How long an answer waits for its record to be written: normally a millisecond, after which
    # feedback works on every replica at once; a slow store never holds an answer longer than this
    # (the write then finishes in the background).
    record_wait_s: float = 0.25


@dataclass(frozen=True)
class Judged:
    feedback: Feedback
    replaced: str | None  # the verdict this one replaced
    view_item_id: str | None  # the gallery view this verdict added (or kept), if any
    removed: list[str]  # views removed: this request's old one, or the oldest past the cap
    gallery_version: int | None  # the version after the enrichment write, when there was one


def new_request_id() -> str:
    return uuid.uuid4().hex


def _jpegs(frames: np.ndarray | None, quality: int = 85) -> list[bytes]:
    if frames is None:
        return []
    import cv2  # only when frames are kept

    out = []
    for f in frames:  # [H, W, 3] RGB uint8
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(f[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out.append(buf.tobytes())
    return out


class FeedbackKeeper:
    """Request records at answer time, verdicts later, and the enrichment policy."""

    def __init__(
        self,
        store: FeedbackStore,
        config: FeedbackConfig,
        on_record_error: Callable[[], object] = lambda: None,
        on_verdict: Callable[[str | None, str], object] = lambda shop, verdict: None,
        on_view: Callable[[str], object] = lambda what: None,
    ) -> None:
        self.store, self.config = store, config
        self.on_record_error, self.on_verdict, self.on_view = on_record_error, on_verdict, on_view
        self._pending: set[asyncio.Task[None]] = set()  # strong references: a bare task may be collected mid-write

    # -- at answer time -------------------------------------------------------------------------

    async def remember(self, request_id: str, kind: str, model_version: str, shop_id: str | None, r: Recognition) -> None:
        """Keep the record of an answer, on a thread; waits at most `record_wait_s` for it."""
        answer: list[dict[str, object]] = [{"sku": h.sku, "score": round(h.score, 6), "item_id": h.item_id} for h in r.hits]
        await self.remember_answer(request_id, kind, model_version, shop_id, answer, r.vector, r.frame_emb, r.frames, r.regions)

    async def remember_answer(
        self,
        request_id: str,
        kind: str,
        model_version: str,
        shop_id: str | None,
        answer: list[dict[str, object]],
        vector: np.ndarray | None = None,
        frame_emb: np.ndarray | None = None,
        frames: np.ndarray | None = None,
        regions: np.ndarray | None = None,
    ) -> None:
        frames = frames if self.config.keep_frames else None
        task = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._write, request_id, kind, model_version, shop_id, answer, vector, frame_emb, frames, regions)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.wait({task}, timeout=self.config.record_wait_s)  # the task goes on after a timeout

    def _write(
        self,
        request_id: str,
        kind: str,
        model_version: str,
        shop_id: str | None,
        answer: list[dict[str, object]],
        vector: np.ndarray | None,
        frame_emb: np.ndarray | None,
        frames: np.ndarray | None,
        regions: np.ndarray | None,
    ) -> None:
        try:
            now = time.time()
            record = RequestRecord(request_id, kind, model_version, shop_id, now, answer, vector, frame_emb, _jpegs(frames), regions)
            self.store.put_request(record, self.config.record_ttl_s)
        except Exception:  # never the answer's problem: the request just cannot take feedback
            log.warning("could not keep the record of request %s for feedback", request_id, exc_info=True)
            self.on_record_error()

    async def flush(self) -> None:
        """Wait for the records being written (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # -- feedback -------------------------------------------------------------------------------

    def _right_sku(self, record: RequestRecord, verdict: str, sku: str | None) -> str | None:
        """The SKU the verdict says is shown (None for none_of_these / an uncorrected wrong); 400 on a contradiction."""
        if sku is not None and not ID_PATTERN.match(sku):
            raise BadRequest(f"sku must be {ID_RULE}")
        if verdict == "correct":
            if record.top1 is None:
                raise BadRequest("the answer had no results: there is no top-1 to confirm (say wrong with the sku, or none_of_these)")
            if sku is not None and sku != record.top1:
                raise BadRequest(f"correct confirms the answer's top-1 ({record.top1}); to name another SKU, send verdict wrong with it")
            return record.top1
        if verdict == "none_of_these":
            if sku is not None:
                raise BadRequest("none_of_these means the product is not in the gallery: send sku null")
            return None
        if sku is not None and sku == record.top1:
            raise BadRequest(f"wrong with the answer's own top-1 ({sku}): send verdict correct instead")
        return sku

    async def judge(self, request_id: str, verdict: str, sku: str | None, replica: GalleryReplica) -> Judged:
        """Record a verdict (replacing an earlier one) and apply the enrichment policy. 404 for an
        unknown or expired request, 400 for a verdict that contradicts the answer, 422 for a SKU
        this model's gallery does not hold."""
        now = time.time()
        try:  # a request takes verdicts while its record lives (RICE_FEEDBACK_RECORD_TTL_S); the verdicts stay longer
            record = await asyncio.to_thread(self.store.get_request, request_id, now)
        except RequestNotFound as exc:
            raise NotFound(str(exc)) from exc
        right = self._right_sku(record, verdict, sku)
        here = replica.holds(record.shop_id)  # sharded: only the shop's shard's replicas hold its gallery
        if right is not None and verdict == "wrong" and record.model_version == replica.namespace and here:
            known = await asyncio.to_thread(replica.gallery.views, right, "catalog", record.shop_id, record.shop_id is None)
            if not known and not await asyncio.to_thread(replica.gallery.views, right, "feedback", record.shop_id, record.shop_id is None):
                raise UnknownSku(f"sku {right!r} is not in the gallery" + (f" of shop {record.shop_id!r}" if record.shop_id else ""))
        fb = Feedback(request_id, verdict, right, now, record)
        old = await asyncio.to_thread(self.store.put_feedback, fb, self.config.retention_s)
        self.on_verdict(record.shop_id, verdict)
        view, removed, version = await self._enrich(fb, replica)
        return Judged(fb, old.verdict if old else None, view, removed, version)

    def _enriches(self, fb: Feedback) -> bool:
        policy = self.config.enrich
        if fb.sku is None or fb.record.vector is None or policy == "off":
            return False
        return fb.verdict == "correct" or (policy == "corrected" and fb.verdict == "wrong")

    async def _enrich(self, fb: Feedback, replica: GalleryReplica) -> tuple[str | None, list[str], int | None]:
        """Add, move or remove this request's view; trim the SKU's views to the cap."""
        view_id = VIEW_PREFIX + fb.request_id
        removed: list[str] = []
        version: int | None = None
        if fb.record.model_version != replica.namespace:  # another model's vector: never searched with this one
            return None, removed, None
        shop = fb.record.shop_id
        if not self._enriches(fb):
            if view_id in replica.gallery or not replica.holds(shop):  # another shard's view: ask its store
                try:
                    version, removed = await replica.delete_item(view_id, shop)
                    self.on_view("removed")
                except ItemNotFound:
                    pass  # another replica removed it meanwhile
            return None, removed, version
        assert fb.sku is not None and fb.record.vector is not None
        vector, which = fb.record.vector, "clip"
        if self.config.view == "closest" and fb.record.regions is not None:
            candidates = np.vstack([fb.record.vector[None], fb.record.regions])  # [1 + R, D]
            pick = await asyncio.to_thread(replica.gallery.closest, candidates, fb.sku, fb.record.shop_id)
            if pick is not None and pick[0] > 0:
                vector, which = candidates[pick[0]], f"region{pick[0] - 1}"
        metadata = {"request_id": fb.request_id, "added_at": fb.at, "verdict": fb.verdict, "view": which}
        _, version = await replica.add(vector, fb.sku, fb.record.shop_id, view_id, metadata, source="feedback")
        self.on_view("added")
        views = await asyncio.to_thread(replica.gallery.views, fb.sku, "feedback", fb.record.shop_id)
        views.sort(key=lambda h: (float(h.metadata.get("added_at", 0.0)), h.item_id))
        for old in views[: max(0, len(views) - self.config.max_views)]:  # oldest out
            try:
                version, ids = await replica.delete_item(old.item_id, shop)
                removed += ids
                self.on_view("evicted")
            except ItemNotFound:
                pass
        return view_id, removed, version
