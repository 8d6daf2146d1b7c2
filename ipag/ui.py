"""The playground's behaviour as plain functions: no Gradio layout and no model code here.

`playground.py` wires Gradio components to these functions. Each takes the shared `Explainer` (models are
loaded once per process) plus the user's own `Session` (kept in `gr.State`, never in a module global) and the
page's `Settings`, and returns plain values, so every function is unit-tested without a browser. Explaining
is a generator: it yields the page's content after each stage (first maps, saliency, region, more maps,
trust numbers), so the page shows each output as soon as it exists.

What the page shows for a word (`Rendered`): the chosen view drawn large with its colour bar, every map small
beside it, the candidate regions, and the trust panel — a summary sentence (how sure the captioner was, whether
the picture mattered, whether CLIP could decide) above one row per map. Every number is shown as what it is: an
undefined one says so, and every sentence names the captioner in use.
"""

from __future__ import annotations

import html
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from .captioners import Captioner
from .errors import ModelUnavailableError, QueryError
from .evaluation.localisation import GroundTruth, ground_truth
from .explainer import Explainer, Explainers
from .export import WordExport, image_export, safe_name, write_zip
from .grounding import Grounding
from .grounding.result import DECISIVE_RATIO
from .images import ImageInput, load_image
from .maps import MAP_TYPES, CrossAttentionMap, map_titles
from .render import captioned, colours, draw_map, draw_maps, draw_outline, draw_region, enlarged
from .results import Caption, Explanation
from .sanity import FLAG_ABOVE, SanityCascade, SanityCheck, cascade_levels, verdict
from .schedule import Plan, Progress
from .segmenters import available_segmenters
from .settings import DEFAULTS, Settings, Widget, declarations
from .synthetic.scenes import Scene, find_scene

NO_WORD = "Click a caption word, or type a word and press Explain."  #: plain text: fine as HTML too
WRITING = "The caption is being written; its words can be clicked once it is complete."
#: Seconds between two updates of a caption being written (`caption_image_stream`).
STREAM_INTERVAL = 0.25
#: Input × gradient: the map that found the named object most often on the ground-truth benchmark among those that
#: pass the sanity check and cost no more than Grad-CAM (docs/evaluation.md).
DEFAULT_VIEW = "input_x_gradient"
EXPORTS = Path(tempfile.gettempdir()) / "ipag-exports"
#: The small maps are drawn in squares of this side (small images enlarged by whole pixels).
GRID_SIDE = 192
#: The mark after a caption word while the background precompute explains the caption's words (`Plan.progress`).
MARKS: dict[Progress, str] = {"ready": "✓", "running": "⟳", "partial": "◐", "queued": "○", "dropped": ""}
#: The caption's label while words are marked, once every word is explained, and otherwise; a vision-language
#: model's caption is called the answer to its instruction instead (`caption_label`).
CAPTION = "Caption"
CAPTION_MARKED = f"{CAPTION} — click a word (colour: its probability; ✓ explained, ⟳ computing, ◐ partly, ○ queued)"
CAPTION_READY = f"{CAPTION} — click a word (colour: its probability; every word is explained: clicks answer at once)"
CAPTION_LABEL = f"{CAPTION} — click a word (colour: its probability)"
#: How much of an instruction the caption's label quotes (the whole of it is in the raw result).
LABEL_INSTRUCTION_CHARS = 60
#: The image evidence (Δlog p, photo vs blank image) below which the picture "barely changed" the word (in nats:
#: 0.05 is a 5% change of its probability).
BARELY = 0.05


class UserError(Exception):
    """Something the user can fix; shown as a message, and the app carries on."""


@dataclass
class Session:
    """One user's state: their image, its caption, the explanation on screen and the background precompute."""

    image: Image.Image | None = None
    caption: Caption | None = None
    explanation: Explanation | None = None
    captioner: str | None = None  #: which captioner made `caption` (None: the default one)
    speaker: str = "The captioner"  #: that captioner's name in sentences (`Captioner.short_name`)
    query: int | str | None = None  #: what `explanation` answers (a word index or typed text)
    candidate: int = 0  #: which of the explanation's candidate regions is shown
    plan: Plan | None = None  #: every word of the caption, queued in the background with the page's settings
    view: str = DEFAULT_VIEW  #: which of `views()` the page shows large
    source: str | None = None  #: the file the image came from (the page shows it again after a bad upload)
    scene: Scene | None = None  #: the generated scene the image is, when it is one: its ground truth is known


@dataclass(frozen=True)
class Table:
    """A table as the page shows it."""

    headers: list[str]
    rows: list[list[str]]


