"""API keys: who may search, who may change the gallery and who may switch the model.

Keys come from one setting (RICE_API_KEYS), either "key1:rw,key2:r" or a JSON object
{"key1": "rw", "key2": "r"}; rights are r (read: recognise, gallery stats), w (write: add and
delete gallery items) and a (admin: switch the served model, `POST /v1/admin/model`). Admin is its
own right because a model switch changes every answer for every shop, while a catalog writer
only touches items: a key for the catalog pipeline should not be able to do that. With no keys
configured the service is open (local development; docker-compose refuses to start that way
unless told to). Once keys exist, writes always need a key with w, model switches a key with a;
reads need a key with r only when RICE_READ_REQUIRES_KEY is set. Health, readiness and metrics
are always open (probes and scrapers carry no keys).

Clients send `Authorization: Bearer <key>` or `X-API-Key: <key>`. Only SHA-256 digests of keys
are kept, and a presented key is compared with every one of them by `hmac.compare_digest`, so
neither the comparison time nor a memory dump reveals a key; keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

from fastapi import Request

from service.errors import Forbidden, Unauthorized
from service.metrics import Metrics
from service.settings import Settings

RIGHTS = frozenset("rwa")
_NEEDED_FOR = {"r": "read", "w": "change the gallery", "a": "switch the model (admin)"}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, as digests with their rights."""

    entries: tuple[tuple[bytes, frozenset[str]], ...] = field(default=())

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @classmethod
    def parse(cls, raw: str) -> ApiKeys:
        """'k1:rw,k2:r' or '{"k1": "rw"}' -> ApiKeys. Raises ValueError (without echoing keys) on bad input."""
        raw = raw.strip()
        if not raw:
            return cls()
        pairs: list[tuple[str, str]]
        if raw.startswith("{"):
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"RICE_API_KEYS is not valid JSON (at position {exc.pos})") from None
            if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
                raise ValueError('RICE_API_KEYS JSON must map keys to rights, e.g. {"key": "rw"}')
            pairs = list(obj.items())
        else:
            pairs = []
            for n, part in enumerate(raw.split(","), 1):
                key, sep, rights = part.strip().rpartition(":")
                if not sep:
                    raise ValueError(f"RICE_API_KEYS entry {n} has no ':rights' suffix (e.g. key:rw)")
                pairs.append((key, rights))
        entries = []
        for n, (key, rights) in enumerate(pairs, 1):
            if len(key) < 8:
                raise ValueError(f"RICE_API_KEYS entry {n}: keys must be at least 8 characters")
            granted = frozenset(rights.strip().lower())
            if not granted or not granted <= RIGHTS:
                raise ValueError(f"RICE_API_KEYS entry {n}: rights must be letters of r, w, a (e.g. r, rw, rwa)")
            entries.append((_digest(key), granted))
        return cls(tuple(entries))

    def rights_of(self, presented: str) -> frozenset[str] | None:
        """The rights of a presented key, or None when it is not a configured key. Every stored
        digest is compared (no early exit), in constant time each."""
        probe = _digest(presented)
        found: frozenset[str] | None = None
        for digest, rights in self.entries:
            if hmac.compare_digest(probe, digest):
                found = rights
        return found


def presented_key(request: Request) -> str | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key`, if any."""
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


def _check(request: Request, right: str) -> None:
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    keys: ApiKeys = request.app.state.api_keys
    if not keys.enabled or (right == "r" and not settings.read_requires_key):
        return
    key = presented_key(request)
    if key is None:
        metrics.auth_failures.labels("401").inc()
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    rights = keys.rights_of(key)
    if rights is None:
        metrics.auth_failures.labels("401").inc()
        raise Unauthorized("the API key is not valid")
    if right not in rights:
        metrics.auth_failures.labels("403").inc()
        raise Forbidden(f"this API key has no right to {_NEEDED_FOR[right]}")


def require_read(request: Request) -> None:
    """Dependency of search and gallery reads: a key with r, when reads are keyed."""
    _check(request, "r")


def require_write(request: Request) -> None:
    """Dependency of gallery writes: a key with w, whenever keys are configured."""
    _check(request, "w")


def require_admin(request: Request) -> None:
    """Dependency of admin endpoints (model switch): a key with a, whenever keys are configured."""
    _check(request, "a")
