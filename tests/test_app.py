"""The running app: its API through gradio_client, and the page in a real browser (Chromium + Playwright)."""

import os
import re
import shutil
import time
from functools import partial
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from ipag import Explainer, Settings, ui
from tests.helpers import expected_maps
from scripts.stress import phone_photo, serve, soak

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: The example scene the synthetic-mode test clicks (scene 8: the shipped models name its first shape right).
SYNTHETIC_EXAMPLE = 5


@pytest.fixture(scope="module")
def app():
    """The playground in tiny mode, served on loopback for the tests of this module: (url, explainer)."""
    explainer = Explainer.tiny(seed=0)
    demo, url = serve(explainer)
    yield url, explainer
    demo.close()


@pytest.fixture(scope="module")
def app_url(app):
    return app[0]


def test_api_caption_and_explain_through_gradio_client(app, monkeypatch):
    url, explainer = app
    started = []
    monkeypatch.setattr(explainer, "precompute_async", lambda *args: started.append(args))
    client = Client(url, verbose=False)
    photo = handle_file(str(EXAMPLES / "coffee.jpg"))
    caption = client.predict(photo, 1, 12, api_name="/caption")
    assert caption["text"] and caption["words"]
    word = caption["words"][1]["text"]
    occurrence = [w["text"] for w in caption["words"][:2]].count(word)  # tiny captions repeat words
    result = client.predict(photo, text=word, occurrence=occurrence, settings={"max_new_tokens": 12},
                            api_name="/explain")
    details, images = result["explanation"], result["images"]
    assert set(images) == {"region"} | expected_maps(explainer.captioner)  # by name
    assert details["words"] == [word] and details["in_caption"] and details["word_indices"] == [1]
    assert details["grounding"]["candidates"] and details["settings"]["max_new_tokens"] == 12
    size = Image.open(EXAMPLES / "coffee.jpg").size
    assert all(Image.open(path).size == size for path in images.values())
    other = client.predict(photo, word=0, settings={"cam_method": "HiResCAM", "occlusion": True}, api_name="/explain")
    assert other["explanation"]["maps"]["gradcam"]["method"] == "HiResCAM" and "occlusion" in other["images"]
    assert other["explanation"]["word_indices"] == [0]
    assert started == []  # the API starts nothing in the background unless asked
    client.predict(photo, 1, 12, True, api_name="/caption")
    assert len(started) == 1


