"""IPAG playground: upload a photo, click a caption word, see why the captioner said it.

    python playground.py --synthetic     # small models trained on generated scenes (shipped): offline, with truth
    python playground.py --tiny          # tiny random models, offline, for testing the plumbing
    python playground.py                 # BLIP-base + CLIP ViT-B/32 (downloaded once, then cached)

This file only lays out the page and wires components to the plain functions of `ipag.ui`; the settings'
widgets are made from their declarations (`ipag.ui.settings_panels`, `ipag.settings`).
"""

from __future__ import annotations

import argparse
from abc import ABCMeta
import functools
import html
import inspect
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import gradio as gr
from gradio import FileData

from ipag import Explainer, Explainers, ModelUnavailableError
from ipag import ui
from ipag.cli import add_model_arguments, captioner_loader, captioner_name, load_explainer
from ipag.settings import DEFAULTS, Settings
from ipag.synthetic.scenes import example_files

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / "examples").glob("*.jpg"))
EXAMPLES_LABEL = "Examples (public domain / CC0, see examples/)"
#: Where `--synthetic` writes its example scenes (generated at start-up, deterministic).
SCENES = Path(tempfile.gettempdir()) / "ipag-scenes"
INTRO = """# IPAG playground — why did the captioner say that?
Upload a photo (or use the webcam, paste one, or pick an example). {captioner} captions it (another captioner:
see *Captioner and decoding*); **click any caption word** (or type one) to see where in the picture the captioner's
own log-probability of that word came from, every map side by side, the image region CLIP matches to the word,
and numbers that say how far to trust them."""

#: Local system fonts only: the page must not fetch anything from the internet (offline use, privacy).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
#: The small maps start below their gallery's label (Gradio floats it over the first row). While an event's output
#: is still being generated, Gradio pulses an accent border around it forever; it stays, still: in Chromium on 2
#: cores that repaint took 0.8 s of CPU per click from the model worker (docs/performance.md).
CSS = "#grid { padding-top: 2.2em; } .generating { animation: none !important; }"
#: How often Gradio's queue looks for a new event while none is waiting, and for progress to send (seconds). Gradio
#: polls every 1 ms on Linux (50 ms on Windows) and every 10 ms: on 2 cores, an event loop waking 1000 times a
#: second beside the model worker made its generation 15% slower and segmentation 7% (in-process: 1.03 → 1.17 s,
#: 2.30 → 2.47 s); at 20 ms the loop costs nothing measurable, and an event starts at most 20 ms later.
QUEUE_POLL_S = 0.02
PROGRESS_POLL_S = 0.05
#: Explaining events handled at once (`--concurrency`): two visitors are served side by side on 2 cores.
CONCURRENCY = 2


def friendly(outputs: int) -> Callable[[Callable], Callable]:
    """Decorate a handler with `outputs` outputs to give it one more, the page's message line (list it last among
    the outputs): an error the user can act on becomes the message while everything else on the page stays as it
    was, and the app keeps running; a handler that succeeds clears it, so a message stays until the next action.
    Works for plain handlers and for generators (progressive outputs)."""
    def unchanged(err: Exception) -> tuple:
        return (*(gr.skip() for _ in range(outputs)), message(err))

    def cleared(value: Any) -> tuple:  # a handler with several outputs returns a tuple
        return (*(value if isinstance(value, tuple) else (value,)), message(None))

    def decorate(fn: Callable) -> Callable:
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def stream(*args: Any, **kwargs: Any) -> Any:
                try:
                    for value in fn(*args, **kwargs):
                        yield cleared(value)
                except (ui.UserError, ModelUnavailableError) as err:
                    yield unchanged(err)
            return stream

        @functools.wraps(fn)
        def plain(*args: Any, **kwargs: Any) -> Any:
            try:
                return cleared(fn(*args, **kwargs))
            except (ui.UserError, ModelUnavailableError) as err:
                return unchanged(err)
        return plain
    return decorate


def message(err: Exception | None) -> dict:
    """The message line for an error (escaped here, in the page: it may quote what the user typed), or hidden."""
    if err is None:
        return gr.update(value="", visible=False)
    return gr.update(value=f'<div class="message" role="alert">⚠ {html.escape(str(err))}</div>', visible=True)


def _upload_path(self: gr.Image, payload: Any) -> str | None:
    return None if payload is None else payload.path


