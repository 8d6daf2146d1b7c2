"""The playground's behaviour as plain functions: no Gradio layout and no model code here.

`playground.py` wires Gradio components to these functions. Each takes the shared `Explainer` (models are
loaded once per process) plus the user's own `Session` (kept in `gr.State`, never in a module global) and the
page's `Settings`, and returns plain values, so every function is unit-tested without a browser. Explaining
is a generator: it yields the page's content after each stage (first maps, saliency, region, more maps,
trust numbers), so the page shows each output as soon as it exists.
"""

from __future__ import annotations

import html
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ModelUnavailableError, QueryError
from .evaluation.localisation import score_map
from .explainer import Explainer, Explainers
from .grounding import Grounding
from .export import export_files, safe_name, write_zip
from .images import ImageError, ImageInput, load_image
from .maps import CrossAttentionMap, map_titles
from .render import draw_map, draw_maps, draw_outline, draw_region, enlarged
from .results import Caption, Explanation
from .schedule import Plan
from .segmenters import available_segmenters
from .settings import DEFAULTS, Settings, Widget, declarations
from .synthetic.scenes import Scene, evidence_for, find_scene

NO_WORD = "Click a caption word, or type a word and press Explain."  #: plain text: fine as HTML too
WRITING = "The caption is being written; its words can be clicked once it is complete."
#: Input × gradient: the map that found the named object most often on the ground-truth benchmark among those that
#: pass the sanity check and cost no more than Grad-CAM (docs/evaluation.md).
DEFAULT_VIEW = "input_x_gradient"
EXPORTS = Path(tempfile.gettempdir()) / "ipag-exports"


class UserError(Exception):
    """Something the user can fix; shown as a message, and the app carries on."""


@dataclass
class Session:
    """One user's state: their image, its caption, the explanation on screen and the background precompute."""

    image: Image.Image | None = None
    caption: Caption | None = None
    explanation: Explanation | None = None
    captioner: str | None = None  #: which captioner made `caption` (None: the default one)
    query: int | str | None = None  #: what `explanation` answers (a word index or typed text)
    candidate: int = 0  #: which of the explanation's candidate regions is shown
    plan: Plan | None = None  #: every word of the caption, queued in the background with the page's settings
    view: str = DEFAULT_VIEW  #: which of `views()` the page shows large
    source: str | None = None  #: the file the image came from (the page shows it again after a bad upload)
    scene: Scene | None = None  #: the generated scene the image is, when it is one: its ground truth is known


@dataclass
class Rendered:
    """Everything the output panel shows for one explanation: the session's view drawn large (None when there
    is nothing to draw for it), the line under it, the candidate regions, the trust table, the status line."""

    picture: Image.Image | None
    label: str
    candidates: list[str]
    trust: list[list[Any]]
    status: str
    details: dict[str, Any] = field(default_factory=dict)


def views() -> dict[str, str]:
    """What the page can show in its large view, by key: the region first, then every registered map type."""
    return {"region": "Region", **map_titles()}


def map_title(key: str) -> str:
    return map_titles().get(key, key)


# --- the settings panel --------------------------------------------------------------------------------------

#: The page's settings panels, by the stages their settings affect.
PANELS = {"Captioner and decoding": ("caption",), "Maps": ("gradients", "maps"), "Region": ("grounding", "verification"),
          "Drawing": ("draw",)}


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


# --- captioning --------------------------------------------------------------------------------------------

def _segments(caption: Caption) -> list[tuple[str, float | None, int | None]]:
    """(text, probability, word index) for every word, and (text, None, None) for the text between words."""
    segments: list[tuple[str, float | None, int | None]] = []
    cursor = 0
    for word in caption.words:
        if word.span[0] > cursor:
            segments.append((caption.text[cursor:word.span[0]], None, None))
        segments.append((word.text, round(word.probability, 3), word.index))
        cursor = word.span[1]
    if cursor < len(caption.text):
        segments.append((caption.text[cursor:], None, None))
    return segments


def caption_segments(caption: Caption) -> list[tuple[str, float | None]]:
    """The caption for `gr.HighlightedText`: each word its own segment, coloured by its probability."""
    return [(text, score) for text, score, _ in _segments(caption)]


def word_for_segment(caption: Caption, segment: int) -> int | None:
    """The word index of the `segment`-th highlighted segment, or None for text between words."""
    segments = _segments(caption)
    return segments[segment][2] if 0 <= segment < len(segments) else None


