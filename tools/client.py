"""A Python client for the RICE service: sync (`RiceClient`) and async (`AsyncRiceClient`), typed
results, an API key, and retries that honour the server's Retry-After on 429 and 503.

    from tools.client import RiceClient

    with RiceClient("http://127.0.0.1:8000", api_key="ops-key-1234") as rice:
        rice.add_item("catalog/cola.jpg", sku="SKU-1", shop_id="shop-1", metadata={"name": "Cola"})
        answer = rice.recognize("clips/seller.mp4", top_k=3, shop_id="shop-1")  # stills go to /v1/recognize/image
        print(answer.match, answer.match_probability, answer.top.sku if answer.top else None)
        rice.feedback(answer.request_id, "correct")  # or "wrong" (sku="the right one"), "none_of_these"

Errors are one exception family, each with the exit status the `rice` CLI uses for it:
`ServiceUnreachable` (3), `AuthError` (401/403: 4), `RequestRejected` (other 4xx: 5),
`ServerError` (5xx, or 429/503 still after the retries: 6).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from model.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES  # constants only: no torch behind this import

DEFAULT_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"II*\x00", b"MM\x00*")

# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    frame: int  # index of the frame (among the frames used) where the product was found
    polygon: list[list[float]]  # the catalog image's corners [[x, y] x 4] in that frame's pixels


@dataclass(frozen=True)
class Match:
    """One result of an answer: every field of the service's result (None where it sent none)."""

    sku: str
    score: float  # the ranking score: embedding_score plus a bonus for geometric verification
    item_id: str
    shop_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding_score: float | None = None
    inliers: int | None = None
    coverage: float | None = None
    frames_verified: int | None = None
    verifiable: bool | None = None
    box: Box | None = None  # where the product is, for a verified SKU
    source: str = "catalog"  # catalog (an image) or feedback (a confirmed answer's view)


@dataclass(frozen=True)
class Recognition:
    """A recognition answer: every field of the service's answer."""

    results: list[Match]
    match: bool  # the top result is the product shown (the verdict, else the score threshold); False means "none of these"
    match_threshold: float  # the top-1 score threshold; it decides `match` only when no verdict ran or min_score was given
    gallery_version: int
    model_version: str
    frames_used: int
    timings_ms: dict[str, float]
    request_id: str  # send `feedback(request_id, ...)` with it
    match_probability: float | None = None  # the verdict's probability that the top result is right (None: no verdict ran)

    @property
    def top(self) -> Match | None:
        return self.results[0] if self.results else None


@dataclass(frozen=True)
class ItemAdded:
    item_id: str
    sku: str
    shop_id: str | None
    gallery_version: int
    model_version: str
    shard: int = 0  # the shard whose gallery the write went to (0 unsharded)


@dataclass(frozen=True)
class Deleted:
    deleted: list[str]
    gallery_version: int
    shard: int = 0


@dataclass(frozen=True)
class GalleryItem:
    item_id: str
    sku: str
    shop_id: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "catalog"  # catalog (an ingested image) or feedback (a confirmed answer's view, no thumbnail)


@dataclass(frozen=True)
class GalleryPage:
    total: int
    offset: int
    limit: int
    items: list[GalleryItem]
    gallery_version: int
    namespace: str


@dataclass(frozen=True)
class FeedbackRecorded:
    """The answer to `feedback`: the verdict as kept, and what it changed in the gallery."""

    request_id: str
    verdict: str
    sku: str | None  # the SKU the verdict says was shown (None: none, or not said)
    replaced: str | None  # the earlier verdict on this request that this one replaced
    view_item_id: str | None  # the gallery view this verdict added (RICE_ENRICH)
    removed: list[str]  # feedback views removed
    gallery_version: int | None  # the gallery version after the enrichment write, when there was one


VERDICTS = ("correct", "wrong", "none_of_these")


def _opt(value: Any, kind: Callable[[Any], T]) -> T | None:
    return None if value is None else kind(value)