def test_no_event_animates_its_progress_over_every_output():
    """Gradio draws a spinner and a timer over each output of a running event; over the dozen outputs of an
    upload or a click, drawing them took the browser more CPU than the caption it waited for. Events with many
    outputs show their progress on one or two of them: the caption while it is written, the large view and the
    status line while a word is explained."""
    import playground

    demo = playground.build_app(Explainer.tiny(seed=0))
    ids = {block.elem_id: block._id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    shown = {}
    for dependency in demo.config["dependencies"]:
        if dependency["show_progress"] != "hidden" and len(dependency["outputs"]) > 3:
            assert dependency["show_progress_on"], dependency["targets"]
            shown[tuple(dependency["targets"])] = set(dependency["show_progress_on"])
    assert {ids["caption"]} in shown.values() and {ids["picture"], ids["status"]} in shown.values()


def test_the_queue_polls_every_20_ms_not_every_millisecond():
    """Gradio's queue polls every millisecond while no event waits; beside the model worker on 2 cores that made
    generation 15% slower. The page's queue polls at `QUEUE_POLL_S`, through attributes Gradio's loops read."""
    import inspect

    import gradio.queueing

    import playground

    demo = playground.queue(playground.build_app(Explainer.tiny(seed=0)))
    assert demo._queue.sleep_when_free == playground.QUEUE_POLL_S >= 0.01
    assert demo._queue.progress_update_sleep_when_free == playground.PROGRESS_POLL_S >= 0.01
    assert "self.sleep_when_free" in inspect.getsource(gradio.queueing.Queue.start_processing)
    assert "self.progress_update_sleep_when_free" in inspect.getsource(gradio.queueing.Queue.start_progress_updates)


def test_api_reports_bad_input_as_an_error(app_url):
    client = Client(app_url, verbose=False)
    photo = handle_file(str(EXAMPLES / "coffee.jpg"))
    with pytest.raises(Exception, match="either a word position"):
        client.predict(photo, text="   ", api_name="/explain")
    with pytest.raises(Exception, match="Unknown setting"):
        client.predict(photo, word=0, settings={"no_such_setting": 1}, api_name="/explain")
    with pytest.raises(Exception, match="out of range"):
        client.predict(photo, word=99, api_name="/explain")


def test_api_errors_arrive_as_plain_text(app_url):
    """Escaping belongs to the page's HTML, not to the data: quotes and brackets arrive as the caller sent them."""
    client = Client(app_url, verbose=False)
    photo = handle_file(str(EXAMPLES / "coffee.jpg"))
    for kwargs, expected in (({"text": "zebra", "occurrence": 2}, "'zebra' appears 0 time(s) in the caption, not 2."),
                             ({"word": 0, "settings": {"cam_method": "<Nope>"}}, "Unknown cam_method '<Nope>'")):
        with pytest.raises(Exception) as raised:
            client.predict(photo, api_name="/explain", **kwargs)
        assert expected in str(raised.value) and "&#x27;" not in str(raised.value) and "&lt;" not in str(raised.value)


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


def open_page(browser, url: str, errors: list[str] | None = None):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    if errors is not None:
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return page


def upload(page, path: Path):
    """Upload an image through the real widget and wait for its clickable caption."""
    page.locator("#image input[type=file]").set_input_files(str(path))
    words = page.locator("#caption .token.highlighted")
    words.first.wait_for(timeout=60_000)
    return words


def word_texts(words) -> list[str]:
    """The caption words as the page shows them, without their readiness marks (`ui.MARKS`)."""
    return [words.nth(index).inner_text().split("\u2009")[0].strip() for index in range(words.count())]


def finished(page, containing: str = "Explained", timeout: float = 60_000) -> None:
    """Wait until the status line reports a complete explanation (nothing still being computed) that mentions
    `containing`, and no answer to it is still pending (Gradio's progress tracker on it is hidden): the status of
    the word clicked before would do otherwise, and that click's late answer would undo what the test does next."""
    page.wait_for_function("(text) => { const status = document.querySelector('#status');"
                           " const s = status?.innerText || '';"
                           " const busy = status?.querySelector('[data-testid=status-tracker]:not(.hide)');"
                           " return !busy && s.includes('Explained') && s.includes(text)"
                           " && !s.includes('Computing'); }",
                           arg=containing, timeout=timeout)


def wait_idle(explainer: Explainer, timeout: float = 300) -> None:
    assert explainer.wait_until_idle(timeout), "the background precompute did not finish"


def test_click_a_word_in_a_real_browser(app_url, browser, monkeypatch):
    from ipag.attribution import AttributionPass
    from ipag.grounding import Grounder

    # tiny models are too quick to see stages arrive: slow two of them down (the real ones take seconds)
    for cls, name in ((AttributionPass, "pixel_gradients"), (Grounder, "ground")):
        slow = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *args, _slow=slow, **kwargs: time.sleep(0.3) or _slow(*args, **kwargs))
    errors: list[str] = []
    page = open_page(browser, app_url, errors)
    words = upload(page, EXAMPLES / "chelsea.jpg")
    assert words.count() >= 2
    # record every status line the page shows, to check that the outputs arrive stage by stage, in order
    page.evaluate("""() => { window.statuses = [];
        new MutationObserver(() => window.statuses.push(document.querySelector('#status').innerText))
            .observe(document.querySelector('#status'), {childList: true, subtree: true, characterData: true}); }""")
    words.nth(words.count() - 1).click()  # the word the background precompute reaches last
    finished(page)
    pending = [set(s.split("Computing ")[1].split("…")[0].split(", "))
               for s in page.evaluate("window.statuses") if "Computing" in s]
    pending = [p for i, p in enumerate(pending) if not i or p != pending[i - 1]]  # one entry per update
    assert pending  # the first outputs were shown while the rest was still being computed…
    assert all(later < earlier for earlier, later in zip(pending, pending[1:]))  # …and the stages came in order
    assert ui.views()[ui.DEFAULT_VIEW] in page.locator("#view-label").inner_text()  # the default view, and its method
    for key, title in ui.views().items():
        page.locator("#view").get_by_text(title, exact=True).click()
        if key in ("occlusion", "integrated_gradients"):  # off unless asked for: said so, and no empty box
            page.locator("#view-label").get_by_text("is off — turn it on in Settings").wait_for(timeout=30_000)
            assert page.locator("#picture img").count() == 0 or not page.locator("#picture").is_visible()
            continue
        # the label's start, exactly: a substring match would take "Cross-attention: …" for "Attention", click on
        # while that answer is pending, and Gradio drops a click made while the same event is pending
        expected = "Region among" if key == "region" else f"{title}:"
        page.wait_for_function("(text) => (document.querySelector('#view-label')?.innerText || '').trim()"
                               ".startsWith(text)", arg=expected, timeout=30_000)
        page.wait_for_function("() => { const img = document.querySelector('#picture img');"
                               " return img && img.complete && img.naturalWidth > 0; }", timeout=30_000)
    assert "sure of" in page.locator("#summary").inner_text()

    page.locator("#query textarea, #query input").first.fill("red car")
    page.locator("#query textarea, #query input").first.press("Enter")
    page.locator("#status").get_by_text("after the prompt").wait_for(timeout=60_000)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    assert errors == [], errors
    page.close()