#: The image widget, handing the uploaded file to our loader undecoded: Gradio's own decoding would fail on a
#: broken file or a decompression bomb before our checks (and their clear messages) could run. Made with
#: `ABCMeta.__new__` instead of a class statement, because Gradio's component metaclass writes a .pyi stub next
#: to the module of every subclass; the front end is Gradio's image widget ("image").
UploadedImage = ABCMeta.__new__(type(gr.Image), "UploadedImage", (gr.Image,), {
    "__module__": __name__, "preprocess": _upload_path, "get_block_name": lambda self: "image"})
#: The component of each kind of setting widget (`ipag.ui.SettingWidget.kind`).
WIDGETS = {"slider": gr.Slider, "number": gr.Number, "checkbox": gr.Checkbox, "dropdown": gr.Dropdown,
           "radio": gr.Radio, "text": gr.Textbox}


@dataclass
class Page:
    """The page's components, by role, so that wiring code names them instead of counting positions."""

    explainers: Explainers
    names: list[str]  #: captioners the page offers
    gallery: tuple[list[str], str]  #: the example files and their label
    panels: dict[str, dict[str, ui.SettingWidget]]  #: every setting's widget, by panel (`ui.settings_panels`)
    settings: dict[str, gr.components.Component] = field(default_factory=dict)  #: setting name → its widget
    parts: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["parts"][name]
        except KeyError as err:
            raise AttributeError(name) from err

    def caption_update(self, session: ui.Session) -> tuple:
        """The caption marked with how far each word's background explanation is, and the timer that keeps it so
        while it changes (`ui.readiness`)."""
        segments, label, changing = ui.readiness(session)
        return gr.update(value=segments, label=label), gr.Timer(active=changing)

    def read(self, values: tuple) -> Settings:
        """The settings widgets' values (in `self.settings` order) as a `Settings`."""
        return _settings(dict(zip(self.settings, values)))

    def outputs(self) -> list:
        """What an explanation updates: the session, the large view, the line under it and its colour bar, the
        small maps, the candidates, the trust panel's summary and table, the status line, the raw JSON, the sanity
        check's table and the view's choice (which only picking a small map or a candidate region changes)."""
        return [self.session, self.picture, self.label, self.legend, self.grid, self.candidates, self.summary,
                self.trust, self.status, self.details, self.sanity, self.view]

    def progress_on(self) -> list:
        """Where an explaining event shows that it is working: the large view and the status line. Gradio would
        otherwise animate a spinner and a timer over every one of the dozen outputs, and on a small machine
        drawing them took the browser more CPU than the caption it waited for (see docs/performance.md)."""
        return [self.picture, self.status]

    def only(self, values: dict[Any, Any]) -> tuple:
        """What an explanation updates (`outputs`), with these components' new values and the others unchanged."""
        return tuple(values.get(component, gr.skip()) for component in self.outputs())

    def show(self, session: ui.Session, rendered: ui.Rendered, switch_view: bool = False,
             same_word: bool = False) -> tuple:
        """The outputs' new values. The view's choice is set only when `switch_view`: set on every answer, a late
        answer would turn back the choice of a user clicking through the views. The sanity check's table is hidden
        unless the word is the `same_word` (it was for the word it was run for)."""
        candidate = rendered.candidates[session.candidate] if rendered.candidates else None
        trust = rendered.trust
        return (session, gr.update(value=rendered.picture, visible=rendered.picture is not None),  # no empty box
                rendered.label, rendered.legend,
                gr.skip() if rendered.grid is None else  # the tiles' captions are drawn in (`ui.map_grid`)
                gr.update(value=[tile for tile, _ in rendered.grid], visible=bool(rendered.grid)),
                gr.update(choices=rendered.candidates, value=candidate, visible=bool(rendered.candidates)),
                rendered.summary,
                gr.update(value={"headers": trust.headers, "data": trust.rows}, visible=True) if trust.rows
                else gr.update(visible=False), rendered.status, rendered.details,
                gr.skip() if same_word else gr.update(visible=False), session.view if switch_view else gr.skip())