@dataclass
class Rendered:
    """Everything the output panel shows for one explanation: the session's view drawn large (None when there
    is nothing to draw for it), the line under it and its colour bar (HTML), the small maps with their captions
    (None: unchanged, only the large view changed), the candidate regions, the trust panel's summary (HTML) and
    table, the status line (HTML) and the raw result."""

    picture: Image.Image | None
    label: str
    legend: str
    grid: list[tuple[Image.Image, str]] | None
    candidates: list[str]
    summary: str
    trust: Table
    status: str
    details: dict[str, Any] = field(default_factory=dict)


def views() -> dict[str, str]:
    """What the page can show in its large view, by key: the region first, then every registered map type."""
    return {"region": "Region", **map_titles()}


def map_title(key: str) -> str:
    return map_titles().get(key, key)


# --- the settings panel --------------------------------------------------------------------------------------

#: The page's settings panels, by the stages their settings affect.
PANELS = {"Captioner and decoding": ("caption",), "Maps": ("gradients", "maps"),
          "Region": ("grounding", "verification"), "Drawing": ("draw",)}


@dataclass(frozen=True)
class SettingWidget:
    """One setting's widget: its kind and the component's arguments (label, value, range or choices, …)."""

    kind: Widget
    options: dict[str, Any]


def settings_panels(explainer: Explainer) -> dict[str, dict[str, SettingWidget]]:
    """Every setting's widget (panel title → setting name → widget), made from its declaration. The ranges of
    the layers and the default segmenter are this explainer's models', the segmenters offered those that can be
    built here; a captioner without cross-attention has no layer to choose, and its slider says why."""
    captioner = explainer.captioner
    resolved = explainer.resolve(DEFAULTS)
    vision, decoder = len(captioner.vision_layers), captioner.num_decoder_layers
    no_layer = CrossAttentionMap().unavailable(captioner)
    of_the_models = {
        "vision_layer": {"minimum": -vision, "maximum": vision - 1},
        "cross_attention_layer": {"minimum": 0, "maximum": max(decoder - 1, 1), "value": resolved.cross_attention_layer
                                  or 0, "interactive": not no_layer, "info": no_layer},
        "segmenter": {"value": resolved.segmenter, "choices": available_segmenters()},
        "instruction": instruction_box(captioner),
    }
    panels: dict[str, dict[str, SettingWidget]] = {title: {} for title in PANELS}
    for name, setting in declarations().items():
        kind = setting.widget_kind
        options: dict[str, Any] = {"label": setting.label, "value": getattr(DEFAULTS, name)}
        if kind in ("slider", "number"):
            options |= {"minimum": setting.minimum, "maximum": setting.maximum}
            options |= {"step": setting.step} if kind == "slider" else {"precision": 0 if setting.kind is int else None}
        elif kind in ("dropdown", "radio"):
            options["choices"] = setting.options()
        elif kind == "text":
            options["max_lines"] = 1
        title = next(title for title, stages in PANELS.items() if setting.stage in stages)
        panels[title][name] = SettingWidget(kind, options | of_the_models.get(name, {}))
    return panels



def instruction_box(captioner: Captioner) -> dict[str, Any]:
    """The instruction box for `captioner`: shown only when it takes an instruction, with its own as the
    placeholder (what an empty box asks)."""
    return {"visible": captioner.takes_instruction, "placeholder": captioner.default_instruction}


# --- captioning --------------------------------------------------------------------------------------------

def _segments(caption: Caption, progress: list[Progress] | None = None) -> list[tuple[str, float | None, int | None]]:
    """(text, probability, word index) for every word, and (text, None, None) for the text between words. With
    `progress`, each word carries the mark of how far its explanation is (`MARKS`): inside the word's own
    segment, so that the segments, and the word a click lands on, are the same whatever the marks."""
    segments: list[tuple[str, float | None, int | None]] = []
    cursor = 0
    for word in caption.words:
        if word.span[0] > cursor:
            segments.append((caption.text[cursor:word.span[0]], None, None))
        mark = MARKS[progress[word.index]] if progress else ""
        segments.append((f"{word.text}\u2009{mark}" if mark else word.text, round(word.probability, 3), word.index))
        cursor = word.span[1]
    if cursor < len(caption.text):
        segments.append((caption.text[cursor:], None, None))
    return segments


def caption_segments(caption: Caption, progress: list[Progress] | None = None) -> list[tuple[str, float | None]]:
    """The caption for `gr.HighlightedText`: each word its own segment, coloured by its probability, marked with
    `progress` when given."""
    return [(text, score) for text, score, _ in _segments(caption, progress)]