def test_an_output_still_being_computed_is_outlined_without_animation(app_url, browser, monkeypatch):
    """While a word's later stages are computed, its outputs keep Gradio's accent outline, but still: Gradio pulses
    it forever, and repainting that took the browser 0.8 s of CPU per click on 2 cores (`playground.CSS`)."""
    from ipag.attribution import AttributionPass

    slow = AttributionPass.pixel_gradients  # tiny models finish before the outline could be looked at
    monkeypatch.setattr(AttributionPass, "pixel_gradients",
                        lambda *args, **kwargs: time.sleep(0.3) or slow(*args, **kwargs))
    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "coffee.jpg")
    # look at every outline the moment it appears (a MutationObserver runs before the next frame is drawn)
    page.evaluate("""() => { window.outlines = [];
        new MutationObserver(() => document.querySelectorAll('.generating').forEach(element => {
            const style = getComputedStyle(element);
            window.outlines.push([style.animationName, style.borderTopWidth]); }))
            .observe(document.body, {childList: true, subtree: true, attributes: true}); }""")
    words.nth(words.count() - 1).click()
    finished(page)
    outlines = page.evaluate("window.outlines")
    assert outlines, "no output was shown as still being computed"
    assert {tuple(outline) for outline in outlines} == {("none", "2px")}, outlines
    page.close()


def test_word_readiness_a_summary_first_and_every_map_small(app_url, browser, monkeypatch):
    """The caption marks which words are explained, computing or queued while the precompute runs, and says when
    all are; the trust panel opens with a summary sentence; every map is drawn small, and clicking one makes it the
    large view."""
    from ipag.attribution import AttributionPass

    slow = AttributionPass.pixel_gradients  # tiny models are too quick to see the precompute's progress
    monkeypatch.setattr(AttributionPass, "pixel_gradients",
                        lambda *args, **kwargs: time.sleep(0.5) or slow(*args, **kwargs))
    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "astronaut.jpg")
    marked = [words.nth(index).inner_text() for index in range(words.count())]
    assert all(text.split("\u2009")[-1].strip() in ui.MARKS.values() for text in marked), marked
    assert any("○" in text or "⟳" in text for text in marked)  # not all explained yet
    page.wait_for_function("(label) => document.querySelector('#caption').innerText.includes(label)",
                           arg=ui.CAPTION_READY, timeout=300_000)  # 0.5 s a word, on a loaded machine
    assert word_texts(words) == [text.split("\u2009")[0].strip() for text in marked]  # marks gone, words kept
    words.nth(1).click()
    finished(page)
    summary = page.locator("#summary").inner_text()
    assert summary.startswith("BLIP is ") and " sure of “" in summary and "CLIP" in summary
    maps = page.locator("#trust [role=gridcell][data-col='0']")  # Gradio's table: the first column's cells
    maps.first.wait_for(timeout=30_000)
    titles = [maps.nth(index).inner_text().strip() for index in range(maps.count())]
    assert len(titles) >= 5 and page.locator("#grid img").count() == len(titles)  # one tile, one row per map
    page.locator("#grid img").nth(2).click()
    page.wait_for_function("(text) => (document.querySelector('#view-label')?.innerText || '').trim()"
                           ".startsWith(text)", arg=f"{titles[2]}:", timeout=30_000)
    page.close()