def _match(r: Any) -> Match:
    box = r.get("box")
    return Match(
        sku=r["sku"],
        score=float(r["score"]),
        item_id=r["item_id"],
        shop_id=r.get("shop_id"),
        metadata=r.get("metadata") or {},
        embedding_score=_opt(r.get("embedding_score"), float),
        inliers=_opt(r.get("inliers"), int),
        coverage=_opt(r.get("coverage"), float),
        frames_verified=_opt(r.get("frames_verified"), int),
        verifiable=_opt(r.get("verifiable"), bool),
        box=None if box is None else Box(int(box["frame"]), [[float(x) for x in point] for point in box["polygon"]]),
        source=str(r.get("source", "catalog")),
    )


def _recognition(body: Any) -> Recognition:
    return Recognition(
        results=[_match(r) for r in body["results"]],
        match=bool(body["match"]),
        match_threshold=float(body["match_threshold"]),
        gallery_version=int(body["gallery_version"]),
        model_version=str(body["model_version"]),
        frames_used=int(body["frames_used"]),
        timings_ms={k: float(v) for k, v in body["timings_ms"].items()},
        request_id=str(body["request_id"]),
        match_probability=_opt(body.get("match_probability"), float),
    )


def _page(body: Any) -> GalleryPage:
    def item(i: Any) -> GalleryItem:
        return GalleryItem(i["item_id"], i["sku"], i.get("shop_id"), i.get("metadata") or {}, str(i.get("source", "catalog")))

    items = [item(i) for i in body["items"]]
    return GalleryPage(int(body["total"]), int(body["offset"]), int(body["limit"]), items, int(body["gallery_version"]), body["namespace"])


def _feedback(body: Any) -> FeedbackRecorded:
    return FeedbackRecorded(
        request_id=str(body["request_id"]),
        verdict=str(body["verdict"]),
        sku=body.get("sku"),
        replaced=body.get("replaced"),
        view_item_id=body.get("view_item_id"),
        removed=list(body.get("removed") or []),
        gallery_version=_opt(body.get("gallery_version"), int),
    )


# -- errors --------------------------------------------------------------------------------------


class RiceError(Exception):
    """Anything the client could not get done; `exit_code` is what the `rice` CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadUrl(RiceError):
    """The --url is not a service's base URL (no http(s) scheme or host, or an API path like /v1)."""

    exit_code = 2


def check_url(url: str) -> str:
    """`url` as a service base URL (no trailing slash), or BadUrl saying what to give instead."""
    parts = urllib.parse.urlsplit(url.strip())
    example = "e.g. http://127.0.0.1:8000"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BadUrl(f"--url {url!r} is not an http(s) URL with a host ({example})")
    segments = [p for p in parts.path.split("/") if p]
    if "v1" in segments:  # an API path: the client adds /v1/... itself, so the answers would all be 404
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/".join(segments[: segments.index("v1")]), "", ""))
        raise BadUrl(f"--url {url!r} names an API path; give the service's base URL ({base})")
    if parts.query or parts.fragment:
        raise BadUrl(f"--url {url!r} has a query or fragment; give the service's base URL ({example})")
    return url.strip().rstrip("/")


class ServiceUnreachable(RiceError):
    """No connection (refused, unknown host, timed out connecting)."""

    exit_code = 3


class ApiError(RiceError):
    """The service answered with an error: its status and the body's {"error": {code, message}}."""

    exit_code = 5

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.detail, self.retry_after = status, code, message, retry_after


class AuthError(ApiError):
    """401 (no or unknown API key) or 403 (a key without the right)."""

    exit_code = 4


class RequestRejected(ApiError):
    """Any other 4xx: the request or its upload is wrong, or the item does not exist."""

    exit_code = 5


class ServerError(ApiError):
    """A 5xx, or 429/503 still after the retries (the service is overloaded or not ready)."""

    exit_code = 6


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither form: as if absent
        return None
    return max(0.0, when.timestamp() - time.time())


def api_error(response: httpx.Response) -> ApiError:
    """The typed error for a non-2xx answer."""
    try:
        body = response.json()
        err = body.get("error", {}) if isinstance(body, dict) else {}
        code, message = str(err.get("code", "error")), str(err.get("message", body))
    except ValueError:
        code, message = "error", response.text[:200] or response.reason_phrase
    status = response.status_code
    if status == 404 and message == "Not Found":  # no such route (not an unknown item): a wrong base URL
        message += f" ({response.request.url.path}: is --url the service's base URL, e.g. http://127.0.0.1:8000?)"
    cls = AuthError if status in (401, 403) else ServerError if status >= 500 or status == 429 else RequestRejected
    return cls(status, code, message, _retry_after(response.headers.get("retry-after")))


