"""The service's page in a real headless browser (Debian's chromium driven by Playwright): pick a photo, read
the answer from the page; and the page needs nothing from outside the service."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from pipeline.models.predict import PredictConfig, predict
from tests.live_server import live_server, make_tiny_head

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
import pipeline  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
#: a headless chromium that reaches for nothing but the page it is given
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.filterwarnings("ignore:.*has random weights", "ignore:no sidecar")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    head = make_tiny_head(tmp_path_factory.mktemp("page"))
    with live_server(pipeline.serve_app(head, precision="fp32")) as url:
        yield head, url


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def noisy_photo(path, rgb, size, seed):
    """A JPEG of one colour with noise, ``size`` (height, width)."""
    rng = np.random.default_rng(seed)
    Image.fromarray(np.clip(rng.normal(rgb, 30, (*size, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


def test_the_page_is_one_file_with_no_external_resource():
    from pipeline.serving.service import page_html

    html = page_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html
    assert 'type="file"' in html and "predict?top=" in html


def test_a_photo_picked_on_the_page_shows_predicts_class_bars_and_time(served, browser, tmp_path):
    head, url = served
    photo = noisy_photo(tmp_path / "my red photo.jpg", (210, 40, 40), (60, 70), seed=1)
    want = predict(PredictConfig(paths=[str(photo)], model=str(head), workers=0, precision="fp32")).rows[0]

    page = browser.new_page()
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('about').textContent.includes('3 classes')")
    page.set_input_files("#picker", str(photo))
    card = page.locator(".card[data-status=done]")
    card.wait_for(timeout=30_000)
    assert card.locator(".name").inner_text() == photo.name
    assert card.locator(".best .class").inner_text() == want["class"]
    labels = card.locator(".bar .label").all_inner_texts()
    assert labels[0] == want["class"] and sorted(labels) == ["blue", "green", "red"]
    percents = [float(t.rstrip("%")) for t in card.locator(".bar .pct").all_inner_texts()]
    assert percents == sorted(percents, reverse=True) and abs(percents[0] - 100 * want["probability"]) < 0.06
    assert re.fullmatch(r"\d+ ms, \d+ ms in the service", card.locator(".time").inner_text())
    assert card.locator(".unknown").count() == int(want["unknown"])  # the badge when predict says unknown
    assert requested and all(u.startswith(url) or u.startswith("blob:") for u in requested), requested
    page.close()


def test_a_file_that_is_no_image_shows_its_reason(served, browser, tmp_path):
    _, url = served
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo")
    page = browser.new_page()
    page.goto(url + "/")
    page.set_input_files("#picker", str(bad))
    card = page.locator(".card[data-status=error]")
    card.wait_for(timeout=30_000)
    assert card.locator(".error").inner_text().startswith("Not classified: not an image")
    page.close()


def test_a_photo_picked_before_the_page_knows_the_classes_waits_for_them(served, browser, tmp_path):
    """/info held back until the photo is picked: the page asked for the top 5 of a 3-class head (a 400)."""
    _, url = served
    photo = noisy_photo(tmp_path / "blue.jpg", (40, 60, 200), (50, 60), seed=3)
    page = browser.new_page()
    held = []
    page.route("**/info", lambda route: held.append(route))
    page.goto(url + "/")
    page.set_input_files("#picker", str(photo))
    page.wait_for_function("document.querySelector('.card') !== null")
    page.wait_for_timeout(300)  # the old page had sent its request by now
    assert len(held) == 1
    held[0].continue_()
    card = page.locator(".card[data-status]")
    card.wait_for(timeout=30_000)
    assert card.get_attribute("data-status") == "done", card.inner_text()
    assert sorted(card.locator(".bar .label").all_inner_texts()) == ["blue", "green", "red"]
    page.close()


def test_each_photo_on_the_page_shows_its_heatmap_under_it(served, browser, tmp_path):
    _, url = served
    photo = noisy_photo(tmp_path / "green.jpg", (40, 190, 60), (50, 60), seed=2)
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('about').textContent.includes('3 classes')")
    page.set_input_files("#picker", str(photo))
    card = page.locator(".card[data-status=done]")
    card.wait_for(timeout=30_000)
    heat = card.locator("img.heatmap")
    assert heat.get_attribute("src").startswith("data:image/jpeg;base64,")
    assert heat.evaluate("im => im.complete && im.naturalWidth") == 32  # decoded: the tiny backbone's crop
    assert card.locator(".why").inner_text().startswith("Red: where the model saw ")
    page.close()


def test_an_animated_gif_on_the_page_says_its_first_frame_was_used(served, browser, tmp_path):
    """The page showed an animated GIF's class as any photo's: now a note under it says the first frame was used."""
    _, url = served
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (40, 32), c) for c in [(250, 20, 20), (20, 250, 20)]]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('about').textContent.includes('3 classes')")
    page.set_input_files("#picker", str(gif))
    card = page.locator(".card[data-status=done]")
    card.wait_for(timeout=30_000)
    assert card.locator(".note").inner_text().startswith("Note: the first of its 2 frames was classified")
    page.close()
