"""The Python client (tools.client) against a real server over HTTP: typed answers, stills and
clips, retries that wait as long as Retry-After says, one error class per kind of failure, the
async client with many requests in flight, and gallery browsing with thumbnails."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, fields
from pathlib import Path

import cv2
import numpy as np
import pytest
from fastapi import Request, Response

from model.checkpoint import LoadedEncoder
from service.app import create_app
from service.schemas import FeedbackRecorded as FeedbackSchema
from service.schemas import GalleryItem as GalleryItemSchema
from service.schemas import RecognizeResponse, SkuResult
from service.server import background_server, free_port
from tests.conftest import jpeg, settings_for
from tests.serving_helpers import live_server, wait_until
from tools.client import (
    AsyncRiceClient,
    AuthError,
    Box,
    FeedbackRecorded,
    GalleryItem,
    GalleryPage,
    Match,
    Recognition,
    RequestRejected,
    RiceClient,
    ServerError,
    ServiceUnreachable,
    is_still,
)
from tools.democatalog import DemoProduct

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder, products: list[DemoProduct]) -> Iterator[str]:
    settings = settings_for(tmp_path_factory.mktemp("client"), port=0, api_keys="client-rw-key:rw,client-r-key:r")
    with background_server(settings, encoder) as url, RiceClient(url, api_key="client-rw-key") as client:
        for p in products:
            client.add_item(jpeg(p.image), p.sku, p.shop_id, f"{p.sku}-front", {"name": p.name})
        yield url


def test_typed_answers_for_clips_and_stills(
    served: str, products: list[DemoProduct], clip_of: Callable[..., bytes], tmp_path: Path
) -> None:
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), products[2].image)
    with RiceClient(served) as client:
        clip = client.recognize(clip_of(products[5], seed=7), top_k=3, filename="live.mp4")
        image = client.recognize(still, top_k=3)
        sniffed = client.recognize(still.read_bytes(), top_k=1)  # no name: the PNG signature says "still"
    assert isinstance(clip, Recognition) and all(isinstance(m, Match) for m in clip.results)
    assert clip.top is not None and clip.top.sku == products[5].sku and clip.frames_used == 10 and len(clip.results) == 3
    assert clip.top.metadata == {"name": products[5].name} and clip.top.item_id == f"{products[5].sku}-front"
    assert image.top is not None and image.top.sku == products[2].sku and image.frames_used == 1
    assert sniffed.frames_used == 1 and {"decode", "encode", "search", "total"} <= set(clip.timings_ms)


def test_answers_carry_every_field_of_the_http_answer(served: str, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    # the client's types name every field the service's schemas publish: a field added there fails here
    assert {f.name for f in fields(Recognition)} == set(RecognizeResponse.model_fields)
    assert {f.name for f in fields(Match)} == set(SkuResult.model_fields)
    assert {f.name for f in fields(FeedbackRecorded)} == set(FeedbackSchema.model_fields)
    assert {f.name for f in fields(GalleryItem)} == set(GalleryItemSchema.model_fields)
    with RiceClient(served) as client:
        answer = client.recognize(jpeg(products[3].image), top_k=3, filename="still.jpg")  # the catalog image itself: verified
        raw = client.http.post("/v1/recognize/image", params={"top_k": 3}, files={"file": ("s.jpg", jpeg(products[3].image))}).json()
    assert len(answer.request_id) == 32 and answer.request_id != raw["request_id"]  # each answer its own id
    assert answer.match_probability is not None and 0.0 <= answer.match_probability <= 1.0
    top = answer.top
    assert top is not None and top.sku == products[3].sku and top.source == "catalog"
    assert top.embedding_score is not None and top.inliers is not None and top.inliers > 0 and top.verifiable is True
    assert top.coverage is not None and top.frames_verified == 1
    assert isinstance(top.box, Box) and top.box.frame == 0 and len(top.box.polygon) == 4
    # the same values the HTTP answer has, field by field (the same image, the same gallery: the same answer)
    assert answer.match_probability == raw["match_probability"] and answer.match == raw["match"]
    assert [asdict(m) for m in answer.results] == raw["results"]  # box too: Box(frame, polygon) is {frame, polygon}


def test_feedback_on_an_answer_sync_and_async(served: str, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    with RiceClient(served, api_key="client-rw-key") as client:
        answer = client.recognize(clip_of(products[5], seed=11), top_k=3, filename="live.mp4")
        assert answer.top is not None
        confirmed = client.feedback(answer.request_id, "correct")
        assert isinstance(confirmed, FeedbackRecorded)
        assert (confirmed.request_id, confirmed.verdict, confirmed.sku, confirmed.replaced) == (
            answer.request_id,
            "correct",
            answer.top.sku,
            None,
        )
        other = next(p.sku for p in products if p.sku != answer.top.sku)
        corrected = client.feedback(answer.request_id, "wrong", sku=other, shop_id=answer.top.shop_id)
        assert (corrected.verdict, corrected.sku, corrected.replaced) == ("wrong", other, "correct")
        with pytest.raises(ValueError, match="verdict must be one of"):
            client.feedback(answer.request_id, "right")
        with pytest.raises(RequestRejected) as unknown:
            client.feedback("0" * 32, "none_of_these")
        assert unknown.value.status == 404
    with RiceClient(served, api_key="client-r-key") as reader, pytest.raises(AuthError):
        reader.feedback(answer.request_id, "correct")  # feedback needs a write key

    async def none_of_these() -> FeedbackRecorded:
        async with AsyncRiceClient(served, api_key="client-rw-key") as client:
            return await client.feedback(answer.request_id, "none_of_these")

    last = asyncio.run(none_of_these())
    assert (last.verdict, last.sku, last.replaced) == ("none_of_these", None, "wrong")


def test_each_kind_of_failure_has_its_error(served: str, products: list[DemoProduct]) -> None:
    image = jpeg(products[0].image)
    with RiceClient(served) as anonymous, RiceClient(served, api_key="client-r-key") as reader:
        with pytest.raises(AuthError) as no_key:
            anonymous.add_item(image, "X-1")
        with pytest.raises(AuthError) as no_right:
            reader.add_item(image, "X-1")
        with pytest.raises(RequestRejected) as unknown:
            RiceClient(served, api_key="client-rw-key").delete_item("no-such-item")
        with pytest.raises(RequestRejected) as not_media:
            anonymous.recognize(b"plain text, not a clip", filename="notes.mp4")
    assert (no_key.value.status, no_key.value.exit_code) == (401, 4)
    assert (no_right.value.status, no_right.value.code) == (403, "forbidden")
    assert (unknown.value.status, unknown.value.code, unknown.value.exit_code) == (404, "not_found", 5)
    assert not_media.value.status == 415
    with RiceClient(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(ServiceUnreachable) as refused:
        nowhere.info()
    assert refused.value.exit_code == 3 and "is the service running?" in refused.value.message


def test_retries_wait_as_long_as_retry_after_says(tmp_path: Path, encoder: LoadedEncoder, products: list[DemoProduct]) -> None:
    app = create_app(settings_for(tmp_path), encoder=encoder)
    seen: list[float] = []  # when each recognition reached the server
    busy_for = 2

    @app.middleware("http")
    async def overloaded_at_first(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path == "/v1/recognize/image":
            seen.append(time.monotonic())
            if len(seen) <= busy_for:
                return Response('{"error": {"code": "overloaded", "message": "queue full"}}', 429, headers={"Retry-After": "1"})
        return await call_next(request)

    image = jpeg(products[0].image)
    with live_server(app) as running, RiceClient(running.url) as client:
        wait_until(lambda: client.info() is not None, 60, "the service")
        client.add_item(image, products[0].sku)
        answer = client.recognize(image, filename="a.jpg")
        assert answer.top is not None and answer.top.sku == products[0].sku
        assert len(seen) == busy_for + 1
        assert all(b - a >= 0.95 for a, b in itertools.pairwise(seen))  # waited at least the second asked for

        seen.clear()
        with RiceClient(running.url, retries=1) as impatient, pytest.raises(ServerError) as gave_up:
            impatient.recognize(image, filename="a.jpg")
        assert (gave_up.value.status, gave_up.value.retry_after, gave_up.value.exit_code) == (429, 1.0, 6)
        assert len(seen) == 2  # one try, one retry


def test_async_client_many_in_flight(served: str, products: list[DemoProduct], clip_of: Callable[..., bytes]) -> None:
    clips = {p.sku: clip_of(p, seed=20 + i) for i, p in enumerate(products[:4])}

    async def all_at_once() -> list[Recognition]:
        async with AsyncRiceClient(served) as client:
            return await asyncio.gather(*(client.recognize(data, top_k=2, filename=f"{sku}.mp4") for sku, data in clips.items()))

    answers = asyncio.run(all_at_once())
    with RiceClient(served) as client:  # one at a time: the same answers, in the same order
        expected = [client.recognize(data, top_k=2, filename=f"{sku}.mp4") for sku, data in clips.items()]
    assert [[m.sku for m in a.results] for a in answers] == [[m.sku for m in e.results] for e in expected]
    assert all(abs(a.results[0].score - e.results[0].score) < 1e-4 for a, e in zip(answers, expected, strict=True))
    assert sum(a.top is not None and a.top.sku == sku for a, sku in zip(answers, clips, strict=True)) >= 3


def test_browse_the_gallery_with_thumbnails(served: str, products: list[DemoProduct]) -> None:
    with RiceClient(served) as client:
        page = client.list_items(limit=3)
        assert isinstance(page, GalleryPage) and page.total == len(products) and len(page.items) == 3
        rest = client.list_items(offset=3, limit=100)
        listed = [i.sku for i in page.items + rest.items]
        assert listed == sorted(p.sku for p in products)  # SKU order, every item once across pages
        shop = products[0].shop_id
        assert {i.sku for i in client.list_items(shop_id=shop).items} == {p.sku for p in products if p.shop_id == shop}
        assert [i.sku for i in client.list_items(sku=products[3].sku.lower()).items] == [products[3].sku]
        assert client.list_items(shop_id="no-such-shop").total == 0
        thumb = cv2.imdecode(np.frombuffer(client.thumbnail(f"{products[1].sku}-front"), np.uint8), cv2.IMREAD_COLOR)
        assert thumb is not None and max(thumb.shape[:2]) <= 128
        with pytest.raises(RequestRejected) as missing:
            client.thumbnail("no-such-item")
        assert missing.value.status == 404


@pytest.mark.parametrize(
    ("name", "head", "still"),
    [
        ("a.JPG", b"", True),
        ("clip.mp4", b"\x89PNG\r\n\x1a\n", False),  # the suffix decides when it names a known kind
        ("upload", b"\x89PNG\r\n\x1a\n\x00", True),
        ("upload", b"RIFF\x00\x00\x00\x00WEBPVP8 ", True),
        ("upload", b"\x00\x00\x00\x18ftypmp42", False),
        ("upload", b"\xff\xd8\xff\xe0", True),
    ],
)
def test_stills_are_told_from_clips(name: str, head: bytes, still: bool) -> None:
    assert is_still(name, head) is still