def test_the_page_path_computes_each_word_once(app, browser):
    """The page precomputes every word with the settings it shows: after that a click runs no backward pass; a
    click during the precompute joins it (each word's backward runs once overall); a changed setting re-plans
    the precompute, whose words are then served without a backward pass either."""
    from ipag.attribution import AttributionPass

    url, explainer = app
    counts: dict[tuple, int] = {}
    original = AttributionPass.token_gradients

    def counted(attribution, target):
        counts[target.positions] = counts.get(target.positions, 0) + 1
        return original(attribution, target)

    page = open_page(browser, url)
    AttributionPass.token_gradients = counted
    try:
        words = upload(page, EXAMPLES / "rocket.jpg")
        words.nth(words.count() - 1).click()  # at once: the precompute has barely started
        finished(page)
        wait_idle(explainer)
        assert counts and set(counts.values()) == {1}, counts  # every word once, the clicked one included
        counts.clear()
        for index in range(words.count()):
            words.nth(index).click()
            finished(page)
        assert counts == {}  # all served from the precompute

        page.locator("#view").get_by_text("Grad-CAM", exact=True).click()
        page.locator("#settings-cam_method input").click()
        page.get_by_role("option", name="LayerCAM").click()
        page.locator("#view-label").get_by_text("LayerCAM").wait_for(timeout=60_000)
        wait_idle(explainer)
        assert counts and set(counts.values()) == {1}  # re-planned for the new setting, each word once
        counts.clear()
        words.nth(0).click()
        finished(page)
        assert counts == {}
    finally:
        AttributionPass.token_gradients = original
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
    for query, message in (("x" * 10_000, "too long"), ("🙂", "no word")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), text=query, api_name="/explain")
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
        result = client.predict(handle_file(str(path)), word=0, settings={"max_new_tokens": 6}, api_name="/explain")
        return path, caption, result["explanation"], Image.open(result["images"]["gradcam"]).size

    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(one_client, paths))
    for path, caption, result, size in outcomes:
        expected = local.caption(Image.open(path), Settings(max_new_tokens=6))
        assert caption["text"] == expected.text
        assert size == Image.open(path).size and result["image_size"] == list(Image.open(path).size)


def test_auth_protects_page_and_api():
    import httpx

    demo, url = serve(Explainer.tiny(seed=0), auth=("ann", "secret"))
    try:
        assert httpx.get(f"{url}config", timeout=10).status_code == 401
        with pytest.raises(Exception):
            Client(url, verbose=False).predict(handle_file(str(EXAMPLES / "coffee.jpg")), 1, 5, api_name="/caption")
        client = Client(url, auth=("ann", "secret"), verbose=False)
        assert client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), 1, 5, api_name="/caption")["words"]
    finally:
        demo.close()


def test_typed_html_never_becomes_an_element_or_a_request(app_url, browser):
    """HTML typed as a query is shown as text everywhere it appears: the status line, the error message, the
    trust table; no element, no dialog and no request come of it."""
    page = open_page(browser, app_url)
    dialogs, requests = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: requests.append(request.url))
    upload(page, EXAMPLES / "coffee.jpg")
    box = page.locator("#query textarea, #query input").first
    for attack in ("<img src=x onerror=alert(1)><script>alert(2)</script> dog",
                   "<a href='https://evil.example'>dog</a>"):
        box.fill(attack)
        box.press("Enter")
        finished(page, containing=attack.split(">")[0] + ">")  # shown as text…
        status = page.locator("#status")
        assert status.locator("img, a, script").count() == 0  # …not as elements
    box.fill("<img src=x onerror=alert(3)>")  # no known word: an error message quoting the query
    box.press("Enter")
    message = page.locator("#message")
    message.get_by_text("<img").wait_for(timeout=30_000)
    assert "<img" in message.inner_text() and message.locator("img").count() == 0
    page.wait_for_timeout(500)
    assert dialogs == []
    assert not [url for url in requests if url.rstrip("/").endswith("/x") or "evil.example" in url]
    page.close()


