"""The running app: its API through gradio_client, and the page in a real browser (Chromium + Playwright)."""

import os
import shutil
import socket
from functools import partial
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

import playground
from ipag import Explainer
from scripts.stress import phone_photo, serve, soak

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
    details, region, gradcam, saliency, cross, relevance, occlusion = client.predict(
        handle_file(str(EXAMPLES / "coffee.jpg")), word, api_name="/explain")
    assert occlusion is None  # only when asked for
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
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])  # a synthetic webcam
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


# --- robustness and security of the running app (issue 6) ------------------------------------------------

def test_api_bad_input_battery(app_url, tmp_path):
    client = Client(app_url, verbose=False)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)
    for path, message in ((not_image, "Cannot read"), (bomb, "megapixels")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(path)), 1, 20, api_name="/caption")
    for query, message in (("", "empty"), ("x" * 10_000, "too long"), ("🙂", "no word")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), query, api_name="/explain")
    # and the app still works afterwards
    assert client.predict(handle_file(str(EXAMPLES / "rocket.jpg")), 1, 8, api_name="/caption")["words"]


def test_api_cannot_read_files_from_the_server(app_url, tmp_path_factory):
    """A client naming a server path instead of uploading gets an error, not that file's content."""
    import httpx

    secret = Path.home() / "ipag-secret-test.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    try:
        payload = {"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}, 1, 20]}
        posted = httpx.post(f"{app_url}gradio_api/call/caption", json=payload, timeout=30)
        if posted.status_code == 200:
            event = posted.json()["event_id"]
            stream = httpx.get(f"{app_url}gradio_api/call/caption/{event}", timeout=60).text
            assert "event: error" in stream and "complete" not in stream.split("event: error")[0]
        else:
            assert posted.status_code in (400, 403, 422)
    finally:
        secret.unlink()


def test_concurrent_clients_each_get_their_own_image(app_url, tmp_path):
    """Bounded, loopback-only: 6 clients at once on different images (20 in scripts/stress.py)."""
    from concurrent.futures import ThreadPoolExecutor

    local = Explainer.tiny(seed=0)
    paths = []
    for index in range(6):
        rng = __import__("numpy").random.default_rng(index)
        size = (40 + 7 * index, 30 + 5 * index)
        path = tmp_path / f"client{index}.png"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
        paths.append(path)

    def one_client(path):
        client = Client(app_url, verbose=False)
        caption = client.predict(handle_file(str(path)), 1, 6, api_name="/caption")
        result, region, gradcam, *_ = client.predict(handle_file(str(path)), caption["words"][0]["text"],
                                                     api_name="/explain")
        return path, caption, result, Image.open(gradcam).size

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(one_client, paths))
    for path, caption, result, size in outcomes:
        expected = local.caption(Image.open(path), max_new_tokens=6)
        assert caption["text"] == expected.text
        assert size == Image.open(path).size and result["image_size"] == list(Image.open(path).size)


def test_auth_protects_page_and_api():
    import httpx

    demo = playground.build_app(Explainer.tiny(seed=0))
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            auth=("ann", "secret"))
    try:
        assert httpx.get(f"{url}config", timeout=10).status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(handle_file(str(EXAMPLES / "coffee.jpg")), 1, 5, api_name="/caption")
        client = Client(url, auth=("ann", "secret"), verbose=False)
        assert client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), 1, 5, api_name="/caption")["words"]
    finally:
        demo.close()


def test_typed_script_never_runs_in_the_page(app_url, browser):
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(app_url)
    page.locator("#image input[type=file]").set_input_files(str(EXAMPLES / "coffee.jpg"))
    page.locator("#caption .token.highlighted").first.wait_for(timeout=60_000)
    attack = "<img src=x onerror=alert(1)><script>alert(2)</script> dog"
    box = page.locator("#query textarea, #query input").first
    box.fill(attack)
    box.press("Enter")
    page.locator("#status").get_by_text("Explained").wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    assert dialogs == []
    assert "<script>" in page.locator("#status").inner_text()  # shown as text, not run
    assert page.locator("#status img").count() == 0
    page.close()


def test_webcam_capture_is_captioned_end_to_end(app_url, browser):
    context = browser.new_context(permissions=["camera"])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app_url)
    page.locator("#image button[aria-label='Capture from camera']").click()
    page.get_by_text("Click to Access Webcam").click()
    # capture only once the (synthetic) camera delivers frames: a click before that captures nothing
    page.wait_for_function("() => [...document.querySelectorAll('#image video')].some(v => v.videoWidth > 0)",
                           timeout=30_000)
    page.locator("#image button[aria-label='capture photo']").click()
    words = page.locator("#caption .token.highlighted")
    words.first.wait_for(timeout=60_000)
    words.first.click()
    page.locator("#status").get_by_text("Explained").wait_for(timeout=60_000)
    assert page.locator("#map-gradcam img").count() == 1
    assert errors == []
    context.close()


def test_memory_levels_off_with_phone_photos(tmp_path):
    """Reduced `scripts/stress.py --photos phone`: 12-megapixel JPEGs (2048×1536 once loaded) uploaded through the
    API, every word of each caption precomputed, on a small cache. Before the cache was bounded in bytes, memory
    grew by ~50 MB a word of each photo."""
    budget_mb = 64
    explainer = Explainer.tiny(seed=0, cache_mb=budget_mb)
    demo, url = serve(explainer)
    try:
        samples = soak(url, explainer, 5, partial(phone_photo, tmp_path), max_tokens=5)
    finally:
        demo.close()
    assert all(sample.cache_mb <= budget_mb for sample in samples)
    # From the second photo on (the first one sets the working set's peak, which the allocator keeps):
    assert samples[-1].rss_mb - samples[1].rss_mb < budget_mb + 100  # MB: memory levels off...
    outside = [sample.rss_mb - sample.cache_mb for sample in samples]
    assert outside[-1] - outside[1] < 100  # ...and nothing grows but the cache, which counts what it holds
