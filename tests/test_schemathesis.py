"""Property-based requests from the OpenAPI schema (schemathesis) against a real server over HTTP:
no request it generates, valid or not, gets a 5xx (besides the documented 503 of read-your-writes,
below).

Includes the admin model switch: a generated `checkpoint` is a path that does not exist (400), or
null, which really switches to the built-in encoder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from service.app import create_app
from service.server import RunningServer
from tests.conftest import settings_for
from tests.serving_helpers import gated_encoder, live_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    loaded, _ = gated_encoder()
    settings = settings_for(Path(tmp_path_factory.mktemp("schemathesis")), decode_workers=1, sync_wait_s=0.2)
    with live_server(create_app(settings, encoder=loaded)) as srv:
        yield srv


def _documented_wait_for_gallery(response: schemathesis.Response) -> bool:
    """The one 5xx that is the contract, not a failure: a `min_gallery_version` this replica has
    not reached within RICE_SYNC_WAIT_S is 503 not_ready with Retry-After (read-your-writes; the
    generator picks versions that no write ever made)."""
    if response.status_code != 503:
        return False
    err = response.json().get("error", {})
    return err.get("code") == "not_ready" and str(err.get("message", "")).startswith("gallery_behind") and "retry-after" in response.headers


def _operations() -> list[str]:
    """'METHOD path' of every operation in the app's schema (built without starting it)."""
    app = create_app(settings_for(Path("/nonexistent-unused"), gallery_path=":memory:"))
    schema = schemathesis.openapi.from_dict(app.openapi())
    return sorted(f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations())


@pytest.mark.parametrize("operation", _operations())
def test_no_generated_request_gets_a_server_error(running: RunningServer, operation: str) -> None:
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
    method, path = operation.split(" ", 1)
    op = schema[path][method].ok() if hasattr(schema[path][method], "ok") else schema[path][method]

    @hypothesis.given(case=op.as_strategy())
    @hypothesis.settings(
        max_examples=25,
        deadline=None,  # CI machines are loaded; correctness, not speed, is checked here
        suppress_health_check=list(hypothesis.HealthCheck),
        derandomize=True,  # the same requests every run: a failure reproduces
        database=None,
    )
    def no_server_error(case: schemathesis.Case) -> None:
        response = case.call(base_url=running.url, timeout=120)
        if _documented_wait_for_gallery(response):
            return
        case.validate_response(response, checks=[not_a_server_error])

    no_server_error()
