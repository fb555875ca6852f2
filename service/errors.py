"""The one table that maps domain errors to HTTP answers.

Every domain error is a `index.errors.ServiceError` subclass with a `code`; this module gives every
such class, exactly, its status: a class missing from `ERROR_STATUS` fails a test
(tests/test_errors.py), and at run time it would be answered as an unexpected 500, never guessed.
Every error body is {"error": {"code": ..., "message": ...}}; `retry_after_s` becomes Retry-After.
Anything that is not a domain error is a generic 500 whose details go to the log and a counter,
never to the client.

The web stack is imported only inside `install_error_handlers`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from index.errors import (
    BadRequest,
    Conflict,
    InvalidBulk,
    InvalidMedia,
    ItemNotFound,
    JobNotFound,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RequestNotFound,
    ServiceError,
    ShopRequired,
    StoreUnavailable,
    UndecodableMedia,
    UnsupportedMedia,
    WrongShard,
)
from pipeline.feedback import UnknownSku
from pipeline.jobs import UploadMissing

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = [
    "ERROR_STATUS",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InvalidMedia",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "ShopRequired",
    "Unauthorized",
    "UndecodableMedia",
    "UnsupportedMedia",
    "WrongShard",
    "error_body",
    "install_error_handlers",
]

log = logging.getLogger("rice.errors")


class Unauthorized(ServiceError):
    """No API key, or one we do not know (401: the client should authenticate)."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """A valid API key without the right this endpoint needs (403: authenticating again won't help)."""

    code = "forbidden"


# Exact classes, not isinstance: a new error class must be given its status here.
ERROR_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    InvalidBulk: 400,
    ShopRequired: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    ItemNotFound: 404,
    JobNotFound: 404,
    RequestNotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    WrongShard: 421,  # Misdirected Request: this replica group does not hold the shop
    UnsupportedMedia: 415,
    InvalidMedia: 422,
    UndecodableMedia: 422,
    UnknownSku: 422,
    Overloaded: 429,
    UploadMissing: 500,
    NotReady: 503,
    StoreUnavailable: 503,
}
_EXTRA_HEADERS: dict[type[ServiceError], dict[str, str]] = {Unauthorized: {"WWW-Authenticate": 'Bearer realm="rice"'}}


def status_of(exc: Exception) -> int:
    """The HTTP status the table gives `exc` (500 when its class is not in the table)."""
    return ERROR_STATUS.get(type(exc), 500) if isinstance(exc, ServiceError) else 500


def headers_of(exc: ServiceError) -> dict[str, str]:
    headers = dict(_EXTRA_HEADERS.get(type(exc), {}))
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return headers


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def install_error_handlers(
    app: FastAPI, on_unexpected: Callable[[], object] | None = None, on_error: Callable[[str], object] | None = None
) -> None:
    """Register the table once; routes just raise. `on_error(code)` counts every domain error answered."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        if type(exc) not in ERROR_STATUS:  # a class without a status: a bug, answered as one
            return await unexpected(request, exc)
        if on_error is not None:
            on_error(exc.code)
        return JSONResponse(error_body(exc.code, exc.message), status_of(exc), headers=headers_of(exc))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return JSONResponse(error_body("invalid_request", "; ".join(parts) or "invalid request"), 422)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the log only: internals (paths, shapes, library versions) never reach clients.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        if on_unexpected is not None:
            on_unexpected()
        return JSONResponse(error_body("internal", "internal server error"), 500)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
