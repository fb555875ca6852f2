"""Running the app under uvicorn: in the foreground (`rice serve`) or on a background thread
(the demo and the integration tests use a real HTTP server on localhost)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from model.checkpoint import LoadedEncoder
from service.app import create_app
from service.settings import Settings


def serve(settings: Settings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; uvicorn drains in-flight requests on shutdown."""
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def background_server(settings: Settings, encoder: LoadedEncoder | None = None, ready_timeout_s: float = 120.0) -> Iterator[str]:
    """Start the service on a thread; yield its base URL once /readyz answers 200; stop it after.
    `encoder` reuses an already-loaded model (tests)."""
    port = settings.port or free_port(settings.host)
    config = uvicorn.Config(create_app(settings, encoder=encoder), host=settings.host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{port}"
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if not thread.is_alive():
                raise RuntimeError("the service stopped during start-up (see the log above)")
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {ready_timeout_s:g} s")
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