def word_for_segment(caption: Caption, segment: int) -> int | None:
    """The word index of the `segment`-th highlighted segment, or None for text between words."""
    segments = _segments(caption)
    return segments[segment][2] if 0 <= segment < len(segments) else None


def readiness(session: Session) -> tuple[list[tuple[str, float | None]], str, bool]:
    """The caption marked with how far each word's background explanation is, its label (`caption_label`), and
    whether it is still changing (a page polls until it is not). Without a precompute, or once every word is
    explained, the caption is shown plain."""
    caption = session.caption
    if caption is None:
        return [], CAPTION_LABEL, False
    progress = session.plan.progress() if session.plan is not None else None
    if not progress:
        return caption_segments(caption), caption_label(caption, CAPTION_LABEL), False
    if all(state == "ready" for state in progress):
        return caption_segments(caption), caption_label(caption, CAPTION_READY), False
    changing = any(state in ("running", "queued", "partial") for state in progress)
    return caption_segments(caption, progress), caption_label(caption, CAPTION_MARKED), changing


def caption_label(caption: Caption, label: str) -> str:
    """`label` (one of the caption's labels), naming a vision-language model's caption after what it answers, so
    the reader knows which question its words reply to: “Answer to “What is shown?” — click a word …”."""
    if caption.instruction is None:
        return label
    asked = textwrap.shorten(caption.instruction, LABEL_INSTRUCTION_CHARS, placeholder="…")
    return f"Answer to “{asked}”{label.removeprefix(CAPTION)}"


def caption_image(explainer: Explainer, image: ImageInput | None, settings: Settings, session: Session,
                  precompute: bool = True) -> tuple[list[tuple[str, float | None]], Session, str]:
    """Caption a new image: returns the clickable caption, the user's new session and a status line.
    With `precompute`, every word is then explained in the background with `settings` (the page's), so that
    clicks only draw; the previous image's background work that has not started is dropped."""
    if image is None:
        return [], Session(), "Upload an image, take a webcam photo, paste one or pick an example."
    return _captioned(explainer, _load(image), image, settings, session, precompute)


def caption_image_stream(explainer: Explainer, image: ImageInput | None, settings: Settings,
                         session: Session) -> Iterator[tuple[list[tuple[str, float | None]], Session, str]]:
    """`caption_image`, with the caption shown while it is written: per token, the text so far (one segment, not
    clickable), a session with the image but no caption yet, and a status line; then what `caption_image`
    returns (the caption is cached by then)."""
    if image is None:
        yield caption_image(explainer, image, settings, session)
        return
    rgb = _load(image)  # once: an upload is a file, decoded here only
    shown = 0.0
    try:
        for written in explainer.caption_stream(rgb, settings):
            # Each update is serialised and sent by the page's threads, which hold the interpreter lock that
            # generation needs too: a few updates a second read as smoothly and slow the caption less.
            if isinstance(written, str) and time.monotonic() - shown >= STREAM_INTERVAL:
                shown = time.monotonic()
                yield [(written, None)], Session(image=rgb, captioner=session.captioner), WRITING
    except ValueError as err:
        raise UserError(str(err)) from err
    yield _captioned(explainer, rgb, image, settings, session)  # the caption is cached: this only aligns it


def _load(image: ImageInput) -> Image.Image:
    try:
        return load_image(image)
    except ValueError as err:  # ImageError among them: the loader's message
        raise UserError(str(err)) from err


def _captioned(explainer: Explainer, rgb: Image.Image, image: ImageInput, settings: Settings, session: Session,
               precompute: bool = True) -> tuple[list[tuple[str, float | None]], Session, str]:
    """`caption_image` for the image `image` loaded as `rgb`."""
    try:
        caption = explainer.caption(rgb, settings)
    except ValueError as err:
        raise UserError(str(err)) from err
    if session.plan is not None:
        session.plan.cancel()
    plan = explainer.precompute_async(rgb, caption, settings) if precompute else None
    session = Session(image=rgb, caption=caption, captioner=session.captioner, speaker=explainer.captioner.short_name,
                      plan=plan, source=str(image) if isinstance(image, (str, Path)) else None, scene=find_scene(rgb))
    if not caption.words:
        return caption_segments(caption), session, "The caption has no words to explain; type a query instead."
    return caption_segments(caption), session, f"{len(caption.words)} words. {NO_WORD}"


def replan(explainer: Explainer, session: Session, settings: Settings) -> Session:
    """The settings changed: drop the background work for the old ones and queue every word for the new ones
    (what is cached for equal settings is not recomputed)."""
    if session.plan is not None:
        session.plan.cancel()
    if session.image is None or session.caption is None:
        return replace(session, plan=None)
    return replace(session, plan=explainer.precompute_async(session.image, session.caption, settings))


