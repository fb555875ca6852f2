"""API keys: parsing, constant-time lookup, 401 vs 403, writes always keyed, model switches need
the admin right, reads optionally, health open, keys never logged, no keys refused when open is not allowed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import ApiKeys
from tests.conftest import settings_for
from tests.serving_helpers import gated_encoder

WRITER, READER, WRITE_ONLY = "writer-key-0123456789", "reader-key-0123456789", "ingest-only-key-0123"
ADMIN = "admin-only-key-0123456"
KEYS = f"{WRITER}:rw,{READER}:r,{WRITE_ONLY}:w,{ADMIN}:a"


def _png() -> bytes:
    return cv2.imencode(".png", np.full((32, 32, 3), 80, np.uint8))[1].tobytes()


def _client(tmp_path: Path, **overrides: object) -> TestClient:
    loaded, _ = gated_encoder()
    return TestClient(create_app(settings_for(tmp_path, **overrides), encoder=loaded))


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[TestClient]:
    with _client(tmp_path, api_keys=KEYS) as c:
        yield c


def _add(c: TestClient, headers: dict[str, str] | None = None) -> int:
    return c.post("/v1/gallery/items", files={"image": ("a.png", _png(), "image/png")}, data={"sku": "A"}, headers=headers).status_code


def test_parse_both_formats_and_reject_bad_ones_without_echoing_keys() -> None:
    csv = ApiKeys.parse(KEYS)
    js = ApiKeys.parse(f'{{"{WRITER}": "rw", "{READER}": "r"}}')
    for keys in (csv, js):
        assert keys.rights_of(WRITER) == {"r", "w"} and keys.rights_of(READER) == {"r"}
        assert keys.rights_of("not-a-configured-key") is None and keys.rights_of("") is None
    assert not ApiKeys.parse("").enabled and not ApiKeys.parse("  ").enabled
    for bad in ("secretkey123", "secretkey123:x", "short:rw", '{"secretkey123": 5}', "{nope"):
        with pytest.raises(ValueError) as exc:
            ApiKeys.parse(bad)
        assert "secretkey123" not in str(exc.value)
    assert WRITER.encode() not in repr(csv).encode()  # only digests are kept


def test_settings_hide_keys(tmp_path: Path) -> None:
    s = settings_for(tmp_path, api_keys=KEYS)
    assert WRITER not in repr(s) and WRITER not in str(s.model_dump())


def test_without_keys_everything_is_open(tmp_path: Path) -> None:
    with _client(tmp_path) as c:
        assert _add(c) == 201
        assert c.get("/v1/gallery/stats").status_code == 200


def test_writes_need_a_key_with_write_rights(keyed: TestClient) -> None:
    r = keyed.post("/v1/gallery/items", files={"image": ("a.png", _png(), "image/png")}, data={"sku": "A"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert _add(keyed, {"Authorization": "Bearer wrong-key-0123456789"}) == 401
    assert _add(keyed, {"Authorization": f"Basic {WRITER}"}) == 401  # only the Bearer scheme carries keys
    r = keyed.post("/v1/gallery/items", files={"image": ("a.png", _png(), "image/png")}, data={"sku": "A"}, headers={"X-API-Key": READER})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert _add(keyed, {"Authorization": f"Bearer {WRITER}"}) == 201
    assert _add(keyed, {"X-API-Key": WRITE_ONLY}) == 201
    assert keyed.delete("/v1/gallery/skus/A").status_code == 401
    assert keyed.delete("/v1/gallery/skus/A", headers={"X-API-Key": READER}).status_code == 403
    assert keyed.delete("/v1/gallery/skus/A", headers={"X-API-Key": WRITER}).status_code == 200
    assert keyed.delete("/v1/gallery/items/x", headers={"X-API-Key": READER}).status_code == 403


def test_reads_open_by_default_and_health_always_open(keyed: TestClient) -> None:
    assert keyed.post("/v1/recognize/image", files={"file": ("q.png", _png(), "image/png")}).status_code == 200
    assert keyed.get("/v1/gallery/stats").status_code == 200
    for path in ("/livez", "/readyz", "/metrics", "/v1/info"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/v1/info").json()["auth"] == {"keys_configured": True, "read_requires_key": False}


def test_keyed_reads(tmp_path: Path) -> None:
    with _client(tmp_path, api_keys=KEYS, read_requires_key=True) as c:
        files = {"file": ("q.png", _png(), "image/png")}
        assert c.post("/v1/recognize/image", files=files).status_code == 401
        assert c.get("/v1/gallery/stats", headers={"X-API-Key": "nope-nope-nope"}).status_code == 401
        assert c.post("/v1/recognize/image", files=files, headers={"X-API-Key": READER}).status_code == 200
        assert c.post("/v1/recognize/image", files=files, headers={"X-API-Key": WRITE_ONLY}).status_code == 403
        assert c.get("/v1/gallery/stats", headers={"Authorization": f"Bearer {WRITER}"}).status_code == 200
        assert c.get("/readyz").status_code == 200
        assert 'rice_auth_failures_total{status="401"} 2.0' in c.get("/metrics").text


def test_keys_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with _client(tmp_path, api_keys=KEYS) as c:
        statuses = [
            _add(c, {"X-API-Key": WRITER}),
            _add(c, {"X-API-Key": READER}),
            _add(c, {"Authorization": "Bearer guessed-key-0123456789"}),
        ]
    assert statuses == [201, 403, 401]  # the keys really went through the auth checks
    assert all(k not in caplog.text for k in (WRITER, READER, "guessed-key-0123456789"))


def test_bad_key_setting_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rights"):
        create_app(settings_for(tmp_path, api_keys="some-long-key:admin"))


def test_model_switch_needs_the_admin_right_not_the_write_right(keyed: TestClient) -> None:
    body = {"checkpoint": "/nonexistent/rice.pt"}  # past auth, the switch fails cleanly (400): nothing is loaded
    assert keyed.post("/v1/admin/model", json=body).status_code == 401
    r = keyed.post("/v1/admin/model", json=body, headers={"X-API-Key": WRITER})
    assert r.status_code == 403 and "switch the model" in r.json()["error"]["message"]
    assert keyed.post("/v1/admin/model", json=body, headers={"X-API-Key": READER}).status_code == 403
    r = keyed.post("/v1/admin/model", json=body, headers={"X-API-Key": ADMIN})
    assert r.status_code == 400, r.text
    # and the admin right is not a write right
    assert _add(keyed, {"X-API-Key": ADMIN}) == 403
    assert keyed.delete("/v1/gallery/skus/A", headers={"X-API-Key": ADMIN}).status_code == 403
    assert 'rice_auth_failures_total{status="403"} 4.0' in keyed.get("/metrics").text


def test_rights_parse_with_admin() -> None:
    keys = ApiKeys.parse(f"{WRITER}:rwa,{READER}:r")
    assert keys.rights_of(WRITER) == {"r", "w", "a"} and keys.rights_of(READER) == {"r"}


def test_no_keys_refused_when_open_is_not_allowed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="RICE_ALLOW_OPEN"):
        create_app(settings_for(tmp_path, allow_open=False))
    create_app(settings_for(tmp_path, allow_open=False, api_keys=KEYS))  # keyed: fine
    create_app(settings_for(tmp_path))  # local development default: open