# -- media -----------------------------------------------------------------------------------------


def is_still(name: str, head: bytes) -> bool:
    """A still image (not a clip), by the name's suffix, else by the first bytes."""
    suffix = Path(name).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix in VIDEO_SUFFIXES:
        return False
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def content_item_id(sku: str, shop_id: str | None, data: bytes) -> str:
    """The item id `add_item` gives an image without one: from its SKU, shop and bytes, so adding the
    same image again replaces the item instead of duplicating it."""
    return "img-" + hashlib.sha1(f"{sku}\x00{shop_id or ''}\x00".encode() + data).hexdigest()[:20]


def _media(media: bytes | str | Path, filename: str | None) -> tuple[str, bytes]:
    if isinstance(media, bytes | bytearray):
        return filename or "upload", bytes(media)
    path = Path(media)
    return filename or path.name, path.read_bytes()


# -- calls -----------------------------------------------------------------------------------------


@dataclass
class Call(Generic[T]):
    """One API call: the request to send (again, on a retry) and how to read a 2xx answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes, str]] | None = None
    data: dict[str, str] | None = None
    json: Any = None

    def request_kwargs(self) -> dict[str, Any]:
        """The httpx request arguments (built afresh for every attempt)."""
        kwargs: dict[str, Any] = {"params": {k: v for k, v in self.params.items() if v is not None}}
        if self.files is not None:
            kwargs["files"] = self.files
        if self.data is not None:
            kwargs["data"] = self.data
        if self.json is not None:
            kwargs["json"] = self.json
        return kwargs


def _json(r: httpx.Response) -> Any:
    return r.json()


class _Calls:
    """The API as `Call`s, shared by the sync and the async client."""

    @staticmethod
    def recognize(
        media: bytes | str | Path,
        top_k: int,
        shop_id: str | None,
        num_frames: int,
        min_score: float | None,
        min_gallery_version: int,
        image: bool | None,
        filename: str | None,
    ) -> Call[Recognition]:
        name, data = _media(media, filename)
        still = is_still(name, data[:16]) if image is None else image
        params: dict[str, Any] = {"top_k": top_k, "shop_id": shop_id, "min_score": min_score}
        if min_gallery_version:
            params["min_gallery_version"] = min_gallery_version
        if not still:
            params["num_frames"] = num_frames
        path = "/v1/recognize/image" if still else "/v1/recognize"
        return Call("POST", path, lambda r: _recognition(r.json()), params, files={"file": (name, data, "application/octet-stream")})

    @staticmethod
    def add_item(
        image: bytes | str | Path, sku: str, shop_id: str | None, item_id: str | None, metadata: dict[str, Any] | None, filename: str | None
    ) -> Call[ItemAdded]:
        name, data = _media(image, filename)
        form = {"sku": sku, "item_id": item_id or content_item_id(sku, shop_id, data)}
        if shop_id:
            form["shop_id"] = shop_id
        if metadata:
            form["metadata"] = json.dumps(metadata)

        def parse(r: httpx.Response) -> ItemAdded:
            b = r.json()
            shard = int(b.get("shard", 0))
            return ItemAdded(b["item_id"], b["sku"], b.get("shop_id"), int(b["gallery_version"]), b["model_version"], shard)

        return Call("POST", "/v1/gallery/items", parse, files={"image": (name, data, "application/octet-stream")}, data=form)

    @staticmethod
    def deleted(path: str, params: dict[str, Any] | None = None) -> Call[Deleted]:
        def parse(r: httpx.Response) -> Deleted:
            body = r.json()
            return Deleted(list(body["deleted"]), int(body["gallery_version"]), int(body.get("shard", 0)))

        return Call("DELETE", path, parse, params or {})

    @staticmethod
    def list_items(sku: str | None, shop_id: str | None, offset: int, limit: int) -> Call[GalleryPage]:
        params = {"sku": sku, "shop_id": shop_id, "offset": offset, "limit": limit}
        return Call("GET", "/v1/gallery/items", lambda r: _page(r.json()), params)

    @staticmethod
    def thumbnail(item_id: str, shop_id: str | None = None) -> Call[bytes]:
        return Call("GET", f"/v1/gallery/items/{_quote(item_id)}/thumbnail", lambda r: r.content, {"shop_id": shop_id})

    @staticmethod
    def feedback(request_id: str, verdict: str, sku: str | None, shop_id: str | None) -> Call[FeedbackRecorded]:
        if verdict not in VERDICTS:  # caught here: a typo would otherwise be a 422 after a round trip
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        # shop_id is only for routing: a proxy in front of a sharded deployment hashes it (the service finds the request by id)
        body = {"request_id": request_id, "verdict": verdict, "sku": sku}
        return Call("POST", "/v1/feedback", lambda r: _feedback(r.json()), {"shop_id": shop_id}, json=body)

    @staticmethod
    def switch_model(checkpoint: str | None, min_gallery_items: int) -> Call[dict[str, Any]]:
        return Call("POST", "/v1/admin/model", _json, json={"checkpoint": checkpoint, "min_gallery_items": min_gallery_items})


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")


class _Base:
    def __init__(self, url: str, api_key: str | None, retries: int, max_retry_wait_s: float) -> None:
        self.url = check_url(url)
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float:
        """Seconds to wait before retrying a failed answer; raises its typed error when not retryable."""
        error = api_error(response)
        # 429 (a queue is full) and 503 (not ready, gallery behind) pass; wait as long as the server asks.
        if response.status_code in (429, 503) and attempt < self.retries:
            wait = error.retry_after if error.retry_after is not None else 0.5 * 2**attempt
            return min(wait, self.max_retry_wait_s)
        raise error

    def _unreachable(self, exc: httpx.TransportError) -> ServiceUnreachable:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return ServiceUnreachable(f"cannot connect to {self.url} ({exc}); is the service running?")
        return ServiceUnreachable(f"the connection to {self.url} failed: {type(exc).__name__}: {exc}")


class RiceClient(_Base):
    """Blocking client. `http` may be any httpx.Client already pointing at the service (e.g. a
    TestClient around an in-process app); otherwise one is made for `url`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(str(http.base_url) if http is not None else url, api_key, retries, max_retry_wait_s)
        self._own = http is None
        self.http = http if http is not None else httpx.Client(base_url=self.url, timeout=timeout_s)

    def __enter__(self) -> RiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    def call(self, call: Call[T]) -> T:
        """Send `call`, retrying 429/503 as the server asks; the parsed answer or a typed error."""
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(call.method, call.path, headers=self.headers, **call.request_kwargs())
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            if response.is_success:
                return call.parse(response)
            time.sleep(self._retry_wait(response, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def info(self) -> dict[str, Any]:
        """GET /v1/info: model, gallery (with a warning when the served model's gallery is empty), limits."""
        return self.call(Call("GET", "/v1/info", _json))

    def stats(self) -> dict[str, Any]:
        return self.call(Call("GET", "/v1/gallery/stats", _json))

    def recognize(
        self,
        media: bytes | str | Path,
        top_k: int = 5,
        shop_id: str | None = None,
        num_frames: int = 10,
        min_score: float | None = None,
        min_gallery_version: int = 0,
        image: bool | None = None,
        filename: str | None = None,
    ) -> Recognition:
        """Top-k SKUs for a clip, or a still image (chosen by `image`, else by name and content)."""
        return self.call(_Calls.recognize(media, top_k, shop_id, num_frames, min_score, min_gallery_version, image, filename))

    def add_item(
        self,
        image: bytes | str | Path,
        sku: str,
        shop_id: str | None = None,
        item_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        filename: str | None = None,
    ) -> ItemAdded:
        """Add (or, with an existing item_id, replace) one catalog image. Without `item_id` the id is
        derived from the SKU, shop and image bytes: running the same code twice never duplicates items."""
        return self.call(_Calls.add_item(image, sku, shop_id, item_id, metadata, filename))

    def delete_item(self, item_id: str, shop_id: str | None = None) -> Deleted:
        """Remove one item (`shop_id`: its shop, which a sharded deployment needs)."""
        return self.call(_Calls.deleted(f"/v1/gallery/items/{_quote(item_id)}", {"shop_id": shop_id}))

    def delete_sku(self, sku: str, shop_id: str | None = None) -> Deleted:
        return self.call(_Calls.deleted(f"/v1/gallery/skus/{_quote(sku)}", {"shop_id": shop_id}))

    def list_items(self, sku: str | None = None, shop_id: str | None = None, offset: int = 0, limit: int = 50) -> GalleryPage:
        """A page of the gallery (SKU containing `sku`, in shop `shop_id`)."""
        return self.call(_Calls.list_items(sku, shop_id, offset, limit))

    def thumbnail(self, item_id: str, shop_id: str | None = None) -> bytes:
        """The item's catalog thumbnail (JPEG bytes; `shop_id`: its shop, which a sharded deployment needs)."""
        return self.call(_Calls.thumbnail(item_id, shop_id))

    def feedback(self, request_id: str, verdict: str, sku: str | None = None, shop_id: str | None = None) -> FeedbackRecorded:
        """POST /v1/feedback (a write key): `verdict` on the answer `request_id`: "correct" (its top-1 is the
        product), "wrong" (`sku`: the right SKU, if known) or "none_of_these" (not in the gallery).
        `shop_id`: the answer's shop, which a proxy in front of a sharded deployment routes by."""
        return self.call(_Calls.feedback(request_id, verdict, sku, shop_id))

    def switch_model(self, checkpoint: str | None, min_gallery_items: int = 0) -> dict[str, Any]:
        """POST /v1/admin/model: swap this replica to another checkpoint (a key with the admin right `a`)."""
        return self.call(_Calls.switch_model(checkpoint, min_gallery_items))


class AsyncRiceClient(_Base):
    """The same API for asyncio code: many requests in flight on one connection pool."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        max_retry_wait_s: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(str(http.base_url) if http is not None else url, api_key, retries, max_retry_wait_s)
        self._own = http is None
        self.http = http if http is not None else httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    async def __aenter__(self) -> AsyncRiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def call(self, call: Call[T]) -> T:
        """Send `call`, retrying 429/503 as the server asks; the parsed answer or a typed error."""
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(call.method, call.path, headers=self.headers, **call.request_kwargs())
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from None
            if response.is_success:
                return call.parse(response)
            await asyncio.sleep(self._retry_wait(response, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def info(self) -> dict[str, Any]:
        return await self.call(Call("GET", "/v1/info", _json))

    async def recognize(
        self,
        media: bytes | str | Path,
        top_k: int = 5,
        shop_id: str | None = None,
        num_frames: int = 10,
        min_score: float | None = None,
        min_gallery_version: int = 0,
        image: bool | None = None,
        filename: str | None = None,
    ) -> Recognition:
        """Top-k SKUs for a clip, or a still image (chosen by `image`, else by name and content)."""
        return await self.call(_Calls.recognize(media, top_k, shop_id, num_frames, min_score, min_gallery_version, image, filename))

    async def add_item(
        self,
        image: bytes | str | Path,
        sku: str,
        shop_id: str | None = None,
        item_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        filename: str | None = None,
    ) -> ItemAdded:
        return await self.call(_Calls.add_item(image, sku, shop_id, item_id, metadata, filename))

    async def delete_item(self, item_id: str, shop_id: str | None = None) -> Deleted:
        return await self.call(_Calls.deleted(f"/v1/gallery/items/{_quote(item_id)}", {"shop_id": shop_id}))

    async def delete_sku(self, sku: str, shop_id: str | None = None) -> Deleted:
        return await self.call(_Calls.deleted(f"/v1/gallery/skus/{_quote(sku)}", {"shop_id": shop_id}))

    async def stats(self) -> dict[str, Any]:
        return await self.call(Call("GET", "/v1/gallery/stats", _json))

    async def list_items(self, sku: str | None = None, shop_id: str | None = None, offset: int = 0, limit: int = 50) -> GalleryPage:
        return await self.call(_Calls.list_items(sku, shop_id, offset, limit))

    async def thumbnail(self, item_id: str, shop_id: str | None = None) -> bytes:
        return await self.call(_Calls.thumbnail(item_id, shop_id))

    async def feedback(self, request_id: str, verdict: str, sku: str | None = None, shop_id: str | None = None) -> FeedbackRecorded:
        """POST /v1/feedback: see `RiceClient.feedback`."""
        return await self.call(_Calls.feedback(request_id, verdict, sku, shop_id))

    async def switch_model(self, checkpoint: str | None, min_gallery_items: int = 0) -> dict[str, Any]:
        return await self.call(_Calls.switch_model(checkpoint, min_gallery_items))
