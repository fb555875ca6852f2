"""One error hierarchy, one exhaustive table: every domain error class has its HTTP status."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import index
import pipeline
import service
from index.errors import NotFound, Overloaded, ServiceError, StoreUnavailable
from service.errors import ERROR_STATUS, headers_of, status_of


def _subclasses(cls: type[ServiceError]) -> set[type[ServiceError]]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_domain_error_class_has_a_status_in_the_table() -> None:
    for package in (index, pipeline, service):  # every module that could define one
        for mod in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(mod.name)
    classes = {c for c in _subclasses(ServiceError) if c.__module__.split(".")[0] in ("index", "pipeline", "service")}
    assert len(classes) >= 15
    missing = sorted(c.__qualname__ for c in classes if c not in ERROR_STATUS)
    assert not missing, f"domain errors without an HTTP status in service.errors.ERROR_STATUS: {missing}"


def test_a_class_missing_from_the_table_is_a_500_not_a_guess() -> None:
    class NewIndexError(NotFound):  # e.g. a new index error nobody mapped yet
        code = "new"

    assert status_of(NewIndexError("x")) == 500
    assert status_of(NotFound("x")) == 404 and status_of(ValueError("x")) == 500


def test_retry_after_and_store_errors() -> None:
    assert headers_of(Overloaded("full", retry_after_s=2.2)) == {"Retry-After": "3"}
    exc = StoreUnavailable("redis: gone")
    assert isinstance(exc, ConnectionError) and str(exc) == "redis: gone"
    assert status_of(exc) == 503 and exc.message == "gallery store unavailable: redis: gone"
    with pytest.raises(LookupError):
        from index.errors import ItemNotFound

        raise ItemNotFound("x")