def test_bad_uploads_get_a_message_and_keep_the_result(app_url, browser, tmp_path):
    """Each bad file through the real upload widget: the loader's clear message, and the previous image, caption
    and explanation stay on the page."""
    not_image = tmp_path / "holiday.jpg"
    not_image.write_text("this is a text file, renamed")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((EXAMPLES / "coffee.jpg").read_bytes()[:2000])
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)
    tiny = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny)

    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "coffee.jpg")
    caption = page.locator("#caption").inner_text()
    words.first.click()
    finished(page)
    status = page.locator("#status").inner_text()
    for path, message in ((not_image, "Cannot read holiday.jpg"), (truncated, "Cannot read truncated.png"),
                          (bomb, "megapixels")):
        page.locator("#image input[type=file]").set_input_files(str(path))
        shown = page.locator("#message")
        shown.get_by_text(message).wait_for(timeout=60_000)
        assert "gradio" not in shown.inner_text() and "/tmp" not in shown.inner_text()  # the user's file name only
        page.wait_for_timeout(300)
        assert page.locator("#caption").inner_text() == caption and page.locator("#status").inner_text() == status
        assert "Error" not in page.locator("#picture").inner_text()  # no error badge over the result
        assert page.locator("#image img").count() == 1  # the last good image is shown again
    upload(page, tiny)  # 1×1 is odd but valid: it is captioned
    page.close()


def test_a_mistake_after_a_result_keeps_the_result(app_url, browser):
    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "astronaut.jpg")
    words.first.click()
    finished(page)
    status = page.locator("#status").inner_text()
    page.locator("#explain").click()  # an empty query
    page.locator("#message").get_by_text("empty").wait_for(timeout=30_000)
    page.wait_for_timeout(300)
    assert page.locator(".toast-body").count() == 0  # on the page until the next action, not a fading toast
    assert page.locator("#status").inner_text() == status
    assert page.locator("#picture img").count() == 1 and "Error" not in page.locator("#trust").inner_text()
    page.close()


def test_the_live_sanity_check_reports_every_captioner_map(app_url, browser):
    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "coffee.jpg")
    words.first.click()
    finished(page)
    page.locator("#sanity-check").click()
    table = page.locator("#sanity")
    table.get_by_text("Grad-CAM", exact=True).wait_for(timeout=120_000)
    page.wait_for_function("() => !document.querySelector('#sanity').innerText.includes('…')", timeout=180_000)
    text = table.inner_text()
    assert "CLIP relevance" in text and "not the captioner's map" in text
    assert "top 1" in text and "(verdict)" in text  # the cascade, and which step the verdict is on
    assert "passes" in text or "fails" in text
    assert "NaN" not in text and "nan" not in text.split()
    page.close()


def test_candidate_regions_read_as_places_and_picking_one_shows_it(app_url, browser):
    """Superpixels have no classes: the candidates are named by place and size, the status line names the phrase
    that was grounded, and picking a candidate shows it on the picture (the region view) with its trust numbers."""
    page = open_page(browser, app_url)
    words = upload(page, EXAMPLES / "rocket.jpg")
    words.first.click()
    finished(page, "Region of “")
    before = page.locator("#trust").inner_text()
    choices = page.locator("#candidates label")
    assert choices.count() >= 2
    labels = [choices.nth(index).inner_text().split("—")[0].split(". ", 1)[1].strip()
              for index in range(choices.count())]
    readable = r"whole image|(\d+ )?segments?, [a-z ]+, (<1|\d+)% of the image"
    assert all(re.fullmatch(readable, label) for label in labels), labels
    choices.nth(1).click()
    page.locator("#status").get_by_text(labels[1]).wait_for(timeout=60_000)
    page.wait_for_function("(before) => document.querySelector('#trust').innerText !== before", arg=before,
                           timeout=60_000)
    page.locator("#view-label").get_by_text(labels[1]).wait_for(timeout=30_000)
    assert page.locator("#view input[value=region]").is_checked()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "candidates.png"), full_page=True)
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
    finished(page)
    page.locator("#picture img").wait_for(timeout=30_000)
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


# --- synthetic mode: generated scenes whose ground truth the page shows (issue 11) ------------------------

