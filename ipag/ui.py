"""The playground's behaviour as plain functions: no Gradio layout and no model code here.

`playground.py` wires Gradio components to these functions. Each takes the shared `Explainer` (models are
loaded once per process) plus the user's own `Session` (kept in `gr.State`, never in a module global) and
returns plain values, so every function is unit-tested without a browser.
"""

from __future__ import annotations

import html
import io
import json
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import ModelUnavailableError, QueryError
from .explainer import Explainer, Explainers, GroundingSettings, MapSettings
from .images import ImageError, ImageInput, load_image
from .perturbation import Occlusion
from .render import overlay, region_image
from .results import Caption, Explanation

#: Map keys in display order, with the tab titles the page shows.
MAP_TITLES = {
    "gradcam": "Grad-CAM (vision encoder)",
    "saliency": "Saliency",
    "cross_attention": "Cross-attention Grad-CAM",
    "clip_relevance": "CLIP relevance",
    "occlusion": "Occlusion (Δlog p)",
}
NO_WORD = "Click a caption word, or type a word and press Explain."
EXPORTS = Path(tempfile.gettempdir()) / "ipag-exports"


class UserError(Exception):
    """Something the user can fix; shown as a message, and the app carries on."""


@dataclass
class Session:
    """One user's state: their image, its caption and the explanation on screen."""

    image: Image.Image | None = None
    caption: Caption | None = None
    explanation: Explanation | None = None
    captioner: str | None = None  #: which captioner made `caption` (None: the default one)
    query: int | str | None = None  #: what `explanation` answers (a word index or typed text)
    candidate: int = 0  #: which of the explanation's candidate regions is shown


@dataclass(frozen=True)
class View:
    """Every setting of the page that changes what is computed or drawn for a word."""

    cam_method: str = "GradCAM"
    vision_layer: int = -1
    cross_attention_layer: int | None = None  #: None: the explainer's default layer
    saliency: str = "gradient"  #: "gradient" or "SmoothGrad"
    segmenter: str | None = None  #: None: the explainer's default
    template: str = "a photo of {}"
    stage2: bool = False
    fusion_weight: float = 0.0
    occlusion: bool = False
    opacity: float = 0.5
    colormap: str = "jet"

    @classmethod
    def of(cls, *values: Any) -> "View":
        """Build a view from the settings components' values, in field order."""
        return cls(*values)

    def map_settings(self) -> MapSettings:
        cross = None if self.cross_attention_layer is None else int(self.cross_attention_layer)
        return MapSettings(cam_method=self.cam_method, vision_layer=int(self.vision_layer), cross_attention_layer=cross,
                           smoothgrad_samples=8 if self.saliency == "SmoothGrad" else 0,
                           occlusion=Occlusion() if self.occlusion else None)

    def grounding_settings(self) -> GroundingSettings:
        return GroundingSettings(segmenter=self.segmenter, template=self.template, stage2=bool(self.stage2),
                                 fusion_weight=float(self.fusion_weight))


@dataclass
class Rendered:
    """Everything the output panel shows for one explanation."""

    region: Image.Image | None
    maps: dict[str, Image.Image | None]
    candidates: list[str]
    trust: list[list[Any]]
    status: str
    details: dict[str, Any] = field(default_factory=dict)


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


def caption_image(explainer: Explainer, image: ImageInput | None, num_beams: int, max_tokens: int,
                  session: Session, precompute: bool = True) -> tuple[list[tuple[str, float | None]], Session, str]:
    """Caption a new image: returns the clickable caption, the user's new session and a status line.
    With `precompute`, every word is then explained in the background so that clicks only render."""
    if image is None:
        return [], Session(), "Upload an image, take a webcam photo, paste one or pick an example."
    try:
        rgb = load_image(image)
        caption = explainer.caption(rgb, num_beams=int(num_beams), max_new_tokens=int(max_tokens))
    except (ImageError, ValueError) as err:
        raise UserError(str(err)) from err
    session = Session(image=rgb, caption=caption)
    if precompute:  # with the default settings, which most clicks use
        view = View()
        explainer.precompute_async(rgb, caption, view.map_settings(), view.grounding_settings())
    if not caption.words:
        return caption_segments(caption), session, "The caption has no words to explain; type a query instead."
    return caption_segments(caption), session, f"{len(caption.words)} words. {NO_WORD}"


# --- explaining --------------------------------------------------------------------------------------------