def build_app(explainers: Explainers | Explainer,
              examples: tuple[list[str], str] = (EXAMPLES, EXAMPLES_LABEL), notice: str | None = None) -> gr.Blocks:
    """The page. Every handler is a thin adapter from components to `ipag.ui` and back. `examples`: the
    gallery's files and its label; `notice`: a line (Markdown) under the introduction, e.g. that the real
    models are still loading."""
    if isinstance(explainers, Explainer):
        explainers = Explainers(explainers, "default", lambda name: explainers.captioner)
    page = Page(explainers, explainers.names, examples, ui.settings_panels(explainers.get()))
    with gr.Blocks(title="IPAG playground") as demo:
        page.parts["session"] = gr.State(ui.Session())
        gr.Markdown(INTRO.format(captioner=explainers.get().captioner.short_name))
        if notice:
            gr.Markdown(notice, elem_id="notice")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                _image_panel(page)
                _settings_panel(page)
            with gr.Column(scale=5):
                _caption_panel(page)
                _maps_panel(page)
        _compare_panel(page)
        _wire_explaining(page)
        _wire_settings(page)
        _api(explainers.get())
    return demo


def _image_panel(page: Page) -> None:
    # type="filepath": our loader decodes the upload, with its size checks (decompression bombs).
    page.parts["image"] = UploadedImage(type="filepath", sources=["upload", "webcam", "clipboard"], label="Image",
                                     height=280, elem_id="image")
    page.parts["examples"] = gr.Examples(page.gallery[0], inputs=page.image, label=page.gallery[1])
    decoding, *_ = ui.PANELS
    with gr.Accordion(decoding, open=False):
        page.parts["captioner"] = gr.Dropdown(page.names, value=page.explainers.default, label="Captioner",
                                              elem_id="captioner")
        _settings_widgets(page, decoding)
        page.parts["recaption"] = gr.Button("Caption again", variant="secondary")


def _caption_panel(page: Page) -> None:
    page.parts["caption"] = gr.HighlightedText(label=ui.CAPTION_LABEL, show_legend=False, show_inline_category=False,
                                               elem_id="caption")
    page.parts["ticker"] = gr.Timer(1.0, active=False)  # updates the words' readiness while they are precomputed
    with gr.Row():
        page.parts["query"] = gr.Textbox(placeholder="…or type a word or phrase and press Enter", show_label=False,
                                         max_lines=1, max_length=500, scale=4, elem_id="query")
        page.parts["explain"] = gr.Button("Explain", variant="primary", scale=1, elem_id="explain")
    page.parts["message"] = gr.HTML(visible=False, elem_id="message")  # the last error, until the next action
    page.parts["status"] = gr.HTML(ui.NO_WORD, elem_id="status")


def _maps_panel(page: Page) -> None:
    """The chosen view large with the trust panel's summary and the candidate regions beside it, every map small
    below, then one row per map of the trust numbers."""
    page.parts["view"] = gr.Radio([(title, key) for key, title in ui.views().items()], value=ui.DEFAULT_VIEW,
                                  show_label=False, elem_id="view")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=320):
            page.parts["picture"] = gr.Image(show_label=False, interactive=False, height=440, format="jpeg",
                                             elem_id="picture")
            page.parts["label"] = gr.Markdown(elem_id="view-label")
            page.parts["legend"] = gr.HTML(elem_id="legend")
        with gr.Column(scale=2, min_width=280):
            page.parts["summary"] = gr.HTML(elem_id="summary")
            page.parts["candidates"] = gr.Radio(label="Candidate regions (the chosen one first): pick one to take it "
                                                "as the word's region", choices=[], visible=False, elem_id="candidates")
    page.parts["grid"] = gr.Gallery(label="Every map of the word — click one to see it large",
                                    columns=5, height="auto", allow_preview=False, interactive=False, format="png",
                                    object_fit="contain", visible=False, elem_id="grid")
    page.parts["trust"] = gr.Dataframe(label="How far to trust each map", interactive=False, wrap=True,
                                       max_height=2400, visible=False, elem_id="trust")  # never scrolls inside itself
    page.parts["check"] = gr.Button("Sanity check: do these maps depend on what the model learned?",
                                    elem_id="sanity-check")
    page.parts["sanity"] = gr.Dataframe(label=ui.SANITY_LABEL, interactive=False, wrap=True, visible=False,
                                        max_height=2400, elem_id="sanity")  # never scrolls inside itself
    with gr.Row():
        page.parts["export"] = gr.Button("Export this explanation (PNGs + JSON)", elem_id="export")
        page.parts["download"] = gr.File(label="Download", interactive=False, visible=False, elem_id="download")
    with gr.Accordion("Raw result (JSON)", open=False):
        page.parts["details"] = gr.JSON()


