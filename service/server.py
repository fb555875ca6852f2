"""Running the app under uvicorn: in the foreground (`rice serve`) or on a background thread
(the demo and the integration tests use a real HTTP server on localhost)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from model.checkpoint import LoadedEncoder, load_encoder
from service.app import create_app
from service.settings import Settings


def serve(settings: Settings) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; uvicorn drains in-flight requests on shutdown.
    The checkpoint is read first, so a bad one is a CheckpointError here (one line from the caller),
    not a traceback from uvicorn's start-up."""
    app = create_app(settings, encoder=load_encoder(settings.checkpoint))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, timeout_graceful_shutdown=30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    server: uvicorn.Server  # set should_exit for a graceful stop (what SIGTERM does)
    thread: threading.Thread


@contextmanager
def app_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 120.0) -> Iterator[RunningServer]:
    """Run `app` under uvicorn on a thread (a free port when `port` is 0) until the block ends,
    then stop it gracefully. Yields once uvicorn listens, before the app need be ready."""
    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the service stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not listening after {start_timeout_s:g} s")
            time.sleep(0.02)
        yield RunningServer(f"http://{host}:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def background_server(settings: Settings, encoder: LoadedEncoder | None = None, ready_timeout_s: float = 120.0) -> Iterator[str]:
    """Start the service on a thread; yield its base URL once /readyz answers 200; stop it after.
    `encoder` reuses an already-loaded model (tests)."""
    with app_in_thread(create_app(settings, encoder=encoder), settings.host, settings.port, ready_timeout_s) as running:
        deadline = time.monotonic() + ready_timeout_s
        while httpx.get(f"{running.url}/readyz", timeout=2.0).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError(f"service not ready after {ready_timeout_s:g} s")
            time.sleep(0.1)
        yield running.url
