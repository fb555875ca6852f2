"""/docs and /redoc work on a host without internet: the pages name no external host, and every
asset they load is served by the app itself."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import settings_for
from tests.serving_helpers import gated_encoder

# Any absolute URL or protocol-relative reference ("//cdn...") in a page: all must be absent.
_EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def test_docs_pages_name_no_external_host_and_their_assets_are_served(tmp_path: Path) -> None:
    loaded, _ = gated_encoder()
    with TestClient(create_app(settings_for(tmp_path), encoder=loaded)) as c:
        for page in ("/docs", "/redoc"):
            r = c.get(page)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            assert _EXTERNAL.findall(r.text) == [], page
            assets = _ASSET.findall(r.text)
            assert any(a.endswith(".js") for a in assets), page
            for asset in assets:
                got = c.get(asset)
                assert got.status_code == 200 and len(got.content) > 100, asset
        schema = c.get("/openapi.json").json()
        assert "/v1/recognize" in schema["paths"] and "/docs" not in schema["paths"]