def _settings_panel(page: Page) -> None:
    """Every setting's widget but the decoding ones (they sit with the captioner), one accordion per panel."""
    _, *panels = ui.PANELS
    for title in panels:
        with gr.Accordion(title, open=title == "Maps"):
            _settings_widgets(page, title)


def _settings_widgets(page: Page, panel: str) -> None:
    for name, widget in page.panels[panel].items():
        page.settings[name] = WIDGETS[widget.kind](elem_id=f"settings-{name}", **widget.options)


def _compare_panel(page: Page) -> None:
    with gr.Accordion("Compare captioners (click a word in any of them)", open=False):
        page.parts["compare"] = gr.Button("Caption with every captioner", elem_id="compare")
        page.parts["compared"] = [gr.HighlightedText(label=name, show_legend=False, show_inline_category=False,
                                                     elem_id=f"compare-{name}") for name in page.names]


def _wire_explaining(page: Page) -> None:
    """Uploads, clicks, typed queries, candidate picks, small maps, the sanity check and exports. Every handler that
    can fail also clears or sets the message line (`friendly`), listed last among its outputs."""
    get, widgets, outputs = page.explainers.get, list(page.settings.values()), [*page.outputs(), page.message]
    count = len(page.outputs())
    # Gradio finds its special arguments (event data) only among the positional parameters, so they come
    # before the *values of the settings widgets.

    def on_image(picture, name, state, *values):
        """The caption appears as it is written; the words become clickable once it is complete."""
        settings, old = page.read(values), state
        try:
            for segments, state, status in ui.caption_image_stream(get(name), picture, settings,
                                                                   replace(state, captioner=name)):
                if state.caption is None and state.image is not None:  # still being written
                    yield (gr.skip(), segments, gr.skip(),
                           *page.only({page.session: state, page.status: status}), message(None))
        except (ui.UserError, ModelUnavailableError) as err:  # keep the page as it was, the last good image too
            yield (old.source, *(gr.skip() for _ in range(count + 2)), message(err))
            return
        yield (gr.skip(), *page.caption_update(state),
               *page.show(state, replace(ui.render(state, settings), status=status)), message(None))

    @friendly(count)
    def on_select(state, evt: gr.SelectData, *values):
        for shown in ui.select_word(get(state.captioner), state, evt.index, page.read(values)):
            yield page.show(*shown)

    @friendly(count)
    def on_query(text, state, *values):
        for shown in ui.explain(get(state.captioner), state, text, page.read(values)):
            yield page.show(*shown)

    @friendly(count)
    def on_view(view, state, *values):
        return page.show(*ui.select_view(state, view, page.read(values)), same_word=True)

    @friendly(count)
    def on_tile(state, evt: gr.SelectData, *values):
        return page.show(*ui.select_tile(state, evt.index, page.read(values)), switch_view=True, same_word=True)

    @friendly(count)
    def on_candidate(label, state, *values):
        return page.show(*ui.select_candidate(get(state.captioner), state, label, page.read(values)), switch_view=True)

    @friendly(1)
    def on_sanity(state):
        for table in ui.sanity_check(get(state.captioner), state):
            yield gr.update(value={"headers": table.headers, "data": table.rows}, visible=True)

    @friendly(1)
    def on_export(state, *values):
        return gr.update(value=ui.export(get(state.captioner), state, page.read(values)), visible=True)

    def on_tick(state):
        return page.caption_update(state)

    @friendly(1)
    def on_captioner(name):
        """The instruction box follows the captioner: shown for one that takes an instruction, with its own."""
        return gr.update(**ui.instruction_box(get(name).captioner))

    upload = dict(fn=on_image, inputs=[page.image, page.captioner, page.session, *widgets],
                  outputs=[page.image, page.caption, page.ticker, *outputs], api_visibility="private",
                  show_progress_on=[page.caption])
    instruction = page.settings["instruction"]
    gr.on([page.image.upload, page.recaption.click, page.captioner.input, instruction.submit], **upload)
    page.captioner.input(on_captioner, [page.captioner], [instruction, page.message], api_visibility="private")
    page.examples.load_input_event.then(**upload)
    page.caption.select(on_select, [page.session, *widgets], outputs, api_visibility="private",
                        show_progress_on=page.progress_on())
    gr.on([page.explain.click, page.query.submit], on_query, [page.query, page.session, *widgets], outputs,
          api_visibility="private", show_progress_on=page.progress_on())
    page.candidates.input(on_candidate, [page.candidates, page.session, *widgets], outputs, api_visibility="private",
                          show_progress_on=page.progress_on())
    page.view.input(on_view, [page.view, page.session, *widgets], outputs, api_visibility="private",
                    show_progress="hidden")
    page.grid.select(on_tile, [page.session, *widgets], outputs, api_visibility="private", show_progress="hidden")
    page.export.click(on_export, [page.session, *widgets], [page.download, page.message], api_visibility="private")
    page.check.click(on_sanity, [page.session], [page.sanity, page.message], api_visibility="private")
    # cheap (no model runs), so it neither waits for nor holds one of the slots the explaining handlers queue for
    page.ticker.tick(on_tick, [page.session], [page.caption, page.ticker], api_visibility="private",
                     show_progress="hidden", concurrency_limit=None)
    _wire_compare(page)


