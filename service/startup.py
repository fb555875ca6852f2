"""Starting the service from the environment (`python -m service`, `rice serve`): a setting that cannot
work is one line naming its RICE_* variable and exit status 2, found before the model loads (seconds),
never a uvicorn traceback after it.

Checked before serving: every RICE_* value (pydantic, one line per error), unknown RICE_* names (a
warning with the closest known name: other tools may share the prefix), the port (bound and closed),
the device (CUDA present) and Redis (answers PING, through index.redis_util: the one Redis user)."""

from __future__ import annotations

import difflib
import logging
import os
import socket
import sys
from collections.abc import Mapping

from pydantic import SecretStr, ValidationError

from service.settings import Settings

log = logging.getLogger("rice.settings")

PREFIX = "RICE_"
# RICE_* variables that are not settings of the service but read by the project's own tools: never flagged.
NOT_SETTINGS = frozenset(
    {
        "RICE_CLIENT_API_KEY",  # the CLI's key for talking to a service (tools/cli.py)
        "RICE_VARIANT",  # docker-compose.yml: which image to build (gpu, cpu)
        "RICE_UPDATE_SCREENSHOT",  # tests/test_console.py: rewrite the console screenshot
    }
)
EXIT_SETTINGS = 2
REDIS_TIMEOUT_S = 3.0


class StartupError(ValueError):
    """A setting the host cannot honour (device, port, Redis): the message names the RICE_* variable."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def settings_error_lines(exc: ValidationError) -> list[str]:
    """Pydantic's report as one line per error: `RICE_ONNX_PRECISION='int4': Input should be 'fp32' or
    'int8'` for a field (a secret's value is never echoed), the validator's sentence for a combination."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = err.get("loc", ())
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:
            lines.append(msg)
            continue
        field = str(loc[0])
        info = Settings.model_fields.get(field)
        secret = info is not None and info.annotation is SecretStr
        value = "" if secret or "input" not in err else f"={err['input']!r}"
        lines.append(f"{env_name(field)}{value}: {msg}")
    return lines


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each RICE_* variable that is no setting (a typo is otherwise silently ignored)."""
    known = [env_name(f) for f in Settings.model_fields]
    out = []
    for name in sorted(environ):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith(PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        close = difflib.get_close_matches(upper, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"{name} is not a setting and is ignored{hint}")
    return out


def check_port(host: str, port: int, named: str = "RICE_PORT") -> None:
    """Bind the address and let it go: a port in use fails here, before the model loads, not after.
    `named`: what set the port, as the message should name it (`RICE_PORT=8000`, or `--port 8000`)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"RICE_HOST={host!r}: not an address to listen on ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(address)
        except OSError as exc:
            why = exc.strerror or exc
            setting = f"{named}={port}" if named.startswith("RICE_") else f"{named} {port}"
            raise StartupError(f"{setting}: cannot listen on {host}:{port} ({why}); is another server on it?") from None


def check_device(name: str) -> None:
    """RICE_DEVICE names a device this host has (torch's own error comes only after the model loads)."""
    import torch

    try:
        device = torch.device(name) if name != "auto" else None
    except RuntimeError:
        raise StartupError(f"RICE_DEVICE={name!r}: not a device (want auto, cpu, cuda or cuda:N)") from None
    if device is None or device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise StartupError(f"RICE_DEVICE={name!r}: CUDA is not available on this host (use auto or cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise StartupError(f"RICE_DEVICE={name!r}: this host has {torch.cuda.device_count()} CUDA device(s)")


def check_redis(url: str | None) -> None:
    """RICE_REDIS_URL answers PING (else the gallery store fails inside the app's start-up)."""
    if not url:
        return
    from index.errors import StoreUnavailable
    from index.redis_util import ping

    try:
        ping(url, REDIS_TIMEOUT_S)
    except ValueError as exc:
        raise StartupError(f"RICE_REDIS_URL: not a Redis URL ({exc})") from None
    except StoreUnavailable as exc:
        raise StartupError(f"RICE_REDIS_URL: {exc}; is it running?") from None  # str(): the cause, without the HTTP wording


def preflight(settings: Settings, port_named: str = "RICE_PORT") -> None:
    """The host-dependent checks, cheapest first; StartupError on the first that fails."""
    check_port(settings.host, settings.port, port_named)
    check_device(settings.device)
    check_redis(settings.redis_url)


def run(program: str, **overrides: object) -> int:
    """Build the settings (RICE_* with `overrides` not None on top), check them, serve until stopped.
    Every refusal is a line (or one per bad value) `<program>: ...` on stderr and exit status 2."""
    for warning in unknown_variables(os.environ):
        log.warning("%s", warning)
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:  # a bad RICE_* value, or settings that cannot work together
        for line in settings_error_lines(exc):
            print(f"{program}: {line}", file=sys.stderr)
        return EXIT_SETTINGS
    try:
        preflight(settings, "--port" if overrides.get("port") is not None else "RICE_PORT")
        from service.server import serve  # the app and model code, imported once the host is known fit (seconds)

        serve(settings)
    except ValueError as exc:  # StartupError, CheckpointError, or a setting the app refuses (bad RICE_API_KEYS, ...)
        print(f"{program}: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    return 0
