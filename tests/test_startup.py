"""Start-up refusals of `python -m service` and `rice serve`: a setting that cannot work is one line per
error naming its RICE_* variable and exit status 2, before the model loads; an unknown RICE_* name is
a warning naming the closest setting."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from service.server import free_port
from service.settings import Settings
from service.startup import NOT_SETTINGS, settings_error_lines, unknown_variables

ROOT = Path(__file__).resolve().parent.parent


def start(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m service` (or, with args, `python -m tools.cli serve ARGS`) on exactly these RICE_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("RICE_")}
    clean.update({"RICE_GALLERY_PATH": ":memory:", "PYTHONPATH": str(ROOT)}, **env)
    command = [sys.executable, "-m", "tools.cli", "serve", *args] if args else [sys.executable, "-m", "service"]
    return subprocess.run(command, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=300)


def lines_of(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA")
def test_cuda_on_a_cpu_host_is_one_line() -> None:
    out = start({"RICE_DEVICE": "cuda"})
    assert out.returncode == 2
    assert lines_of(out) == ["rice service: RICE_DEVICE='cuda': CUDA is not available on this host (use auto or cpu)"]


def test_an_unreachable_redis_is_one_line() -> None:
    port = free_port()  # bound and closed: nothing listens there
    out = start({"RICE_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = lines_of(out)
    assert line.startswith(f"rice service: RICE_REDIS_URL: cannot reach Redis at 127.0.0.1:{port}") and "Traceback" not in out.stderr


def test_invalid_values_are_one_line_each_naming_variable_value_and_what_is_allowed() -> None:
    out = start({"RICE_ONNX_PRECISION": "int4", "RICE_MAX_BATCH_SIZE": "0", "RICE_API_KEYS": "x" * 3})
    assert out.returncode == 2
    assert lines_of(out) == [
        "rice service: RICE_ONNX_PRECISION='int4': Input should be 'fp32' or 'int8'",
        "rice service: RICE_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1",
    ]
    cli = start({"RICE_MAX_BATCH_SIZE": "0"}, "--gallery-path", ":memory:")  # `rice serve` says the same
    assert cli.returncode == 2 and lines_of(cli) == ["rice serve: RICE_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1"]


def test_a_secret_value_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(api_keys=12345, port=-1)  # type: ignore[arg-type]
    assert settings_error_lines(err.value) == [
        "RICE_API_KEYS: Input should be a valid string",
        "RICE_PORT=-1: Input should be greater than or equal to 0",
    ]


def test_a_taken_port_fails_before_the_model_loads_and_unknown_names_are_warned(busy_port: int) -> None:
    out = start({"RICE_MATCH_TRESHOLD": "0.99"}, "--port", str(busy_port), "--gallery-path", ":memory:")
    assert out.returncode == 2, out.stderr[-2000:]
    warning, refusal = lines_of(out)
    assert "WARNING" in warning and "RICE_MATCH_TRESHOLD is not a setting and is ignored; did you mean RICE_MATCH_THRESHOLD?" in warning
    assert refusal.startswith(f"rice serve: --port {busy_port}: cannot listen on 127.0.0.1:{busy_port}")  # the flag set it
    service = start({"RICE_PORT": str(busy_port)})
    assert service.returncode == 2 and lines_of(service)[0].startswith(f"rice service: RICE_PORT={busy_port}: cannot listen")


def test_unknown_variables_name_the_closest_setting_and_spare_the_projects_own() -> None:
    env = {"RICE_MATCH_TRESHOLD": "0.99", "RICE_GALLERY_PATH": "x", "rice_port": "1", "RICE_ZZZ": "1", "PATH": "/bin"}
    env |= dict.fromkeys(NOT_SETTINGS, "1")
    assert unknown_variables(env) == [
        "RICE_MATCH_TRESHOLD is not a setting and is ignored; did you mean RICE_MATCH_THRESHOLD?",
        "RICE_ZZZ is not a setting and is ignored",
    ]


def test_every_rice_variable_the_project_reads_outside_settings_is_allowed() -> None:
    """A RICE_* name read from the environment (os.environ, getenv, compose `${...}`) is a setting or on the allow-list."""
    known = {"RICE_" + f.upper() for f in Settings.model_fields}
    read = re.compile(r"""(?:environ\.get\(|getenv\(|environ\[|\$\{)["']?(RICE_[A-Z0-9_]+)""")
    found: set[str] = set()
    for path in ROOT.rglob("*"):
        scanned = path.suffix in (".py", ".yml", ".yaml", ".sh") or path.name in ("Dockerfile", "Makefile")
        if scanned and not any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            found |= set(read.findall(path.read_text(errors="replace")))
    assert {"RICE_CLIENT_API_KEY", "RICE_VARIANT"} <= found  # the scan sees the CLI's and compose's own
    assert found - known - NOT_SETTINGS == set()