def _wire_compare(page: Page) -> None:
    get, widgets = page.explainers.get, list(page.settings.values())
    count = len(page.outputs())

    @friendly(len(page.compared))
    def on_compare(state, *values):
        return tuple(ui.compare_captions(page.explainers, page.names, state.image, page.read(values)))

    def on_compare_select(name):
        @friendly(count + 3)
        def handler(state, evt: gr.SelectData, *values):
            settings = page.read(values)
            _, state, _ = ui.caption_image(get(name), state.image, settings, replace(state, captioner=name))
            for shown in ui.select_word(get(name), state, evt.index, settings):
                yield (*page.caption_update(shown[0]), gr.update(value=name), *page.show(*shown))
        return handler

    page.compare.click(on_compare, [page.session, *widgets], [*page.compared, page.message], api_visibility="private")
    for name, component in zip(page.names, page.compared):
        component.select(on_compare_select(name), [page.session, *widgets],
                         [page.caption, page.ticker, page.captioner, *page.outputs(), page.message],
                         api_visibility="private", show_progress_on=page.progress_on())


def _wire_settings(page: Page) -> None:
    """A setting that changes what is computed re-plans the background work and re-explains the word on
    screen; drawing settings only redraw."""
    get, widgets = page.explainers.get, list(page.settings.values())
    outputs, count = [*page.outputs(), page.message], len(page.outputs())
    drawing = {name for name, _ in DEFAULTS.key("draw")}
    decoding = {name for name, _ in DEFAULTS.key("caption")}

    @friendly(count + 2)
    def on_settings(state, *values):
        settings = page.read(values)
        state = ui.replan(get(state.captioner), state, settings)
        if state.explanation is None:
            yield (*page.caption_update(state), *page.show(state, ui.render(state, settings)))
            return
        for shown in ui.explain(get(state.captioner), state, state.query, settings):
            yield (*page.caption_update(shown[0]), *page.show(*shown))

    @friendly(count)
    def on_redraw(state, *values):
        return page.show(state, ui.render(state, page.read(values)), same_word=True)

    for name, widget in page.settings.items():
        if name in drawing:
            widget.input(on_redraw, [page.session, *widgets], outputs, api_visibility="private",
                         show_progress="hidden")
        elif name not in decoding:  # decoding options apply to the next caption ("Caption again")
            widget.input(on_settings, [page.session, *widgets], [page.caption, page.ticker, *outputs],
                         api_visibility="private", show_progress_on=page.progress_on())


def _api(explainer: Explainer) -> None:
    """The stateless API for `gradio_client` (see README): `/caption` and `/explain`. Nothing is started in the
    background unless asked (`precompute=True`); images come back as files, by name."""

    @_api_errors
    def caption(image: FileData, num_beams: int = DEFAULTS.num_beams, max_new_tokens: int = DEFAULTS.max_new_tokens,
                precompute: bool = False, instruction: str | None = DEFAULTS.instruction) -> dict:
        """The caption of an uploaded image: its text, the instruction a vision-language model answered, and each
        word's span, tokens and log-probability."""
        settings = _settings({"num_beams": num_beams, "max_new_tokens": max_new_tokens, "instruction": instruction})
        result = ui.api_caption(explainer, _path(image), settings)
        if precompute:
            explainer.precompute_async(_path(image), explainer.caption(_path(image), settings), settings)
        return result

    @_api_errors
    def explain(image: FileData, word: int | None = None, text: str | None = None, occurrence: int = 1,
                settings: dict | None = None, sanity: bool = False) -> dict:
        """Explain caption word number `word` (0-based), or `text` (its `occurrence`-th appearance in the caption,
        or a phrase, or any free text), with `settings` (names and values of `ipag.Settings`); with `sanity`, run
        its sanity check too. Returns the explanation as JSON (with its ground truth on a generated scene, and the
        sanity check) and its images (region and every map) as files, by name."""
        chosen = _settings(settings or {})
        explained, drawings = ui.api_explain(explainer, _path(image), word, text, occurrence, chosen, sanity)
        files = {}
        for name, picture in drawings.items():
            path = ui.fresh_path(f"api_{name}", ".png")
            picture.save(path)
            files[name] = FileData(path=str(path)).model_dump()
        return {"explanation": explained.record(), "images": files}

    gr.api(caption, api_name="caption")
    gr.api(explain, api_name="explain")