# --- explaining --------------------------------------------------------------------------------------------

def explain(explainer: Explainer, session: Session, query: int | str,
            settings: Settings) -> Iterator[tuple[Session, Rendered]]:
    """Explain a caption word (by index) or typed text for the session's image; yields the page's content
    after each stage of the computation, the last one complete. The small maps come only when they changed
    (`Rendered.grid` None: as shown before): the page would otherwise redraw and re-encode every tile for the
    region's and the trust numbers' stages, on the CPU the word's next stage needs."""
    if session.image is None or session.caption is None:
        raise UserError("Upload an image first: there is nothing to explain yet.")
    shown: list[str] | None = None  # the maps of the small maps yielded last
    try:
        for explanation in explainer.explain_stages(session.image, query, session.caption, settings):
            session = replace(session, explanation=explanation, query=query, candidate=0)
            maps = list(explanation.maps)
            yield session, render(session, settings, grid=maps != shown)
            shown = maps
    except (QueryError, ValueError) as err:
        raise UserError(str(err)) from err


def select_word(explainer: Explainer, session: Session, segment: int,
                settings: Settings) -> Iterator[tuple[Session, Rendered]]:
    """A click on the caption (the `segment`-th highlighted segment)."""
    if session.caption is None:
        raise UserError(WRITING if session.image is not None else "Upload an image first: there is nothing to "
                        "explain yet.")
    word = word_for_segment(session.caption, segment)
    if word is None:
        raise UserError("That is not a word (punctuation or space). Click a word.")
    yield from explain(explainer, session, word, settings)


def select_candidate(explainer: Explainer, session: Session, label: str | None,
                     settings: Settings) -> tuple[Session, Rendered]:
    """Take another of the candidate regions (chosen from the list by its label) as the word's region: the
    picture switches to the region view and shows it, and the status line and the trust numbers follow it."""
    if session.explanation is None or session.explanation.grounding is None:
        raise UserError("Explain a word first.")
    labels = candidate_labels(session.explanation)
    index = labels.index(label) if label in labels else 0
    explanation = explainer.choose_region(session.image, session.explanation, index)
    session = replace(session, explanation=explanation, candidate=index, view="region")
    return session, render(session, settings)


def select_view(session: Session, view: str, settings: Settings) -> tuple[Session, Rendered]:
    """Show another view (the region or a map) large; drawing only: the small maps stay as they are."""
    if view not in views():
        raise UserError(f"Unknown view {view!r}; choose one of {', '.join(views())}.")
    session = replace(session, view=view)
    return session, render(session, settings, grid=False)


def select_tile(session: Session, tile: int, settings: Settings) -> tuple[Session, Rendered]:
    """A click on the `tile`-th small map: it becomes the large view."""
    keys = list(session.explanation.maps) if session.explanation is not None else []
    if not 0 <= tile < len(keys):
        raise UserError("Explain a word first; then pick one of its maps.")
    return select_view(session, keys[tile], settings)


def candidate_labels(explanation: Explanation) -> list[str]:
    grounding = explanation.grounding
    if grounding is None:
        return []
    return [f"{i + 1}. {c.label} — p={c.probability:.2f}" for i, c in enumerate(grounding.candidates)]