def test_synthetic_mode_grounds_a_shape_word_on_its_true_object(browser, tmp_path):
    """`playground.py --synthetic` with its example scenes: click a shape word of a held-out scene; the page
    outlines the true object, scores each map against it, and the region CLIP chose overlaps it."""
    from ipag.evaluation.groundtruth import iou
    from ipag.synthetic.scenes import SHAPES, example_files, generate_scene

    explainer = Explainer.synthetic()
    scenes = example_files(tmp_path / "scenes")
    demo, url = serve(explainer, (scenes, "Generated scenes"))
    errors: list[str] = []
    page = open_page(browser, url, errors)
    try:
        path = Path(scenes[SYNTHETIC_EXAMPLE])
        scene = generate_scene(int(path.stem.split("-")[1]))
        words = upload(page, path)
        texts = word_texts(words)
        truth = [word for word, _ in scene.evidence]
        shape = next(index for index, text in enumerate(texts) if text in SHAPES and text == truth[index])
        words.nth(shape).click()
        finished(page, texts[shape])
        page.locator("#view-label").get_by_text("true object").wait_for(timeout=30_000)
        assert "On the true object" in page.locator("#trust").inner_text()
        caption = explainer.caption(scene.image)
        explanation = explainer.explain(scene.image, shape, caption)  # what the page showed (cached)
        region = explanation.grounding.mask
        page.wait_for_function("(n) => document.querySelectorAll('#grid img').length === n",
                               arg=len(explanation.maps), timeout=30_000)  # every map small, scored (drawn in)
        own = scene.masks[scene.object_of(shape)]
        assert iou(region, own) >= 0.5
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "synthetic.png"), full_page=True)
        assert errors == [], errors
    finally:
        page.close()
        demo.close()


# --- a vision-language model in the page: only its answer is clickable, its instruction can be edited (issue 26) -

def test_a_vision_language_model_answers_its_instruction_in_the_page(app_url, browser, tmp_path):
    """A tiny random LLaVA, loaded from its folder as a user's download: upload, the caption is the answer (its label
    quotes the instruction, the prompt's words are not shown), a click explains a word with its maps and region;
    then another instruction typed in the page captions again with a prompt that asks it. BLIP's page has no box."""
    from ipag.captioners.tiny_vlms import save_tiny
    from ipag.captioners.vlm import DEFAULT_INSTRUCTION

    page = open_page(browser, app_url)
    page.locator("#caption").wait_for(timeout=30_000)
    assert not page.locator("#settings-instruction").is_visible()  # BLIP takes no instruction
    page.close()

    explainer = Explainer.tiny(captioner=str(save_tiny("llava", tmp_path / "llava")))
    demo, url = serve(explainer)
    errors: list[str] = []
    page = open_page(browser, url, errors)
    try:
        image = Image.open(EXAMPLES / "chelsea.jpg")
        words = upload(page, EXAMPLES / "chelsea.jpg")
        caption = explainer.caption(image)  # what the page showed (cached)
        assert caption.instruction == DEFAULT_INSTRUCTION
        page.locator("#caption").get_by_text(f"Answer to “{DEFAULT_INSTRUCTION}”").wait_for(timeout=30_000)
        assert word_texts(words) == [word.text for word in caption.words]  # the answer's words, the prompt's none
        words.first.click()
        finished(page, caption.words[0].text)
        page.wait_for_function("() => { const img = document.querySelector('#picture img');"
                               " return img && img.complete && img.naturalWidth > 0; }", timeout=30_000)
        explanation = explainer.explain(image, 0, caption)  # what the page showed (cached)
        assert len(explanation.maps) >= 5
        page.wait_for_function("(n) => document.querySelectorAll('#grid img').length === n",
                               arg=len(explanation.maps), timeout=30_000)  # every map small, drawn in
        assert page.locator("#candidates label").count() >= 2 and "Region of “" in page.locator("#status").inner_text()
        assert page.locator("#summary").inner_text().startswith(f"{explainer.captioner.short_name} is ")

        page.get_by_role("button", name="Captioner and decoding").click()
        box = page.locator("#settings-instruction textarea, #settings-instruction input").first
        assert box.get_attribute("placeholder") == DEFAULT_INSTRUCTION  # what an empty box asks
        box.fill("What does this show?")
        box.press("Enter")  # captions again, as "Caption again" does
        page.locator("#caption").get_by_text("Answer to “What does this show?”").wait_for(timeout=60_000)
        asked = explainer.caption(image, Settings(instruction="What does this show?"))  # the page's, cached
        prompt = asked.tokens[:explainer.captioner.answer_start(asked.token_ids)]
        assert "▁what" in prompt and "▁what" not in caption.tokens  # the prompt asks the new instruction
        words.first.wait_for(timeout=60_000)
        assert word_texts(words) == [word.text for word in asked.words]
        words.first.click()
        finished(page, asked.words[0].text)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "vlm.png"), full_page=True)
        assert errors == [], errors
    finally:
        page.close()
        demo.close()