def _api_errors(fn: Callable) -> Callable:
    """API errors a caller can act on become Gradio errors with the message as plain text (escaping it is the
    page's business, not the data's)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ui.UserError, ModelUnavailableError) as err:
            raise gr.Error(str(err), print_exception=False) from err
    return wrapper


def _settings(values: dict) -> Settings:
    try:
        return Settings.from_values(values)
    except (TypeError, ValueError) as err:
        raise ui.UserError(str(err)) from err


def _path(image: FileData | dict | None) -> str | None:
    """The uploaded file's path on the server (Gradio hands `gr.api` functions the file description)."""
    if image is None:
        return None
    return image["path"] if isinstance(image, dict) else image.path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for your network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login for the page and the API")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="requests handled at the same time")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes USER:PASS")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        explainer = load_explainer(args)
    except ModelUnavailableError as err:
        raise SystemExit(f"error: {err}") from err
    serve(args, explainer)


def serve(args: argparse.Namespace, explainer: Explainer, notice: str | None = None, block: bool = True) -> gr.Blocks:
    """Serve the page for `explainer` (loaded from `args`) with the options' captioners, examples and server
    settings, and warm it up: the examples are captioned and explained in the background, and the log says when
    that is done. Returns once the server stops, or at once without `block` (then `close()` the page)."""
    names, load = captioner_loader(args, explainer.captioner.device)
    examples = (EXAMPLES, EXAMPLES_LABEL)
    if args.synthetic:
        examples = (example_files(SCENES), "Generated scenes (held out from training: their ground truth is shown)")
    demo = build_app(Explainers(explainer, captioner_name(args), load, names), examples, notice)
    clip = explainer.clip.name if explainer.clip else "no CLIP"
    print(f"IPAG playground: {explainer.captioner.describe()}, {clip}; precision "
          f"{explainer.captioner.precision.describe()}", file=sys.stderr, flush=True)
    threading.Thread(target=warm_up, args=(explainer, examples[0]), daemon=True).start()
    queue(demo, args.concurrency, max_size=64)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    launch(demo, server_name=args.host, server_port=args.port, share=args.share, auth=auth, max_file_size="25mb",
           prevent_thread_lock=not block)
    return demo


def launch(demo: gr.Blocks, **options: Any) -> tuple:
    """`demo.launch(**options)` with the page's look (`THEME`, `CSS`): every server of the page (`make play`, the
    Space, the tests and the benchmarks) draws it the same way. Returns what `launch` does (app, URL, share URL)."""
    return demo.launch(theme=THEME, css=CSS, **options)


def queue(demo: gr.Blocks, concurrency: int = CONCURRENCY, max_size: int | None = None) -> gr.Blocks:
    """Turn on the page's queue (at most `concurrency` explaining events at once, `max_size` waiting), polling at
    `QUEUE_POLL_S` and `PROGRESS_POLL_S` instead of Gradio's every millisecond. Gradio has no option for these:
    they are its `Queue`'s attributes (a test checks that Gradio's loops still read them)."""
    demo.queue(default_concurrency_limit=concurrency, max_size=max_size)
    demo._queue.sleep_when_free = QUEUE_POLL_S
    demo._queue.progress_update_sleep_when_free = PROGRESS_POLL_S
    return demo


def warm_up(explainer: Explainer, paths: list[str]) -> None:
    """Caption and explain the examples in the background (visitors go first), saying when it is done."""
    started = time.perf_counter()
    ui.warm_examples(explainer, paths)
    explainer.wait_until_idle()
    print(f"Warm-up done: {len(paths)} examples captioned and every word explained in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