def render(session: Session, settings: Settings, grid: bool = True) -> Rendered:
    """Draw the session's view of its explanation large and, with `grid`, every map small (no model is run), and
    make the trust panel. On a generated scene the true object is outlined and every map scored against it."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        return Rendered(None, "", "", [] if grid else None, [], "", Table([], []), NO_WORD)
    truth = ground_truth(explanation, session.scene)
    picture = draw_view(image, explanation, session.view, settings)
    label = view_label(session.view, explanation)
    if truth is not None:
        picture = draw_outline(picture, truth.mask) if picture is not None else None
        label += " · white outline: the true object (generated scene)"
    heatmap = explanation.maps.get(session.view)
    legend = colour_bar(settings, heatmap.signed and settings.signed) if heatmap is not None else ""
    return Rendered(enlarged(picture) if picture is not None else None, label, legend,
                    map_grid(image, explanation, truth, settings) if grid else None, candidate_labels(explanation),
                    summary(explanation, session.speaker), trust_table(explanation, truth), status_line(explanation),
                    explanation.to_dict())


def map_grid(image: Image.Image, explanation: Explanation, truth: GroundTruth | None,
             settings: Settings) -> list[tuple[Image.Image, str]]:
    """Every map of the explanation small, in `Explanation.maps` order, captioned (in the picture and beside it)
    with its map's name and, on a generated scene, whether its peak is on the true object ("hit") and how much of
    its mass is."""
    tiles = []
    for key, picture in draw_maps(image, explanation, settings, max_side=GRID_SIDE).items():
        lines = [map_title(key)]
        if truth is not None:
            picture = draw_outline(picture, truth.mask)
            lines.append(f"{'hit' if truth.hit(key) else 'miss'} · {truth.scores[key]['mass']:.0%} on the object")
        tiles.append((captioned(picture, lines, GRID_SIDE), " · ".join(lines)))
    return tiles


def colour_bar(settings: Settings, signed: bool) -> str:
    """What the colours of the large view mean, as HTML: a bar from the weakest to the strongest values, each
    colour as opaque as it is drawn (over grey, as over a photo)."""
    stops = ", ".join(f"rgba({r}, {g}, {b}, {alpha:.2f}) {position:.0f}%" for (value, (r, g, b), alpha), position
                      in zip(colours(settings, signed), range(0, 101, 10)))
    low, high = ("evidence against the word", "for the word") if signed else ("0: the photo as it is", "strongest")
    middle = "<span>0</span>" if signed else ""
    return (f'<div class="colour-bar"><div style="height: 12px; border-radius: 3px; background: linear-gradient(to '
            f'right, {stops}), #999;"></div><div style="display: flex; justify-content: space-between; font-size: '
            f'0.8em;"><span>{low}</span>{middle}<span>{high} (the top {settings.clip_percent:g}% of the map\'s mass '
            f'and above)</span></div></div>')


def draw_view(image: Image.Image, explanation: Explanation, view: str, settings: Settings) -> Image.Image | None:
    if view == "region":
        return draw_region(image, explanation.grounding.mask) if explanation.grounding is not None else None
    heatmap = explanation.maps.get(view)
    return draw_map(image, heatmap, settings) if heatmap is not None else None


def view_label(view: str, explanation: Explanation) -> str:
    """The line under the large view: which method and layer made the map, or why there is none — switched off,
    impossible for this captioner, failed (and why), or still coming (Markdown; no user text in it)."""
    if view == "region":
        grounding = explanation.grounding
        if grounding is not None:
            return (f"Region among {explanation.segmenter} proposals: **{html.escape(grounding.label)}**"
                    f"{'' if grounding.decided else ' (CLIP cannot decide)'}.")  # no query here: see `status_line`
        return "Still being computed…" if "region" in explanation.pending else "No region: grounding is off."
    heatmap = explanation.maps.get(view)
    if heatmap is not None:
        return f"**{views()[view]}**: {html.escape(heatmap.method)} · {html.escape(heatmap.layer)}"
    for reasons in (explanation.unavailable_maps, explanation.failed_maps):
        if view in reasons:  # e.g. cross-attention maps of a decoder without cross-attention
            return html.escape(reasons[view])
    map_type = MAP_TYPES.get(view)
    if (map_type is not None and explanation.settings is not None
            and map_type.from_settings(explanation.settings) is None):
        return f"**{views()[view]}** is off — turn it on in Settings (Maps)."
    if explanation.pending:
        return "Still being computed…"
    return f"**{views()[view]}** was not computed: it needs a model this page runs without (see the notes)."


def status_line(explanation: Explanation) -> str:
    """One sentence on what was explained, and what is still being computed, as HTML. Every text in it is
    escaped (a query is whatever a visitor typed), and it is HTML rather than Markdown because Markdown turns
    a typed address into a link even when it is escaped."""
    what = " ".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query
    where = "in the caption" if explanation.in_caption else f"after the prompt “{html.escape(explanation.context)}”"
    line = (f"Explained <strong>{html.escape(what)}</strong> {where}: p = {explanation.word_probability:.3f} "
            f"(log p = {explanation.word_logprob:.2f}).")
    if explanation.grounding is not None:
        line += " " + region_sentence(explanation.grounding)
    if explanation.pending:
        line += f" Computing {', '.join(explanation.pending)}…"
    notes = [note for note in explanation.notes if "not in the caption" not in note]
    notes += explanation.failed_maps.values()
    return f"<p>{line}</p>" + "".join(f"<p>• {html.escape(note)}</p>" for note in notes)


def region_sentence(grounding: Grounding) -> str:
    """What the status line says of the region (HTML, escaped): the phrase that was grounded and the region
    chosen for it, or, when the probabilities are nearly flat (`Grounding.decided`), that CLIP cannot decide."""
    phrase = f"Region of “{html.escape(grounding.query)}”"
    if not grounding.decided:
        rival = grounding.rival
        return (f"{phrase}: CLIP cannot decide between <strong>{html.escape(grounding.label)}</strong> "
                f"(p = {grounding.score:.2f}) and <strong>{html.escape(rival.label)}</strong> (p = "
                f"{rival.probability:.2f}) elsewhere; the first is shown, pick another below.")
    return (f"{phrase}: <strong>{html.escape(grounding.label)}</strong> (p = {grounding.score:.2f}"
            f"{', the whole image won' if grounding.baseline_won else ''}).")


# --- the trust panel -----------------------------------------------------------------------------------------

def summary(explanation: Explanation, speaker: str) -> str:
    """The trust panel's first lines, as HTML (every text escaped): how sure `speaker` (the captioner) was of
    the word, whether the picture made it likelier, which region CLIP chose and how decidedly; then what the
    region check found; then, folded, how to read each number."""
    what = html.escape(" ".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query)
    probability = _percent(explanation.word_probability)
    if explanation.in_caption:
        parts = [f"<strong>{html.escape(speaker)} is {probability} sure of “{what}”</strong>"]
    else:
        parts = [f"<strong>{html.escape(speaker)} gives “{what}” {probability} after “"
                 f"{html.escape(explanation.context)}”</strong>"]
    evidence = explanation.image_evidence
    if evidence is not None:
        parts.append(f"the picture made it likelier ({evidence:+.2f})" if evidence > BARELY else
                     f"the picture barely changed it ({evidence:+.2f})" if evidence >= -BARELY else
                     f"it is likelier without the picture ({evidence:+.2f}): the language model's habit")
    if explanation.grounding is not None:
        parts.append(region_summary(explanation.grounding))
    lines = ["; ".join(parts) + "."]
    check = explanation.verification
    if check is not None:
        says = "still says" if check.region_says_word else "does not say"
        delta = check.delta_logprob_blurred
        blurred = ("barely changes it" if abs(delta) < 0.005 else f"lowers its log p by {-delta:.2f}" if delta < 0
                   else f"raises its log p by {delta:.2f}")
        lines.append(f"Shown only that region, {html.escape(speaker)} {says} “{what}” (its caption: “"
                     f"{html.escape(check.region_caption)}”); blurring the region away {blurred}.")
    if explanation.pending:
        lines.append(f"Still computing: {', '.join(explanation.pending)}…")
    return "".join(f"<p>{line}</p>" for line in lines) + _reading(explanation, speaker)


def region_summary(grounding: Grounding) -> str:
    """What the summary says of the region (HTML, escaped): which region CLIP chose and how decidedly
    (`Grounding.decided`), next to the best region elsewhere in the picture (`Grounding.rival`)."""
    label = html.escape(grounding.label)
    if grounding.baseline_won:
        return f"CLIP prefers the whole image to every region (p {grounding.score:.2f})"
    if grounding.candidates and grounding.candidates[0].label != grounding.label:
        return f"you chose {label} (p {grounding.score:.2f})"
    rival = grounding.rival
    if rival is None:
        return f"CLIP chose {label} (p {grounding.score:.2f})"
    how = "prefers" if grounding.decided else "barely prefers"
    return (f"CLIP {how} {label} (p {grounding.score:.2f}; best elsewhere: {html.escape(rival.label)}, "
            f"p {rival.probability:.2f})")


def _reading(explanation: Explanation, speaker: str) -> str:
    """How to read the trust panel's numbers, folded away (HTML)."""
    speaker = html.escape(speaker)
    items = [f"<b>Sure</b>: {speaker}'s probability of the word's tokens after the caption so far (teacher forcing).",
             "<b>The picture</b>: log p(word | photo) − log p(word | blank grey image). Positive: the picture made the "
             "word likelier; zero or negative: the language model would say it anyway."]
    grounding, check = explanation.grounding, explanation.verification
    if grounding is not None:
        items.append(f"<b>Region</b>: CLIP's probability for each candidate region, a softmax over all of them and "
                     f"the whole image; CLIP “barely prefers” its region when a region elsewhere (overlapping it by "
                     f"less than half) has more than 1/{DECISIVE_RATIO:g} of its probability. CLIP's similarity to "
                     f"“{html.escape(grounding.prompt)}”: region {grounding.similarity:.3f}, whole image "
                     f"{grounding.image_similarity:.3f}.")
    if check is not None:
        items.append(f"<b>Region check</b>: {speaker} captions the region alone (the rest greyed out); and the word's "
                     "log p with the region blurred away, against the photo (negative: the word needed the region).")
    items.append("<b>The table</b>: per map, the share of its mass inside the region and on the true object (on a "
                 "generated scene), next to chance — the area's share of the image, which a random map puts there; "
                 "“hit” when the map's peak is on the true object.")
    return ("<details><summary>How to read these numbers</summary><ul>"
            + "".join(f"<li>{item}</li>" for item in items) + "</ul></details>")