def caption_image(explainer: Explainer, image: ImageInput | None, settings: Settings, session: Session,
                  precompute: bool = True) -> tuple[list[tuple[str, float | None]], Session, str]:
    """Caption a new image: returns the clickable caption, the user's new session and a status line.
    With `precompute`, every word is then explained in the background with `settings` (the page's), so that
    clicks only draw; the previous image's background work that has not started is dropped."""
    if image is None:
        return [], Session(), "Upload an image, take a webcam photo, paste one or pick an example."
    try:
        rgb = load_image(image)
        caption = explainer.caption(rgb, settings)
    except (ImageError, ValueError) as err:
        raise UserError(str(err)) from err
    if session.plan is not None:
        session.plan.cancel()
    plan = explainer.precompute_async(rgb, caption, settings) if precompute else None
    session = Session(image=rgb, caption=caption, captioner=session.captioner, plan=plan,
                      source=str(image) if isinstance(image, (str, Path)) else None, scene=find_scene(rgb))
    if not caption.words:
        return caption_segments(caption), session, "The caption has no words to explain; type a query instead."
    return caption_segments(caption), session, f"{len(caption.words)} words. {NO_WORD}"


def caption_image_stream(explainer: Explainer, image: ImageInput | None, settings: Settings,
                         session: Session) -> Iterator[tuple[list[tuple[str, float | None]], Session, str]]:
    """`caption_image`, with the caption shown while it is written: per token, the text so far (one segment, not
    clickable), a session with the image but no caption yet, and a status line; then what `caption_image`
    returns (the caption is cached by then)."""
    if image is not None:
        try:
            rgb = load_image(image)
            for written in explainer.caption_stream(rgb, settings):
                if isinstance(written, str):
                    yield [(written, None)], Session(image=rgb, captioner=session.captioner), WRITING
        except (ImageError, ValueError) as err:
            raise UserError(str(err)) from err
    yield caption_image(explainer, image, settings, session)


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
    after each stage of the computation, the last one complete."""
    if session.image is None or session.caption is None:
        raise UserError("Upload an image first: there is nothing to explain yet.")
    try:
        for explanation in explainer.explain_stages(session.image, query, session.caption, settings):
            session = replace(session, explanation=explanation, query=query, candidate=0)
            yield session, render(session, settings)
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
    """Show another view (the region or a map) large; drawing only."""
    if view not in views():
        raise UserError(f"Unknown view {view!r}; choose one of {', '.join(views())}.")
    session = replace(session, view=view)
    return session, render(session, settings)


def candidate_labels(explanation: Explanation) -> list[str]:
    grounding = explanation.grounding
    if grounding is None:
        return []
    return [f"{i + 1}. {c.label} — p={c.probability:.2f}" for i, c in enumerate(grounding.candidates)]


def render(session: Session, settings: Settings) -> Rendered:
    """Draw the session's view of its explanation with the settings' colour map and opacity (no model is run;
    only the view shown is drawn)."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        return Rendered(None, "", [], [], NO_WORD)
    picture = draw_view(image, explanation, session.view, settings)
    truth = true_evidence(session)
    label = view_label(session.view, explanation)
    rows = trust_rows(explanation)
    if truth is not None:
        picture = draw_outline(picture, truth) if picture is not None else None
        label += " · white outline: the true object (generated scene)"
        rows += truth_rows(explanation, truth)
    return Rendered(enlarged(picture) if picture is not None else None, label, candidate_labels(explanation), rows, status_line(explanation),
                    explanation.to_dict())


def true_evidence(session: Session) -> np.ndarray | None:
    """The mask of the object the explained word names, when the image is a generated scene (else None)."""
    explanation, scene = session.explanation, session.scene
    if scene is None or explanation is None or len(explanation.words) != 1 or explanation.caption is None:
        return None
    return evidence_for(scene, [word.text for word in explanation.caption.words], explanation.words[0].index)


def truth_rows(explanation: Explanation, truth: np.ndarray) -> list[list[Any]]:
    """Ground-truth rows of the trust table: per map, does its peak hit the true object, and how much of its mass
    lies on it (against the object's share of the image, which is what a random map puts there)."""
    rows = []
    for key, heatmap in explanation.maps.items():
        scores = score_map(heatmap.values, truth)
        rows.append([f"Ground truth: {map_title(key)}",
                     f"{'hit' if scores['pointing'] >= 0.5 else 'miss'} · {scores['mass']:.0%} on the object",
                     f"Peak on the true object? Share of the map's mass on it (the object is {truth.mean():.0%} "
                     "of the image, what a random map puts there)."])
    return rows


def draw_view(image: Image.Image, explanation: Explanation, view: str, settings: Settings) -> Image.Image | None:
    if view == "region":
        return draw_region(image, explanation.grounding.mask) if explanation.grounding is not None else None
    heatmap = explanation.maps.get(view)
    return draw_map(image, heatmap, settings) if heatmap is not None else None


