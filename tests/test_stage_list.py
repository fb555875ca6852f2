"""The stage list is the seam for every request kind: a stage added to it runs for clips, images and
timeline windows, and a timeline recognises each piece of a recording as the clip endpoint does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from fastapi.testclient import TestClient

from model.checkpoint import LoadedEncoder
from pipeline.stages import Kind, Query
from service import state
from service.app import create_app
from tests.conftest import jpeg, settings_for
from tools.democatalog import DemoProduct
from tools.longclip import Part, TruthSegment, write_recording

pytestmark = pytest.mark.slow


class ToyRerank:
    """A re-ranking stage as a user would add one: it reverses the hits of every query it sees."""

    name = "toy_rerank"
    kinds: frozenset[Kind] = frozenset({"clip", "image", "window"})

    def __init__(self) -> None:
        self.seen: list[Kind] = []

    async def __call__(self, q: Query) -> None:
        self.seen.append(q.kind)
        q.hits = q.hits[::-1]


def _client(tmp: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> TestClient:
    client = TestClient(create_app(settings_for(tmp, job_dir=str(tmp / "jobs")), encoder=encoder))
    return client


def _add(client: TestClient, products: list[DemoProduct]) -> None:
    for p in products:
        r = client.post("/v1/gallery/items", files={"image": ("p.jpg", jpeg(p.image), "image/jpeg")}, data={"sku": p.sku})
        assert r.status_code == 201, r.text


def test_a_stage_added_to_the_list_runs_for_clips_images_and_timeline_windows(
    tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct], clip_of: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy = ToyRerank()
    monkeypatch.setattr(state, "STAGES", (*state.STAGES, lambda parts: toy))  # the one line a new stage needs
    rec = tmp_path / "rec.mp4"
    write_recording([Part(products[0].sku, 4)], products, rec, seed=1, fps=8)
    with _client(tmp_path, encoder, products) as client:
        _add(client, products[:4])
        assert toy.seen == []  # catalog images stop after embedding
        clip = client.post("/v1/recognize", params={"top_k": 3}, content=clip_of(products[0], seed=3))  # type: ignore[operator]
        image = client.post("/v1/recognize/image", params={"top_k": 3}, content=jpeg(products[1].image))
        timeline = client.post("/v1/recognize/timeline", content=rec.read_bytes())
    for r in (clip, image, timeline):
        assert r.status_code == 200, r.text
        assert r.json()["timings_ms"]["toy_rerank"] >= 0
    assert {"quality", "search", "regions"} <= timeline.json()["timings_ms"].keys()  # windows run what clips run
    assert set(toy.seen) == {"clip", "image", "window"} and toy.seen.count("window") == 2  # two 2-s windows
    scores = [h["score"] for h in image.json()["results"]]
    assert scores == sorted(scores)  # the toy stage's order reached the answer


def _cut(path: Path, truth: list[TruthSegment], fps: float) -> list[bytes]:
    """The recording's frames cut at the true boundaries, each piece an MP4 of its own."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    pieces = []
    for i, t in enumerate(truth):
        out = path.with_name(f"piece{i}.mp4")
        h, w = frames[0].shape[:2]
        writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
        for f in frames[round(t.start_s * fps) : round(t.end_s * fps)]:
            writer.write(f)
        writer.release()
        pieces.append(out.read_bytes())
    return pieces


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder, products: list[DemoProduct]) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("agree")
    with _client(tmp, encoder, products) as client:
        _add(client, [products[i] for i in (4, 7, 5, 0, 1, 2, 3, 6)])  # A, B, C and five distractors
        yield client


@pytest.mark.parametrize("size", [(640, 360), (320, 320)], ids=["16:9", "square"])
def test_a_timeline_names_what_the_clip_endpoint_names_for_each_piece(
    served: TestClient, products: list[DemoProduct], tmp_path: Path, size: tuple[int, int]
) -> None:
    a, b, c = products[4], products[7], products[5]
    fps = 8.0
    path = tmp_path / "rec.mp4"
    parts = [Part(a.sku, 6), Part(None, 5), Part(b.sku, 5), Part(c.sku, 5)]
    truth = write_recording(parts, products, path, seed=2, fps=fps, size=size, render_size=size)
    r = served.post("/v1/recognize/timeline", content=path.read_bytes())
    assert r.status_code == 200, r.text
    segments = r.json()["segments"]
    right = 0
    for t, piece in zip(truth, _cut(path, truth, fps), strict=True):
        answer = served.post("/v1/recognize", content=piece, params={"top_k": 3})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        clip_says = body["results"][0]["sku"] if body["match"] else None
        mid = (t.start_s + t.end_s) / 2
        seg = next(s for s in segments if s["start_s"] <= mid < s["end_s"])
        if clip_says is None:  # the clip says "none of these": the timeline names no product there with confidence
            assert seg["sku"] is None or not seg["match"], (t, seg, body["results"][:2])
        else:  # the timeline names the clip's product (a window's score may fall a little below the threshold)
            assert seg["sku"] == clip_says, (t, seg, body["results"][:2])
        assert clip_says in (t.sku, None)  # and neither names a wrong product
        right += clip_says == t.sku
    assert right >= 3  # most pieces named right (the empty room as none)


def test_timeline_regions_can_be_switched_off_for_windows_only(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    rec = tmp_path / "rec.mp4"
    write_recording([Part(products[0].sku, 2)], products, rec, seed=1, fps=8)
    app = create_app(settings_for(tmp_path, job_dir=str(tmp_path / "jobs"), timeline_regions=False), encoder=encoder)
    with TestClient(app) as client:
        _add(client, products[:2])
        timeline = client.post("/v1/recognize/timeline", content=rec.read_bytes())
        clip = client.post("/v1/recognize", content=rec.read_bytes())
    assert "regions" not in timeline.json()["timings_ms"] and "quality" in timeline.json()["timings_ms"]
    assert "regions" in clip.json()["timings_ms"]
