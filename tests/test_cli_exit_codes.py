"""The README's CLI exit-status table, as a test: every status is produced, and every subcommand that
talks to a service meets each user error (a missing file, a text file, a bad URL, a bad key) with
one line on stderr and its documented status, never a traceback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import pytest

from model.checkpoint import LoadedEncoder
from service.server import background_server, free_port
from tests.conftest import settings_for
from tools.cli import EXIT_AUTH, EXIT_FAILED_FILES, EXIT_OK, EXIT_REJECTED, EXIT_SERVER, EXIT_UNREACHABLE, EXIT_USAGE, main
from tools.client import RiceClient
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
KEYS = "reader-key-1:r,writer-key-1:rw"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("exit")
    settings = settings_for(tmp, port=0, api_keys=KEYS, read_requires_key=True, job_dir=str(tmp / "jobs"))
    with background_server(settings, encoder) as url:
        yield url


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> dict[str, Path]:
    """A flat catalog folder (images named by SKU), one image, a clip, a text file, a binary non-image."""
    d = tmp_path_factory.mktemp("files")
    flat = d / "flat"
    flat.mkdir()
    for p in products[:3]:
        cv2.imwrite(str(flat / f"{p.sku}.jpg"), p.image)
    one = d / "one.jpg"
    cv2.imwrite(str(one), products[3].image)
    clip = d / "clip.mp4"
    clip.write_bytes(clip_of(products[0], seed=3, frames=12))
    text = d / "notes.txt"
    text.write_text("just some notes\nnot a catalog\n")
    binary = d / "blob.dat"
    binary.write_bytes(bytes(range(256)) * 4)
    return {"flat": flat, "one": one, "clip": clip, "text": text, "binary": binary, "missing": d / "missing.jpg", "dir": d}


def run(args: list[str], capsys: pytest.CaptureFixture[str], tmp: Path) -> tuple[int, str, str]:
    """`rice ARGS` in this process (cwd: tmp, where ingest keeps its journal); (status, stdout, the error line)."""
    old = Path.cwd()
    os.chdir(tmp)
    try:
        code = main(args)
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rice ")]
    return code, out, lines[-1] if lines else err.strip()


def test_ingest_a_flat_folder_and_one_image(
    served: str, files: dict[str, Path], products: list[DemoProduct], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = ["--url", served, "--api-key", "writer-key-1", "--quiet"]
    code, out, _ = run(["ingest", str(files["flat"]), *key], capsys, tmp_path)
    assert code == EXIT_OK and out.startswith("3 ingested"), out
    code, out, _ = run(["ingest", str(files["one"]), *key], capsys, tmp_path)
    assert code == EXIT_OK and out.startswith("1 ingested"), out
    with RiceClient(served, "reader-key-1") as client:
        skus = {i.sku for i in client.list_items(limit=100).items}
    assert {p.sku for p in products[:3]} | {"one"} <= skus  # SKU = the file name stem


def test_every_documented_status_is_produced(
    served: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    reader = ["--url", served, "--api-key", "reader-key-1"]
    writer = ["--url", served, "--api-key", "writer-key-1"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 and nothing else")
    cases: list[tuple[list[str], int, str]] = [
        (["recognize", str(files["one"]), *reader], EXIT_OK, ""),
        (["recognize", str(files["one"]), str(broken), *reader], EXIT_FAILED_FILES, ""),
        (["recognize", str(files["missing"]), *reader], EXIT_USAGE, "missing.jpg"),
        (["recognize", str(files["one"]), "--url", f"http://127.0.0.1:{free_port()}"], EXIT_UNREACHABLE, "cannot connect"),
        (["recognize", str(files["one"]), "--url", served, "--api-key", "wrong-key-1"], EXIT_AUTH, "HTTP 401"),
        (["recognize", str(files["one"]), *reader, "--top-k", "100000"], EXIT_REJECTED, "less than or equal to 100"),
        (["gallery", "export", str(tmp_path / "exp"), *reader], EXIT_AUTH, "HTTP 403"),  # export needs the write right
        (["gallery", "export", str(tmp_path / "exp"), *writer], EXIT_OK, ""),
        (["gallery", "import", str(tmp_path / "nosuchdir"), *writer], EXIT_USAGE, "nosuchdir"),
        (["timeline", str(files["clip"]), "--url", served, "--api-key", "wrong-key-1", "--quiet"], EXIT_AUTH, "HTTP 401"),
        (["timeline", str(files["clip"]), *reader, "--window-s", "0", "--quiet"], EXIT_REJECTED, "window_s"),
        (["timeline", str(files["missing"]), *reader, "--quiet"], EXIT_USAGE, "missing.jpg"),
        (["serve", "--checkpoint", str(tmp_path / "nosuch.pt"), "--port", "0"], EXIT_USAGE, "checkpoint not found"),
    ]
    for args, status, says in cases:
        code, _, err = run(args, capsys, tmp_path)
        assert code == status, (args, code, err)
        assert says in err, (args, err)
    with failing_service() as url:  # 500 on every call
        for args in (["recognize", str(files["one"]), "--url", url], ["gallery", "export", str(tmp_path / "x"), "--url", url]):
            code, _, err = run(args, capsys, tmp_path)
            assert code == EXIT_SERVER and "HTTP 500" in err, (args, code, err)


URL_COMMANDS: dict[str, list[str]] = {  # each service-facing subcommand with a valid file argument (filled in below)
    "recognize": ["recognize", "{one}"],
    "ingest": ["ingest", "{flat}", "--quiet"],
    "timeline": ["timeline", "{clip}", "--quiet"],
    "gallery export": ["gallery", "export", "{dir}/export-try"],
    "gallery import": ["gallery", "import", "{dir}/backup"],
    "reindex": ["reindex", "--catalog", "{flat}", "--quiet"],
}


@pytest.mark.parametrize("command", sorted(URL_COMMANDS))
def test_each_command_meets_user_errors_in_one_line(
    command: str, served: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RICE_GALLERY_PATH", str(tmp_path / "reindex.db"))  # reindex's own store
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in URL_COMMANDS[command]]
    if command == "gallery import" and not (files["dir"] / "backup").exists():  # a real export to import
        assert main(["gallery", "export", str(files["dir"] / "backup"), "--url", served, "--api-key", "writer-key-1"]) == EXIT_OK
    for bad_url, hint in (("127.0.0.1:8000", "not an http(s) URL"), (f"{served}/v1", f"give the service's base URL ({served})")):
        code, _, err = run([*args, "--url", bad_url], capsys, tmp_path)
        assert code == EXIT_USAGE and hint in err, (command, bad_url, code, err)
    if command != "reindex":  # reindex talks to a server only to switch it, after embedding
        code, _, err = run([*args, "--url", served, "--api-key", "wrong-key-1"], capsys, tmp_path)
        assert code == EXIT_AUTH and "HTTP 401" in err, (command, code, err)
    # a missing file and a text file where the command wants its input
    position = 1 if command in ("recognize", "ingest", "timeline") else 2
    for bad in ("missing", "text", "binary"):
        wrong = list(args)
        if command == "gallery export":
            continue  # its argument is an output folder
        wrong[position] = str(files[bad])
        code, _, err = run([*wrong, "--url", served, "--api-key", "writer-key-1"], capsys, tmp_path)
        # recognize and timeline send a file the service cannot use and report it (1); the rest refuse it (2)
        expected = EXIT_FAILED_FILES if bad != "missing" and command in ("recognize", "timeline") else EXIT_USAGE
        assert code == expected, (command, bad, code, err)
        assert err.startswith(f"rice {command.split()[0]}") or code == EXIT_FAILED_FILES, (command, bad, err)


def test_the_real_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RICE_GALLERY_PATH": ":memory:"}
    cases = (
        (["serve", "--checkpoint", "nosuch.pt", "--port", "0"], EXIT_USAGE),
        (["recognize", "x.jpg", "--url", "localhost:8000"], EXIT_USAGE),
    )
    for args, status in cases:
        out = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == status, out.stderr[-2000:]
        lines = [line for line in out.stderr.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)]  # log lines aside
        assert len(lines) == 1 and lines[0].startswith(f"rice {args[0]}: "), out.stderr


class _Failing(BaseHTTPRequestHandler):
    def _fail(self) -> None:
        body = json.dumps({"error": {"code": "internal", "message": "internal server error"}}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _fail  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


class failing_service:  # noqa: N801 - used as a context manager, like open()
    """An HTTP server answering every request 500: the service failing, as the CLI sees it."""

    def __enter__(self) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