def explain(explainer: Explainer, session: Session, query: int | str, view: View) -> tuple[Session, Rendered]:
    """Explain a caption word (by index) or typed text for the session's image, and render it."""
    if session.image is None or session.caption is None:
        raise UserError("Upload an image first: there is nothing to explain yet.")
    try:
        explanation = explainer.explain(session.image, query, caption=session.caption,
                                        settings=view.map_settings(), grounding=view.grounding_settings())
    except (QueryError, ValueError) as err:
        raise UserError(str(err)) from err
    session = replace(session, explanation=explanation, query=query, candidate=0)
    return session, render(session, view)


def select_word(explainer: Explainer, session: Session, segment: int, view: View) -> tuple[Session, Rendered]:
    """A click on the caption (the `segment`-th highlighted segment)."""
    if session.caption is None:
        raise UserError("Upload an image first: there is nothing to explain yet.")
    word = word_for_segment(session.caption, segment)
    if word is None:
        raise UserError("That is not a word (punctuation or space). Click a word.")
    return explain(explainer, session, word, view)


def select_candidate(session: Session, label: str | None, view: View) -> tuple[Session, Rendered]:
    """Show another of the candidate regions (chosen from the list by its label)."""
    if session.explanation is None or session.explanation.grounding is None:
        raise UserError("Explain a word first.")
    labels = candidate_labels(session.explanation)
    session = replace(session, candidate=labels.index(label) if label in labels else 0)
    return session, render(session, view)


def candidate_labels(explanation: Explanation) -> list[str]:
    grounding = explanation.grounding
    if grounding is None:
        return []
    return [f"{i + 1}. {c.label} — p={c.probability:.2f}" for i, c in enumerate(grounding.candidates)]


