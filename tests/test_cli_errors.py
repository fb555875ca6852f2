"""`rice recognize` and `rice ingest` as a user meets them: stills and clips in one run, CSV and
JSON output, a bad file among good ones, unknown shops, an empty gallery, and every user error as
one line with its own exit status (never a traceback)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.checkpoint import LoadedEncoder
from service.schemas import RecognizeResponse, SkuResult
from service.server import background_server, free_port
from tests.conftest import jpeg, settings_for
from tools.cli import EXIT_AUTH, EXIT_FAILED_FILES, EXIT_REJECTED, EXIT_UNREACHABLE, EXIT_USAGE, main
from tools.client import RiceClient
from tools.democatalog import DemoProduct, make_products

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def rice(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The real `rice` command in a child process: what a user's terminal shows. Run in `cwd`, where
    `rice ingest` keeps its default journal folder (never the repository)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder, products: list[DemoProduct]) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cli")
    with background_server(settings_for(tmp, port=0), encoder) as url, RiceClient(url) as client:
        for p in products:
            client.add_item(jpeg(p.image), p.sku, p.shop_id, f"{p.sku}-front")
        yield url


@pytest.fixture
def media(tmp_path: Path, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> Path:
    """A folder with a clip of product 1, a still of product 4 (PNG), and a clip of product 6."""
    d = tmp_path / "media"
    d.mkdir()
    (d / "a_clip.mp4").write_bytes(clip_of(products[1], seed=1))
    cv2.imwrite(str(d / "b_still.png"), products[4].image)
    (d / "c_clip.mp4").write_bytes(clip_of(products[6], seed=2))
    return d


def test_clips_and_stills_in_one_run_as_json(
    served: str, media: Path, products: list[DemoProduct], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recognize", str(media), "--url", served, "--top-k", "2", "--concurrency", "3", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [Path(a["path"]).name for a in answers] == ["a_clip.mp4", "b_still.png", "c_clip.mp4"]  # the order given
    assert [a["results"][0]["sku"] for a in answers] == [products[1].sku, products[4].sku, products[6].sku]
    assert [a["frames_used"] for a in answers] == [10, 1, 10]  # the still went to /v1/recognize/image
    assert all(a["status"] == 200 and isinstance(a["match"], bool) for a in answers)


def test_json_is_the_full_answer_and_the_table_says_why_no_match(
    served: str, media: Path, products: list[DemoProduct], capsys: pytest.CaptureFixture[str]
) -> None:
    absent = make_products(12, seed=31)[11].image  # a product of another catalog: not in the gallery
    cv2.imwrite(str(media / "d_absent.png"), absent)
    cv2.imwrite(str(media / "e_blank.png"), np.full((240, 320, 3), 128, np.uint8))  # no local features: no verification bonus
    assert main(["recognize", str(media), "--url", served, "--top-k", "2", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    # every field of the HTTP answer, for the answer and for each result (request_id: what feedback needs)
    assert all(set(a) == {"path", "status", *RecognizeResponse.model_fields} for a in answers)
    assert all(set(r) == set(SkuResult.model_fields) for a in answers for r in a["results"])
    assert all(len(a["request_id"]) == 32 and 0 <= a["match_probability"] <= 1 for a in answers)
    verified = answers[1]["results"][0]  # the still of a catalog product: verified, with where it is
    assert verified["inliers"] > 0 and len(verified["box"]["polygon"]) == 4 and verified["source"] == "catalog"
    no_match = [a for a in answers if not a["match"]]
    assert any(Path(a["path"]).name == "d_absent.png" for a in no_match)
    assert main(["recognize", str(media), "--url", served, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for a in no_match:  # the verdict decided: its probability (the threshold is GET /v1/info's, not the answer's)
        line = next(line for line in lines if line.startswith(a["path"] + ":"))
        assert line.endswith(f" [no match: match probability {a['match_probability']:.2f}]")
    assert main(["recognize", str(media), "--url", served, "--top-k", "2", "--min-score", "1.0"]) == 0
    lines = capsys.readouterr().out.splitlines()  # min_score set: the score threshold decided
    below = [a for a in answers if a["results"][0]["score"] < 1.0]  # (verification's bonus can lift a score above 1)
    assert below
    for a in below:
        line = next(line for line in lines if line.startswith(a["path"] + ":"))
        assert line.endswith(f" [no match: top-1 score {a['results'][0]['score']:.2f} < 1.00]")


def test_csv_output_and_a_bad_file_among_good_ones(
    served: str, media: Path, products: list[DemoProduct], capsys: pytest.CaptureFixture[str]
) -> None:
    (media / "d_broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    code = main(["recognize", str(media), "--url", served, "--csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert code == EXIT_FAILED_FILES  # the run went on; the bad file is reported
    assert [Path(r["path"]).name for r in rows] == ["a_clip.mp4", "b_still.png", "c_clip.mp4", "d_broken.mp4"]
    assert [r["sku"] for r in rows[:3]] == [products[1].sku, products[4].sku, products[6].sku]
    assert all(r["status"] == "200" and r["match"] in ("true", "false") and len(r["top_k"].split(";")) == 5 for r in rows[:3])
    assert rows[3]["status"] in ("415", "422") and rows[3]["error"] and rows[3]["sku"] == ""


def test_unknown_shop_and_empty_gallery_say_so(
    served: str, media: Path, tmp_path: Path, encoder: LoadedEncoder, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = str(media / "a_clip.mp4")
    assert main(["recognize", clip, "--url", served, "--shop-id", "no-such-shop"]) == 0
    out = capsys.readouterr().out
    assert "shop 'no-such-shop' has no items; the gallery holds 8 items in 2 shops" in out and "empty gallery" not in out
    with background_server(settings_for(tmp_path / "empty", port=0), encoder) as empty:
        assert main(["recognize", clip, "--url", empty]) == 0
    assert "(empty gallery: add items with `rice ingest`)" in capsys.readouterr().out


def test_a_parameter_the_server_rejects_stops_the_run_in_one_line(served: str, media: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recognize", str(media), "--url", served, "--top-k", "100000"]) == EXIT_REJECTED
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HTTP 422 invalid_request: query.top_k: Input should be less than or equal to 100" in err
    assert main(["recognize", str(media), "--url", served, "--num-frames", "0"]) == EXIT_REJECTED  # a 422, not the file's fault
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HTTP 422 invalid_request" in err and "num_frames" in err


def test_no_server_is_one_line_and_exit_3(tmp_path: Path, media: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["recognize", str(media)], ["ingest", str(media)]):
        out = rice(*args, "--url", url, cwd=tmp_path)
        assert out.returncode == EXIT_UNREACHABLE, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
        assert "cannot connect to" in out.stderr and "is the service running?" in out.stderr


def test_refused_keys_are_one_line_and_exit_4(tmp_path: Path, encoder: LoadedEncoder, media: Path, products: list[DemoProduct]) -> None:
    catalog = tmp_path / "catalog" / products[0].sku
    catalog.mkdir(parents=True)
    cv2.imwrite(str(catalog / "front.jpg"), products[0].image)
    settings = settings_for(tmp_path, port=0, api_keys="reader-key-1:r,writer-key-1:rw", read_requires_key=True)
    with background_server(settings, encoder) as url:
        no_key = rice("recognize", str(media), "--url", url, cwd=tmp_path)
        read_only = rice("ingest", str(catalog.parent), "--url", url, "--api-key", "reader-key-1", "--quiet", cwd=tmp_path)
        ok = rice("ingest", str(catalog.parent), "--url", url, "--api-key", "writer-key-1", "--quiet", cwd=tmp_path)
    for out, status in ((no_key, "HTTP 401"), (read_only, "HTTP 403")):
        assert out.returncode == EXIT_AUTH, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and status in out.stderr and out.stderr.strip().count("\n") == 0
    assert ok.returncode == 0, ok.stderr


def test_local_mistakes_are_usage_errors(served: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recognize", str(tmp_path / "missing.mp4"), "--url", served]) == EXIT_USAGE
    assert "missing.mp4" in capsys.readouterr().err
    bad = tmp_path / "catalog.csv"
    bad.write_text('path,sku,metadata\nimg/a.jpg,SKU-1,"{not json"\n')
    assert main(["ingest", str(bad), "--url", served, "--state", str(tmp_path / "j.jsonl")]) == EXIT_USAGE
    assert "catalog.csv:2: metadata is not valid JSON" in capsys.readouterr().err


def test_reindex_user_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = tmp_path / "catalog"
    catalog.mkdir()
    monkeypatch.setenv("RICE_GALLERY_PATH", str(tmp_path / "g.db"))
    assert main(["reindex", "--checkpoint", str(tmp_path / "missing.pt"), "--quiet"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"rice reindex: checkpoint not found: {tmp_path / 'missing.pt'}"
    assert main(["reindex", "--quiet"]) == EXIT_USAGE  # an empty gallery and no --catalog: nothing to do
    assert capsys.readouterr().err.strip() == "rice reindex: nothing to reindex: the gallery has no items and no --catalog was given"
    assert main(["reindex", "--catalog", str(catalog), "--quiet"]) == EXIT_USAGE
    assert "no images" in capsys.readouterr().err
    monkeypatch.setenv("RICE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # no Redis there
    assert main(["reindex", "--quiet"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err.strip()
    assert err.startswith("rice reindex: cannot use the gallery store (redis:") and "\n" not in err
