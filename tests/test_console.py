"""The web console in a real headless browser (Debian's chromium through chromedriver): it loads
from the app itself, recognises an uploaded clip with the right SKU and its thumbnail, browses,
adds and deletes gallery items, draws a timeline strip, and sends the API key when keys are set.
The result view's screenshot is made every run; it replaces docs/console.png (the README shows it)
when that file is missing or RICE_UPDATE_SCREENSHOT=1, so a test run does not dirty the checkout."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.checkpoint import LoadedEncoder
from service.server import background_server
from tests.conftest import jpeg, settings_for
from tools.client import RiceClient
from tools.democatalog import DemoProduct

pytestmark = [pytest.mark.integration, pytest.mark.slow]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency: pip install -e .[dev]")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "console.png"
WAIT_S = 60  # generous: CI machines are loaded


def _browser_binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the console test needs chromium and chromedriver: `make browser` installs them (apt-get)")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binary, driver_path = _browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=980,760"):
        options.add_argument(flag)
    # An explicit chromedriver: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, encoder: LoadedEncoder, products: list[DemoProduct]) -> Iterator[str]:
    """A real server whose gallery holds the eight products (thumbnails made at ingest)."""
    tmp = tmp_path_factory.mktemp("console")
    with background_server(settings_for(tmp, port=0), encoder) as url, RiceClient(url) as client:
        for p in products:
            client.add_item(jpeg(p.image), p.sku, p.shop_id, f"{p.sku}-front", {"name": f"product {p.sku}"}, filename="front.jpg")
        yield url


def _wait(browser: WebDriver, cond: Callable[[WebDriver], object], what: str) -> None:
    WebDriverWait(browser, WAIT_S).until(cond, message=f"timed out waiting for {what}")


def _open(browser: WebDriver, url: str) -> None:
    browser.get(url + "/")
    _wait(browser, lambda b: _text(b, "model").startswith("model "), "the model line")


def _attrs(browser: WebDriver, css: str, attr: str) -> list[str]:
    """An attribute of every element matching `css`, read in one script (the page may re-render between two reads)."""
    script = f"return Array.from(document.querySelectorAll({css!r}), e => e.getAttribute({attr!r}));"
    return list(browser.execute_script(script))


def _text(browser: WebDriver, element_id: str) -> str:
    return str(browser.execute_script(f"return document.getElementById({element_id!r}).textContent;"))


def _thumbnail_loaded(browser: WebDriver, css: str) -> bool:
    return bool(browser.execute_script(f"const i = document.querySelector({css!r}); return !!i && i.complete && i.naturalWidth > 0;"))


def _screenshot_path(tmp_path: Path) -> Path:
    if not SCREENSHOT.exists() or os.environ.get("RICE_UPDATE_SCREENSHOT") == "1":
        return SCREENSHOT
    return tmp_path / SCREENSHOT.name


def test_upload_a_clip_and_see_the_right_sku(
    browser: WebDriver, served: str, products: list[DemoProduct], clip_of: Callable[..., bytes], tmp_path: Path
) -> None:
    target = products[3]
    clip = tmp_path / "seller.mp4"
    clip.write_bytes(clip_of(target, seed=11))
    _open(browser, served)
    assert "8 items" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("3")
    browser.find_element(By.ID, "query-file").send_keys(str(clip))
    browser.find_element(By.ID, "recognize-button").click()
    _wait(browser, lambda b: _attrs(b, "#results li.result", "data-sku"), "results")

    cards = browser.find_elements(By.CSS_SELECTOR, "#results li.result")
    assert len(cards) == 3
    assert cards[0].get_attribute("data-sku") == target.sku
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.get_attribute("data-match") in ("true", "false")
    assert target.sku in verdict.text
    timings = browser.find_element(By.ID, "timings").text
    assert all(stage in timings for stage in ("decode", "encode", "search", "total")) and "10 frame(s)" in timings
    _wait(browser, lambda b: _thumbnail_loaded(b, "#results li.result img"), "the top result's thumbnail")
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None  # no error shown

    png = browser.get_screenshot_as_png()
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    # down to the end of the result view (CSS pixels times the device's pixel ratio), no blank page below it
    bottom = browser.execute_script("return (document.getElementById('result').getBoundingClientRect().bottom + 8) * devicePixelRatio;")
    image = image[: min(image.shape[0], int(bottom))]
    small = cv2.resize(image, (image.shape[1] * 3 // 4, image.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
    out = _screenshot_path(tmp_path)
    out.parent.mkdir(exist_ok=True)
    assert cv2.imwrite(str(out), small, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert out.stat().st_size < 200_000


def test_a_still_goes_to_the_image_endpoint(browser: WebDriver, served: str, products: list[DemoProduct], tmp_path: Path) -> None:
    target = products[5]
    still = tmp_path / "shelf.png"
    cv2.imwrite(str(still), target.image)
    _open(browser, served)
    browser.find_element(By.ID, "query-file").send_keys(str(still))
    browser.find_element(By.ID, "recognize-button").click()
    _wait(browser, lambda b: "1 frame(s)" in _text(b, "timings"), "an image answer")
    assert _attrs(browser, "#results li.result", "data-sku")[0] == target.sku
    assert "match probability" in _text(browser, "verdict")
    # verified: the catalog image's corners drawn over the still (the product fills it: about its corners)
    _wait(browser, lambda b: len(_attrs(b, "#box-overlay polygon", "points")) == 1, "the product's box over the still")
    corners = [[float(v) for v in p.split(",")] for p in _attrs(browser, "#box-overlay polygon", "points")[0].split()]
    h, w = target.image.shape[:2]
    assert len(corners) == 4 and np.abs(np.array(corners) - [[0, 0], [w, 0], [w, h], [0, h]]).max() < 0.05 * max(h, w)
    assert _attrs(browser, "#located", "hidden") == [None] and "matching keypoints" in _text(browser, "located-caption")
    # The feedback control under the answer: a verdict on it goes to POST /v1/feedback.
    browser.find_element(By.CSS_SELECTOR, "#results li.result.top button").click()
    _wait(browser, lambda b: "correct (" in _text(b, "feedback-status") and "recorded" in _text(b, "feedback-status"), "the verdict")
    browser.find_element(By.ID, "none-of-these").click()
    _wait(browser, lambda b: "none_of_these recorded" in _text(b, "feedback-status"), "the second verdict")

    browser.find_element(By.ID, "shop-id").send_keys("no-such-shop")  # an unknown shop is not "an empty gallery"
    browser.find_element(By.ID, "recognize-button").click()
    _wait(browser, lambda b: 'shop "no-such-shop" has no items (the gallery holds 8)' in _text(b, "verdict"), "the unknown-shop verdict")
    assert _attrs(browser, "#results li.result", "data-sku") == []


def test_browse_search_add_and_delete(browser: WebDriver, served: str, products: list[DemoProduct], tmp_path: Path) -> None:
    _open(browser, served)
    browser.find_element(By.CSS_SELECTOR, ".tab[data-tab=gallery]").click()
    _wait(browser, lambda b: len(_attrs(b, "#items li.item", "data-item")) == len(products), "the gallery page")
    assert f"of {len(products)}" in browser.find_element(By.ID, "browse-count").text
    _wait(browser, lambda b: _thumbnail_loaded(b, "#items li.item img"), "gallery thumbnails")

    # search by SKU text
    wanted = products[2].sku
    browser.find_element(By.ID, "browse-sku").send_keys(wanted.lower())
    browser.find_element(By.CSS_SELECTOR, "#browse-form button[type=submit]").click()
    _wait(browser, lambda b: _attrs(b, "#items li.item", "data-sku") == [wanted], "one item")

    # add an item through the form; the list then shows it (searched by its SKU)
    image = tmp_path / "new.jpg"
    cv2.imwrite(str(image), np.full((96, 64, 3), (30, 160, 220), np.uint8))
    browser.find_element(By.CSS_SELECTOR, "#tab-gallery details summary").click()
    browser.find_element(By.ID, "add-image").send_keys(str(image))
    browser.find_element(By.ID, "add-sku").send_keys("NEW-SKU-1")
    browser.find_element(By.ID, "add-shop").send_keys("shop-new")
    browser.find_element(By.ID, "add-item-id").send_keys("new-item-1")
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    _wait(browser, lambda b: _attrs(b, "#items li.item", "data-item") == ["new-item-1"], "the new item")
    with RiceClient(served) as client:
        assert [i.item_id for i in client.list_items(sku="NEW-SKU").items] == ["new-item-1"]

        # delete it: two clicks, then it is gone from the page and from the service
        delete = browser.find_element(By.XPATH, "//li[@data-item='new-item-1']//button[text()='Delete']")
        delete.click()
        browser.find_element(By.XPATH, "//li[@data-item='new-item-1']//button[text()='Really delete?']").click()
        _wait(browser, lambda b: "no items" in _text(b, "browse-count"), "the deletion")
        assert client.list_items(sku="NEW-SKU").total == 0
        assert client.stats()["items"] == len(products)


def test_timeline_strip(
    browser: WebDriver, served: str, clip_of: Callable[..., bytes], products: list[DemoProduct], tmp_path: Path
) -> None:
    _open(browser, served)
    browser.find_element(By.CSS_SELECTOR, ".tab[data-tab=timeline]").click()
    # The strip drawn from an answer of the timeline shape: positions and widths follow the times.
    answer = {
        "duration_s": 10.0,
        "segments": [
            {"start_s": 0.0, "end_s": 4.0, "sku": "A", "score": 0.8, "item_id": "a", "match": True, "alternatives": []},
            {"start_s": 4.0, "end_s": 5.0, "sku": None, "score": None, "item_id": None, "match": False, "alternatives": []},
            {
                "start_s": 5.0,
                "end_s": 10.0,
                "sku": "B",
                "score": 0.7,
                "item_id": "b",
                "match": True,
                "alternatives": [{"sku": "A", "score": 0.5}],
            },
        ],
    }
    browser.execute_script("window.riceConsole.renderTimeline(arguments[0]);", answer)
    segs = browser.find_elements(By.CSS_SELECTOR, "#strip .seg")
    assert [s.text for s in segs] == ["A", "no match", "B"]
    widths = [s.size["width"] for s in segs]
    assert widths[0] == pytest.approx(4 * widths[1], rel=0.1) and widths[2] == pytest.approx(5 * widths[1], rel=0.1)
    assert "also A 0.50" in browser.find_element(By.ID, "segments").text

    # Against this server: a real recording's strip where the timeline endpoint exists, else a clear message.
    clip = tmp_path / "recording.mp4"
    clip.write_bytes(clip_of(products[0], seed=3, frames=30))
    browser.find_element(By.ID, "timeline-file").send_keys(str(clip))
    browser.find_element(By.CSS_SELECTOR, "#timeline-form button[type=submit]").click()
    has_endpoint = any(getattr(r, "path", "") == "/v1/recognize/timeline" for r in _routes(served))
    if has_endpoint:
        _wait(browser, lambda b: products[0].sku in _text(b, "segments"), "the recording's timeline")
    else:
        _wait(browser, lambda b: "no timeline endpoint" in _text(b, "error"), "the missing-endpoint message")


def _routes(url: str) -> list[object]:
    import httpx

    paths = httpx.get(f"{url}/openapi.json", timeout=30).json()["paths"]
    return [type("Route", (), {"path": p})() for p in paths]


def test_the_api_key_travels_with_every_call(
    tmp_path: Path, encoder: LoadedEncoder, browser: WebDriver, products: list[DemoProduct]
) -> None:
    keys = "console-rw-key:rw,console-r-key:r"
    settings = settings_for(tmp_path, api_keys=keys, read_requires_key=True, port=0)
    with background_server(settings, encoder) as url:
        with RiceClient(url, api_key="console-rw-key") as client:
            client.add_item(jpeg(products[0].image), products[0].sku, item_id="keyed-1")
        browser.get(url + "/")
        browser.execute_script("sessionStorage.clear()")
        _open(browser, url)  # /v1/info stays open
        browser.find_element(By.CSS_SELECTOR, ".tab[data-tab=gallery]").click()
        _wait(browser, lambda b: "HTTP 401" in _text(b, "error"), "the ask for a key")
        browser.find_element(By.ID, "api-key").send_keys("console-r-key")
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        browser.find_element(By.CSS_SELECTOR, "#browse-form button[type=submit]").click()
        _wait(browser, lambda b: _attrs(b, "#items li.item", "data-item") == ["keyed-1"], "the keyed gallery")
        _wait(browser, lambda b: _thumbnail_loaded(b, "#items li.item img"), "a thumbnail fetched with the key")
        # a read-only key cannot delete: the page says why, the item stays
        browser.find_element(By.XPATH, "//li[@data-item='keyed-1']//button[text()='Delete']").click()
        browser.find_element(By.XPATH, "//li[@data-item='keyed-1']//button[text()='Really delete?']").click()
        _wait(browser, lambda b: "HTTP 403" in _text(b, "error"), "the refusal")
        browser.execute_script("sessionStorage.clear()")


def test_an_error_clears_the_previous_verdict_and_try_uses_its_own_top_k(
    browser: WebDriver, served: str, products: list[DemoProduct], tmp_path: Path
) -> None:
    still = tmp_path / "shelf.png"
    cv2.imwrite(str(still), products[2].image)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 and nothing else")
    _open(browser, served)
    browser.find_element(By.ID, "query-file").send_keys(str(still))
    browser.find_element(By.ID, "recognize-button").click()
    _wait(browser, lambda b: "1 frame(s)" in _text(b, "timings"), "an image answer")
    browser.find_element(By.ID, "query-file").send_keys(str(broken))
    browser.find_element(By.ID, "recognize-button").click()
    _wait(browser, lambda b: _text(b, "error").startswith("HTTP 4"), "the error")
    assert browser.find_element(By.ID, "result").get_attribute("hidden") is not None  # no stale verdict under the error

    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("5")
    browser.find_element(By.ID, "shop-id").send_keys("no-such-shop")  # the Recognize tab's shop must not leak into Try
    browser.find_element(By.CSS_SELECTOR, '.tab[data-tab="gallery"]').click()
    _wait(browser, lambda b: _attrs(b, "#items li.item", "data-sku"), "the gallery list")
    browser.find_element(By.ID, "try-top-k").clear()
    browser.find_element(By.ID, "try-top-k").send_keys("2")
    browser.find_element(By.CSS_SELECTOR, f'#items li.item[data-sku="{products[0].sku}"] button').click()
    _wait(browser, lambda b: len(_attrs(b, "#results li.result", "data-sku")) == 2, "two results (Try's own top k)")
    assert _attrs(browser, "#results li.result", "data-sku")[0] == products[0].sku