def render(session: Session, view: View) -> Rendered:
    """Draw the session's explanation with the view's colour map and opacity (no model is run)."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        return Rendered(None, {key: None for key in MAP_TITLES}, [], [], NO_WORD)
    maps = {key: (overlay(image, explanation.maps[key].values, view.colormap, float(view.opacity))
                  if key in explanation.maps else None) for key in MAP_TITLES}
    grounding = explanation.grounding
    region = None
    if grounding is not None:
        shown = grounding.candidates[min(session.candidate, len(grounding.candidates) - 1)]
        region = region_image(image, shown.mask)
    return Rendered(region, maps, candidate_labels(explanation), trust_rows(explanation),
                    status_line(explanation), explanation.to_dict())


def status_line(explanation: Explanation) -> str:
    """One sentence on what was explained; user text is escaped (it is shown as Markdown)."""
    what = " ".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query
    where = "in the caption" if explanation.in_caption else f"after the prompt “{explanation.context}”"
    line = (f"Explained **{html.escape(what)}** {where}: p = {explanation.word_probability:.3f} "
            f"(log p = {explanation.word_logprob:.2f}).")
    notes = [note for note in explanation.notes if "not in the caption" not in note]
    grounding = explanation.grounding
    if grounding is not None:
        line += (f" Region: **{html.escape(grounding.label)}** (p = {grounding.score:.2f}"
                 f"{', the whole image won' if grounding.baseline_won else ''}).")
    return line + "".join(f"\n\n• {html.escape(note)}" for note in notes)


def trust_rows(explanation: Explanation) -> list[list[Any]]:
    """The trust panel: [measure, value, how to read it]."""
    rows: list[list[Any]] = [["Word probability", f"{explanation.word_probability:.3f}",
                              "How sure the captioner is of the word (teacher forcing)."]]
    grounding, check = explanation.grounding, explanation.verification
    if grounding is not None:
        rows.append(["Region probability", f"{grounding.score:.3f}",
                     "Softmax over all candidate regions and the whole image."])
    if check is not None:
        rows += [
            ["CLIP: region vs whole image", f"{check.clip_region:.3f} vs {check.clip_image:.3f}",
             "Yes, CLIP prefers the region." if check.clip_prefers_region else "No: CLIP prefers the whole image."],
            ["BLIP on the region alone says the word", "yes" if check.region_says_word else "no",
             f"Caption of the region alone: “{check.region_caption}”."],
            ["Δlog p(word), region blurred", f"{check.delta_logprob_blurred:+.3f}",
             "Negative: the word needed this region."],
        ]
        rows += [[f"{MAP_TITLES.get(key, key)} inside region", f"{share:.0%}",
                  "Share of the heatmap's mass inside the region."] for key, share in check.mass_inside.items()]
    return rows


def warm_examples(explainer: Explainer, paths: list[str]) -> None:
    """Caption the example photos and explain all their words in the background, so that a visitor who
    picks an example gets answers at once (Gradio's own example caching cannot hold per-user state)."""
    view = View()
    for path in paths:
        image = load_image(path)
        caption = explainer.caption(image)
        explainer.precompute_async(image, caption, view.map_settings(), view.grounding_settings())


def compare_captions(explainers: Explainers, names: list[str], image: ImageInput | None, num_beams: int,
                     max_tokens: int) -> list[list[tuple[str, float | None]]]:
    """Caption the same image with several captioners (seeds 002/004 compare them): clickable segments each."""
    if image is None:
        raise UserError("Upload an image first, then compare captioners.")
    results = []
    for name in names:
        try:
            # no background precompute: one per captioner would slow down the click the user makes next
            _, session, _ = caption_image(explainers.get(name), image, num_beams, max_tokens, Session(),
                                          precompute=False)
        except ModelUnavailableError as err:
            raise UserError(f"Captioner '{name}' is not available: {err}") from err
        results.append(caption_segments(session.caption))
    return results


# --- stateless API (gradio_client) ----------------------------------------------------------------------------

def api_caption(explainer: Explainer, image: ImageInput | None, num_beams: int = 1,
                max_tokens: int = 20) -> dict[str, Any]:
    """/caption: the caption with its words, spans and log-probabilities."""
    _, session, _ = caption_image(explainer, image, num_beams, max_tokens, Session())
    if session.caption is None:
        raise UserError("Send an image.")
    return session.caption.to_dict()


def api_explain(explainer: Explainer, image: ImageInput | None, query: str, cam_method: str = "GradCAM",
                saliency: str = "gradient", template: str = "a photo of {}") -> tuple:
    """/explain: the explanation as JSON, then the region, Grad-CAM, saliency, cross-attention and CLIP images."""
    view = View(cam_method=cam_method, saliency=saliency, template=template)
    _, session, _ = caption_image(explainer, image, 1, 20, Session())
    session, rendered = explain(explainer, session, query, view)
    return (rendered.details, rendered.region, *(rendered.maps[key] for key in MAP_TITLES))


# --- export ------------------------------------------------------------------------------------------------

def export_files(session: Session, view: View) -> dict[str, bytes]:
    """The current explanation as files: `explanation.json`, the image, every overlay and raw map (PNG), and
    the region and its mask. Shared by the Export button and the batch CLI."""
    explanation, image = session.explanation, session.image
    if explanation is None or image is None:
        raise UserError("Explain a word first; then download it.")
    rendered = render(session, view)
    files = {"explanation.json": json.dumps(explanation.to_dict(), indent=2).encode(), "image.png": _png(image)}
    for key, picture in rendered.maps.items():
        if picture is not None:
            files[f"{key}_overlay.png"] = _png(picture)
            files[f"{key}.png"] = _png(Image.fromarray((explanation.maps[key].values * 255).round().astype(np.uint8)))
    if rendered.region is not None and explanation.grounding is not None:
        files["region.png"] = _png(rendered.region)
        files["region_mask.png"] = _png(Image.fromarray(explanation.grounding.mask.astype(np.uint8) * 255))
    return files


def export(session: Session, view: View) -> str:
    """Zip `export_files` for download; returns the zip's path. Exports older than an hour are deleted, so
    a long-running server does not fill its disk (Gradio keeps its own copy of what it served)."""
    files = export_files(session, view)
    EXPORTS.mkdir(parents=True, exist_ok=True)
    for old in EXPORTS.glob("*.zip"):
        if time.time() - old.stat().st_mtime > 3600:
            old.unlink(missing_ok=True)
    explanation = session.explanation
    name = "_".join(w.text for w in explanation.words) if explanation.in_caption else explanation.query
    path = EXPORTS / f"ipag_{safe_name(name)}_{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file_name, data in files.items():
            archive.writestr(file_name, data)
    return str(path)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def safe_name(name: str) -> str:
    """A file-name-safe version of user text."""
    return "".join(c if c.isalnum() else "-" for c in name)[:40] or "query"


__all__ = ["MAP_TITLES", "Rendered", "Session", "UserError", "View", "api_caption", "api_explain", "caption_image",
           "caption_segments", "compare_captions", "explain", "export", "export_files", "render", "select_candidate",
           "select_word", "trust_rows"]
