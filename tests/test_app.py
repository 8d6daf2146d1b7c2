"""The running app: its API through gradio_client, and the page in a real browser (Chromium + Playwright)."""

import os
import shutil
import socket
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import playground
from ipag import Explainer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    """The playground in tiny mode, served on loopback for the tests of this module."""
    demo = playground.build_app(Explainer.tiny(seed=0))
    demo.queue(default_concurrency_limit=2)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            quiet=True, theme=playground.THEME)
    yield url
    demo.close()


def test_api_caption_and_explain_through_gradio_client(app_url):
    client = Client(app_url, verbose=False)
    caption = client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), 1, 12, api_name="/caption")
    assert caption["text"] and caption["words"]
    word = caption["words"][1]["text"]
    details, region, gradcam, saliency, cross, relevance = client.predict(
        handle_file(str(EXAMPLES / "coffee.jpg")), word, api_name="/explain")
    assert details["words"] == [word] and details["in_caption"]
    assert details["grounding"]["candidates"]
    assert client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), word, "HiResCAM", api_name="/explain")[0][
        "maps"]["gradcam"]["method"] == "HiResCAM"
    size = Image.open(EXAMPLES / "coffee.jpg").size
    for path in (region, gradcam, saliency, cross, relevance):
        assert Image.open(path).size == size


def test_api_reports_bad_input_as_an_error(app_url):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="empty"):
        client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), "   ", api_name="/explain")


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: the README's test command installs it (apt-get install chromium).")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_click_a_word_in_a_real_browser(app_url, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app_url)

    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / "chelsea.jpg"))
    words = page.locator("#caption .token.highlighted")
    words.first.wait_for(timeout=60_000)
    assert words.count() >= 1

    words.nth(min(1, words.count() - 1)).click()
    page.locator("#status").get_by_text("Explained").wait_for(timeout=60_000)
    for element in ("#region", "#map-gradcam", "#map-saliency"):
        image = page.locator(f"{element} img")
        image.wait_for(timeout=30_000)
        assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", image.element_handle())
    assert page.locator("#trust").get_by_text("Word probability").count() == 1

    page.locator("#query textarea, #query input").first.fill("red car")
    page.locator("#query textarea, #query input").first.press("Enter")
    page.locator("#status").get_by_text("after the prompt").wait_for(timeout=60_000)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert errors == [], errors
    page.close()
