"""Domain errors and the one table that maps them to HTTP answers.

Every error body is {"error": {"code": ..., "message": ...}}. Anything not in the table is a
generic 500 whose details go to the log and a counter, never to the client.

The web stack is imported only inside `install_error_handlers`, so the batcher (and the GPU
benchmark, which runs where FastAPI is not installed) can raise these errors without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from index.records import ItemNotFound

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

log = logging.getLogger("rice.errors")


class ServiceError(Exception):
    """Base of the errors a client can cause or needs to know about."""

    code = "error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    code = "bad_request"


class Unauthorized(ServiceError):
    """No API key, or one we do not know (401: the client should authenticate)."""

    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="rice"'})


class Forbidden(ServiceError):
    """A valid API key without the right this endpoint needs (403: authenticating again won't help)."""

    code = "forbidden"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMedia(ServiceError):
    """Not a video/image we can open at all (random bytes, audio only, unknown container)."""

    code = "unsupported_media"


class InvalidMedia(ServiceError):
    """A container we recognise but cannot use: truncated, no decodable frames, over a limit."""

    code = "invalid_media"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    """The operation clashes with one already running (e.g. a second model switch)."""

    code = "conflict"


class Overloaded(ServiceError):
    """A bounded queue is full; carries Retry-After."""

    code = "overloaded"


class NotReady(ServiceError):
    """Starting up or shutting down."""

    code = "not_ready"


ERROR_STATUS: dict[type[Exception], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    ItemNotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMedia: 415,
    InvalidMedia: 422,
    Overloaded: 429,
    NotReady: 503,
}


def status_of(exc: Exception) -> int:
    """The HTTP status the table gives `exc` (500 when it is not a known error)."""
    return next((s for cls, s in ERROR_STATUS.items() if isinstance(exc, cls)), 500)


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def install_error_handlers(app: FastAPI, on_unexpected: Callable[[], object] | None = None) -> None:
    """Register the table once; routes just raise."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        status = status_of(exc)
        if isinstance(exc, ServiceError):
            return JSONResponse(error_body(exc.code, exc.message), status, headers=exc.headers)
        return JSONResponse(error_body("not_found", str(exc.args[0]) if exc.args else "not found"), status)

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