def _percent(probability: float) -> str:
    """A probability as a percentage that is never rounded to a certainty it is not (99.97% is not "100.0%")."""
    if probability >= 0.9995:
        return "more than 99.9%"
    return f"{probability:.1%}" if probability >= 0.001 else f"{probability * 100:.2g}%"


def trust_table(explanation: Explanation, truth: GroundTruth | None) -> Table:
    """One row per map: its mass in the region and on the true object side by side, chance stated once in the
    column's header (the area's share of the image), and whether its peak is on the object."""
    check, grounding = explanation.verification, explanation.grounding
    headers, columns = ["Map"], []
    if check is not None:
        headers.append(f"In the region (chance {grounding.mask.mean():.0%})")
        columns.append(lambda key: f"{check.mass_inside[key]:.0%}" if key in check.mass_inside else "—")
    elif "trust numbers" in explanation.pending:
        headers.append("In the region")
        columns.append(lambda key: "…")
    if truth is not None:
        headers += [f"On the true object (chance {truth.object_share:.0%})", "Peak on the object"]
        columns += [lambda key: f"{truth.scores[key]['mass']:.0%}", lambda key: "hit" if truth.hit(key) else "miss"]
    if not columns:
        return Table([], [])
    return Table(headers, [[map_title(key), *(column(key) for column in columns)] for key in explanation.maps])


