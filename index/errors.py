"""The domain errors: what a client caused or needs to know, defined once, below the pipeline and the service.

Each class has a `code` (the `error.code` clients see) and may carry `retry_after_s` (a full queue,
a replica behind the gallery). They know nothing of HTTP: `service.errors` maps every class to a
status in one exhaustive table (a test fails when a class has none). Errors that also have a
natural Python meaning keep it as a second base (`ItemNotFound` is a `LookupError`,
`StoreUnavailable` a `ConnectionError`), so library code may catch them either way.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client can cause or needs to know about."""

    code = "error"

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


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
    """A bounded queue is full; `retry_after_s` says when to come back."""

    code = "overloaded"


class NotReady(ServiceError):
    """Starting up, shutting down, or behind the gallery version a request needs."""

    code = "not_ready"


class ShopRequired(BadRequest):
    """A gallery or recognition request without a shop id on a shop-sharded deployment (the shop picks the shard)."""

    code = "shop_required"


class WrongShard(ServiceError):
    """A read for a shop that another shard's replicas hold: the proxy in front sent it to the wrong group."""

    code = "wrong_shard"


class ItemNotFound(NotFound, LookupError):
    """No live item (or SKU) with that id."""


class InvalidBulk(BadRequest, ValueError):
    """A bulk import (or its files) that cannot be applied as sent; nothing was written."""


class JobNotFound(NotFound, LookupError):
    """No job with that id."""


class RequestNotFound(NotFound, LookupError):
    """No request record with that id (feedback): never answered here, or expired."""


class StoreUnavailable(NotReady, ConnectionError):
    """The store's server cannot be reached (or did not answer in time); nothing was acknowledged."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s)
        self.message = f"gallery store unavailable: {message}"  # what a client reads; str(exc) stays the cause