def view_label(view: str, explanation: Explanation) -> str:
    """The line under the large view: which method and layer made the map, or why there is none (Markdown;
    no user text in it)."""
    if view == "region":
        grounding = explanation.grounding
        if grounding is not None:
            return (f"Region among {explanation.segmenter} proposals: **{html.escape(grounding.label)}**"
                    f"{'' if grounding.decided else ' (CLIP cannot decide)'}.")  # no query here: see `status_line`
        return "Still being computed…" if "region" in explanation.pending else "No region: grounding is off."
    heatmap = explanation.maps.get(view)
    if heatmap is not None:
        return f"**{views()[view]}**: {html.escape(heatmap.method)} · {html.escape(heatmap.layer)}"
    if view in explanation.unavailable_maps:  # e.g. cross-attention maps of a decoder without cross-attention
        return html.escape(explanation.unavailable_maps[view])
    if explanation.pending:
        return "Still being computed…"
    return f"{views()[view]} is not computed with these settings (see Settings), or it failed (see the notes)."


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


def trust_rows(explanation: Explanation) -> list[list[Any]]:
    """The trust panel: [measure, value, how to read it]; each reading follows its value."""
    rows: list[list[Any]] = [["Word probability", f"{explanation.word_probability:.3f}",
                              "How sure the captioner is of the word (teacher forcing)."]]
    evidence = explanation.image_evidence
    if evidence is not None:
        rows.append(["Evidence from the image: Δlog p(word), photo vs blank image", f"{evidence:+.3f}",
                     "Positive: the picture made the word likelier." if evidence > 0 else
                     "Not positive: the captioner says it as readily without the picture (language prior)."])
    grounding, check = explanation.grounding, explanation.verification
    if grounding is not None:
        rows.append(["Region probability", f"{grounding.score:.3f}",
                     "Softmax over all candidate regions and the whole image."])
    if check is not None:
        delta = check.delta_logprob_blurred
        rows += [
            ["CLIP: region vs whole image", f"{check.clip_region:.3f} vs {check.clip_image:.3f}",
             "Yes, CLIP prefers the region." if check.clip_prefers_region else "No: CLIP prefers the whole image."],
            ["BLIP on the region alone says the word", "yes" if check.region_says_word else "no",
             f"Caption of the region alone: “{check.region_caption}”."],
            ["Δlog p(word), region blurred", f"{delta:+.3f}",
             "About zero: blurring the region barely changed the word." if abs(delta) < 0.0005 else
             "Negative: the word needed this region." if delta < 0 else
             "Positive: the word did not need this region (it is likelier without it)."],
        ]
        chance = f"a random map puts {grounding.mask.mean():.0%} there"
        rows += [[f"{map_title(key)} inside region", f"{share:.0%}",
                  f"Share of the heatmap's mass inside the region ({chance})."]
                 for key, share in check.mass_inside.items()]
    return rows


def sanity_check(explainer: Explainer, session: Session) -> list[list[Any]]:
    """The sanity check of the word on screen, as rows [map, rank correlation, verdict]."""
    explanation = session.explanation
    if explanation is None or session.image is None:
        raise UserError("Explain a word first; then check its maps.")
    check = explainer.sanity_check(session.image, explanation)
    rows = []
    for key in explanation.maps:
        value = check.correlations.get(key)
        if value is None:
            rows.append([map_title(key), "—", "Not a map of the captioner (its weights do not enter it)."])
        else:
            verdict = ("Barely depends on the learned weights: it explains the architecture or the image, not "
                       "the model." if key in check.flagged else "Changes with the weights: it depends on what "
                       "the model learned.")
            rows.append([map_title(key), f"{value:.2f}", verdict])
    return rows


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
                occurrence: int = 1, settings: Settings = DEFAULTS) -> tuple[Explanation, dict[str, Image.Image]]:
    """/explain: the explanation of caption word number `word`, or of `text` (its `occurrence`-th appearance
    among the caption's words, else a caption phrase or a free query), and its drawings by name ("region" and
    every map key)."""
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
    return explanation, drawings


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

def export(session: Session, settings: Settings) -> str:
    """Zip the explanation's files (`ipag.export`) for download; returns the zip's path. Exports older than an
    hour are deleted, so a long-running server does not fill its disk (Gradio keeps its own copy)."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        raise UserError("Explain a word first; then download it.")
    name = "_".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query
    return str(write_zip(export_files(image, explanation, settings), fresh_path(f"ipag_{safe_name(name)}", ".zip")))


def fresh_path(stem: str, suffix: str) -> Path:
    """A new file name in the exports folder, after deleting the files there older than an hour."""
    EXPORTS.mkdir(parents=True, exist_ok=True)
    for old in EXPORTS.iterdir():
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    return EXPORTS / f"{stem}_{uuid.uuid4().hex[:8]}{suffix}"


__all__ = ["PANELS", "Rendered", "Session", "SettingWidget", "UserError", "api_caption", "api_explain",
           "caption_image", "caption_image_stream", "caption_segments", "compare_captions", "explain", "export", "render", "replan",
           "select_candidate", "select_word", "settings_panels", "trust_rows", "views"]
