"""Domain errors the pipeline and the gallery raise: what a client caused or needs to know.

They know nothing of HTTP; `service.errors` maps each class to a status in one table.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client can cause or needs to know about."""

    code = "error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    code = "bad_request"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMedia(ServiceError):
    """Not a video/image we can open at all (random bytes, audio only, unknown container)."""

    code = "unsupported_media"


class InvalidMedia(ServiceError):
    """A container we recognise but cannot use: truncated, no decodable frames, over a limit."""

    code = "invalid_media"


class UndecodableMedia(ServiceError):
    """The decoder crashed, ran out of memory or time on this upload; its worker was replaced."""

    code = "undecodable_media"


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