# --- the sanity check ----------------------------------------------------------------------------------------

#: The sanity check's verdicts as the table says them (the table's label says how they are reached).
VERDICTS = {"passes": "passes", "fails": "fails: barely depends on the learned weights",
            "undefined": "undefined: the map is constant"}
#: What the sanity check's table is, above it.
SANITY_LABEL = (f"Sanity check: Spearman ρ of each map with itself once the captioner's top vision blocks are "
                f"re-initialised; with all of them, a map passes at ρ ≤ {FLAG_ABOVE:g} (it depends on what the model "
                f"learned) and fails above (it explains the architecture or the image); a constant map has no ρ")


def sanity_check(explainer: Explainer, session: Session) -> Iterator[Table]:
    """The sanity check of the word on screen, step by step: the table after each step of the cascade (top 1, 2,
    4, … vision blocks re-initialised), the verdict with all of them re-initialised (as the README's table)."""
    explanation = session.explanation
    if explanation is None or session.image is None:
        raise UserError("Explain a word first; then check its maps.")
    levels = cascade_levels(len(explainer.captioner.vision_layers))
    steps: list[SanityCheck] = []
    yield sanity_table(explanation, steps, levels)
    for step in explainer.sanity_cascade(session.image, explanation):
        steps.append(step)
        yield sanity_table(explanation, steps, levels)


def sanity_table(explanation: Explanation, steps: list[SanityCheck], levels: list[int]) -> Table:
    """[map, ρ per step, verdict] rows; "…" for the steps still coming."""
    headers = ["Map", *(f"top {blocks}" for blocks in levels[:-1]), f"all {levels[-1]} (verdict)", "Verdict"]
    rows = []
    for key in explanation.maps:
        values = [step.correlations.get(key) for step in steps]
        if steps and values[0] is None:
            rows.append([map_title(key), *("—" for _ in levels), "— not the captioner's map"])
            continue
        shown = [_correlation(value) for value in values] + ["…"] * (len(levels) - len(steps))
        final = VERDICTS[verdict(values[-1])] if len(steps) == len(levels) else "…"
        rows.append([map_title(key), *shown, final])
    return Table(headers, rows)


def _correlation(value: float) -> str:
    return "undefined" if verdict(value) == "undefined" else f"{value:.2f}"


def warm_examples(explainer: Explainer, paths: list[str], settings: Settings = DEFAULTS) -> None:
    """Caption the example photos and explain all their words in the background, so that a visitor who
    picks an example gets answers at once (Gradio's own example caching cannot hold per-user state). A generated
    scene among them also builds `find_scene`'s index here, not on a visitor's first upload."""
    for path in paths:
        image = load_image(path)
        find_scene(image)
        explainer.precompute_async(image, explainer.caption(image, settings), settings)


