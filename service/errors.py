"""The one table that maps domain errors to HTTP answers.

Every error body is {"error": {"code": ..., "message": ...}}. Anything not in the table is a
generic 500 whose details go to the log and a counter, never to the client.

The web stack is imported only inside `install_error_handlers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from index.feedback import RequestNotFound
from index.jobs import JobNotFound
from index.records import InvalidBulk, ItemNotFound, StoreUnavailable
from pipeline.errors import (
    BadRequest,
    Conflict,
    InvalidMedia,
    NotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    UndecodableMedia,
    UnsupportedMedia,
)
from pipeline.feedback import UnknownSku

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "InvalidMedia",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "Unauthorized",
    "UndecodableMedia",
    "UnsupportedMedia",
    "error_body",
    "install_error_handlers",
]

log = logging.getLogger("rice.errors")


class Unauthorized(ServiceError):
    """No API key, or one we do not know (401: the client should authenticate)."""

    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="rice"'})


class Forbidden(ServiceError):
    """A valid API key without the right this endpoint needs (403: authenticating again won't help)."""

    code = "forbidden"


ERROR_STATUS: dict[type[Exception], int] = {
    BadRequest: 400,
    InvalidBulk: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    ItemNotFound: 404,
    JobNotFound: 404,
    RequestNotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMedia: 415,
    InvalidMedia: 422,
    UndecodableMedia: 422,
    UnknownSku: 422,
    Overloaded: 429,
    NotReady: 503,
    StoreUnavailable: 503,
}


def status_of(exc: Exception) -> int:
    """The HTTP status the table gives `exc` (500 when it is not a known error)."""
    return next((s for cls, s in ERROR_STATUS.items() if isinstance(exc, cls)), 500)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def install_error_handlers(
    app: FastAPI, on_unexpected: Callable[[], object] | None = None, on_error: Callable[[str], object] | None = None
) -> None:
    """Register the table once; routes just raise. `on_error(code)` counts every domain error answered."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        if isinstance(exc, ServiceError):
            if on_error is not None:
                on_error(exc.code)
            return JSONResponse(error_body(exc.code, exc.message), status, headers=exc.headers)
        code, what = {404: ("not_found", "not found"), 400: ("bad_request", "bad request")}.get(
            status, ("not_ready", "gallery store unavailable")
        )
        detail = str(exc.args[0]) if exc.args else ""
        return JSONResponse(error_body(code, f"{what}: {detail}" if status == 503 else detail or what), status)

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

    for cls in ERROR_STATUS:
        app.add_exception_handler(cls, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
