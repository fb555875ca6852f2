"""Shared route dependencies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError

from pipeline.feedback import FeedbackKeeper
from service.catalog_io import Blobs
from service.errors import BadRequest, NotReady, PayloadTooLarge
from service.serving import Serving
from service.settings import Settings
from service.state import AppState


def check_at_most(name: str, value: int, maximum: int) -> None:
    """A query parameter over an operator's limit (RICE_MAX_*): the same 422 invalid_request, in the
    same words, as the declared lower bounds give, so a client meets one validation language."""
    if value > maximum:
        err = {"type": "less_than_equal", "loc": ("query", name), "msg": f"Input should be less than or equal to {maximum}", "input": value}
        raise RequestValidationError([err])


def get_serving(request: Request) -> Serving:
    """The app's serving holder (`service.serving`): the current model state and its swap."""
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise NotReady("the service is starting")
    assert isinstance(serving, Serving)  # app.state is untyped: this is its one typed reader
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def originals_of(request: Request) -> Blobs | None:
    """The blob store of items' originals (none when the gallery is in memory only)."""
    blobs: Blobs | None = getattr(request.app.state, "originals", None)
    return blobs


def current_state(request: Request) -> AppState:
    """The serving state right now, uncounted (for checks that do not use the model)."""
    return get_serving(request).current


async def get_state(request: Request) -> AsyncIterator[AppState]:
    """The serving state this request uses from start to end, counted so that a model switch
    retires the old model only after its last request is done. Async so that the count is only
    touched on the event loop."""
    state = current_state(request)
    state.active += 1
    try:
        yield state
    finally:
        state.active -= 1


State = Annotated[AppState, Depends(get_state)]


def get_feedback(request: Request) -> FeedbackKeeper:
    """Request records and verdicts (model-independent: one per app, not per served model)."""
    keeper = getattr(request.app.state, "feedback", None)
    if keeper is None:
        raise NotReady("the service is starting")
    return keeper


Keeper = Annotated[FeedbackKeeper, Depends(get_feedback)]


# -- the shop of a request (shop-sharded deployments route on it; README "Sharding by shop") ------

SHOP_HEADER = "X-Shop-Id"
_SHOP_QUERY_DOC = "the shop: search, list or act on only this shop's gallery (sharded deployments: required, here or in X-Shop-Id)"
_SHOP_HEADER_DOC = "the shop, as a header (what a sharding proxy routes on); the same as the shop_id query parameter"


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def routing_shop(
    shop_id: str | None = Query(None, max_length=256, description=_SHOP_QUERY_DOC),
    x_shop_id: str | None = Header(None, alias=SHOP_HEADER, max_length=256, description=_SHOP_HEADER_DOC),
) -> str | None:
    """The request's shop: the `shop_id` query parameter or the X-Shop-Id header (empty = absent);
    400 when both are given and differ (a proxy would route on one and the service filter on the other)."""
    query, header = shop_id or None, _utf8(x_shop_id) or None
    if query is not None and header is not None and query != header:
        raise BadRequest(f"the shop_id query parameter ({query!r}) and the {SHOP_HEADER} header ({header!r}) differ: send one, or the same")
    return header or query


def _utf8(header: str | None) -> str | None:
    """A header value as the UTF-8 text its bytes spell (the web stack decodes headers as Latin-1):
    a shop id like "店铺-7" is then the same string in the header as in a form field, and so is its
    shard, which the proxy computes from the header's raw bytes."""
    if header is None:
        return None
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8 (or not Latin-1-decoded): taken as it came
        return header


RoutingShop = Annotated[str | None, Depends(routing_shop)]


def read_shop(request: Request, shop: RoutingShop) -> str | None:
    """The shop of a gallery read or a recognition: on a sharded deployment required (400
    shop_required) and held by this replica's shard (421 wrong_shard: the proxy sent it astray)."""
    settings_of(request).shard_plan().check_read(shop)
    return shop


ReadShop = Annotated[str | None, Depends(read_shop)]


def write_shop(request: Request, routing: str | None, body: str | None = None) -> str | None:
    """The shop of a gallery write: the routing shop or the body's own shop_id field (400 when they
    differ); required on a sharded deployment, but of any shard: the replica writes it to its shard."""
    if routing is not None and body is not None and routing != body:
        raise BadRequest(f"the shop_id field ({body!r}) differs from the request's shop ({routing!r}, query parameter or {SHOP_HEADER})")
    shop = routing if routing is not None else body
    settings_of(request).shard_plan().require_shop(shop)
    return shop


async def read_upload(upload: UploadFile | None, request: Request, max_bytes: int, field: str) -> bytes:
    """The bytes of a multipart file field, or of the raw body when the request is not multipart."""
    if upload is not None:
        data = await upload.read(max_bytes + 1)
    elif request.headers.get("content-type", "").startswith(("multipart/", "application/x-www-form-urlencoded")):
        raise BadRequest(f"missing multipart field {field!r}")
    else:
        data = await request.body()
        if not data:
            raise BadRequest(f"send the upload as multipart field {field!r} or as the raw request body")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"upload exceeds {max_bytes} bytes")
    return data