def compare_captions(explainers: Explainers, names: list[str], image: ImageInput | None,
                     settings: Settings) -> list[list[tuple[str, float | None]]]:
    """Caption the same image with several captioners, to compare them: clickable segments each.
    A captioner that cannot be loaded (say, ClipCap without its checkpoint file) says why in its place."""
    if image is None:
        raise UserError("Upload an image first, then compare captioners.")
    results = []
    for name in names:
        try:
            # no background precompute: one per captioner would slow down the click the user makes next
            _, session, _ = caption_image(explainers.get(name), image, settings, Session(), precompute=False)
        except ModelUnavailableError as err:
            results.append([(f"Captioner '{name}' is not available: {err}", None)])
            continue
        results.append(caption_segments(session.caption))
    return results


# --- stateless API (gradio_client) ----------------------------------------------------------------------------

def api_caption(explainer: Explainer, image: ImageInput | None, settings: Settings = DEFAULTS) -> dict[str, Any]:
    """/caption: the caption with its words, spans and log-probabilities (no background work is started)."""
    if image is None:
        raise UserError("Send an image.")
    _, session, _ = caption_image(explainer, image, settings, Session(), precompute=False)
    return session.caption.to_dict()


def api_explain(explainer: Explainer, image: ImageInput | None, word: int | None = None, text: str | None = None,
                occurrence: int = 1, settings: Settings = DEFAULTS,
                sanity: bool = False) -> tuple[WordExport, dict[str, Image.Image]]:
    """/explain: the explanation of caption word number `word`, or of `text` (its `occurrence`-th appearance
    among the caption's words, else a caption phrase or a free query), with its ground truth on a generated scene
    and, if asked, its sanity check; and its drawings by name ("region" and every map key)."""
    if image is None:
        raise UserError("Send an image.")
    if (word is None) == (text is None or not text.strip()):
        raise UserError("Give either a word position (word=…) or a text (text=…), not both and not neither.")
    _, session, _ = caption_image(explainer, image, settings, Session(), precompute=False)
    query = word if word is not None else _occurrence(session.caption, text, occurrence)
    *_, (session, _) = explain(explainer, session, query, settings)
    explanation = session.explanation
    drawings = draw_maps(session.image, explanation, settings)
    if explanation.grounding is not None:
        drawings["region"] = draw_region(session.image, explanation.grounding.mask)
    checked = SanityCascade(tuple(explainer.sanity_cascade(session.image, explanation))) if sanity else None
    return WordExport(explanation, ground_truth(explanation, session.scene), checked), drawings


def _occurrence(caption: Caption, text: str, occurrence: int) -> int | str:
    """The index of the `occurrence`-th caption word equal to `text` (case-insensitive); `text` itself when it is
    not a single caption word (a phrase or a free query), which only its first occurrence can be."""
    if occurrence < 1:
        raise UserError(f"occurrence counts from 1, got {occurrence}.")
    matches = [word.index for word in caption.words if word.text.lower() == text.strip().lower()]
    if len(matches) >= occurrence:
        return matches[occurrence - 1]
    if occurrence > 1:
        raise UserError(f"'{text}' appears {len(matches)} time(s) in the caption, not {occurrence}.")
    return text


# --- export ------------------------------------------------------------------------------------------------

def export(explainer: Explainer, session: Session, settings: Settings) -> str:
    """Zip what the page shows for the word (`ipag.export.image_export`: the image, and the word's folder with
    its ground truth on a generated scene and its sanity check if it was run) for download; returns the zip's
    path. Exports older than an hour are deleted, so a long-running server does not fill its disk (Gradio keeps
    its own copy)."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        raise UserError("Explain a word first; then download it.")
    word = WordExport(explanation, ground_truth(explanation, session.scene),
                      explainer.cached_sanity(image, explanation))
    header = {"image": Path(session.source).name if session.source else None}
    name = "_".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query
    return str(write_zip(image_export(image, session.caption, [word], settings, header),
                         fresh_path(f"ipag_{safe_name(name)}", ".zip")))


def fresh_path(stem: str, suffix: str) -> Path:
    """A new file name in the exports folder, after deleting the files there older than an hour."""
    EXPORTS.mkdir(parents=True, exist_ok=True)
    for old in EXPORTS.iterdir():
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return EXPORTS / f"{stem}_{uuid.uuid4().hex[:8]}{suffix}"


__all__ = ["PANELS", "SANITY_LABEL", "Rendered", "Session", "SettingWidget", "Table", "UserError",
           "api_caption", "api_explain", "caption_image", "caption_image_stream", "caption_label",
           "caption_segments", "compare_captions", "explain", "export", "instruction_box", "readiness",
           "render", "replan", "sanity_check", "select_candidate", "select_tile", "select_view",
           "select_word", "settings_panels", "summary", "trust_table", "views"]
