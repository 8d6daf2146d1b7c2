"""What the engine returns: plain dataclasses with numpy arrays, no tensors and no model references.

They are safe to cache, to hand to the UI, and to serialise (`to_dict`) for the API, the CLI and exports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .grounding.result import Grounding
from .images import normalize_map, resize_map
from .settings import Settings


@dataclass(frozen=True)
class Word:
    """One caption word: possibly several WordPiece tokens merged (``skate ##board`` → ``skateboard``)."""

    index: int  #: position among the caption's words (0-based); repeated words differ only by this
    text: str
    span: tuple[int, int]  #: character span ``[start, end)`` in `Caption.text`
    token_positions: tuple[int, ...]  #: positions in `Caption.token_ids` (position 0 is the BOS token)
    token_ids: tuple[int, ...]
    logprob: float  #: log p(word | image, previous words) = sum of its tokens' log-probabilities

    @property
    def probability(self) -> float:
        return float(np.exp(self.logprob))


@dataclass(frozen=True)
class Caption:
    """A generated caption, aligned to words. `token_ids` starts with the decoder's BOS token."""

    text: str
    words: tuple[Word, ...]
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]  #: the tokenizer's strings for `token_ids`
    token_logprobs: tuple[float, ...]  #: log p(y_t | image, y_<t); 0.0 for the BOS position
    captioner: str = ""
    #: What a vision-language model was asked (its prompt's instruction, at the start of `token_ids`); None for a
    #: captioner that takes no instruction.
    instruction: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "captioner": self.captioner,
            "instruction": self.instruction,
            "words": [
                {
                    "index": w.index,
                    "text": w.text,
                    "span": list(w.span),
                    "token_positions": list(w.token_positions),
                    "token_ids": list(w.token_ids),
                    "logprob": w.logprob,
                    "probability": w.probability,
                }
                for w in self.words
            ],
            "tokens": list(self.tokens),
            "token_logprobs": list(self.token_logprobs),
        }


#: Arrays larger than this are stored in float16 (relative precision ~5e-4, far below what a drawn map shows);
#: smaller ones — patch grids, window grids — stay float32, exactly as computed.
COMPACT_ABOVE = 4096


@dataclass(frozen=True, eq=False)
class Heatmap:
    """One attribution map, stored at the resolution it was computed at and drawn at any size on access.

    `raw` is the method's unnormalised attribution at the model's resolution (a patch grid, the pixels of the
    model's input, occlusion's window grid) for anyone who wants to post-process it, as Captum users expect.
    `display` is the evidence for the word, at the model's resolution: the positive part of `signed_display`
    (`raw`, unless the method puts it on another grid); every score and the default drawing use it. `values` is
    it resized to the input image and scaled to [0, 1] (H×W float32), computed when asked for: a full-size
    float map of a 12-megapixel photo is ~50 MB, a stored one a few hundred KB at most (`make` keeps
    pixel-sized maps in float16, scaled so that small gradients do not underflow). `signed` and `pixel_level`
    say how to draw it (`ipag.render`).
    """

    stored: np.ndarray  #: `raw / scale`, in a compact dtype
    scale: float
    size: tuple[int, int]  #: (width, height) of the input image
    method: str  #: e.g. "GradCAM", "cross-attention Grad-CAM", "saliency", "SmoothGrad"
    layer: str  #: which module it was taken from, e.g. "vision_model.encoder.layers.10"
    shown: np.ndarray | None = None  #: `signed_display` when it is not `raw` (compact too)
    signed: bool = False  #: the sign of `raw` means something: negative values are evidence against the word
    pixel_level: bool = False  #: one value per pixel of the model's input (noisy at that scale: drawn smoothed)

    @classmethod
    def make(cls, raw: np.ndarray, size: tuple[int, int], method: str, layer: str, display: np.ndarray | None = None,
             signed: bool = False, pixel_level: bool = False) -> "Heatmap":
        stored, scale = _compact(raw)
        shown = None if display is None else _compact(display, scaled=False)[0]
        return cls(stored, scale, size, method, layer, shown, signed, pixel_level)

    @property
    def raw(self) -> np.ndarray:
        return self.stored.astype(np.float32) * np.float32(self.scale)

    @property
    def signed_display(self) -> np.ndarray:
        """The method's values on the grid they are drawn on, with their sign."""
        return self.shown.astype(np.float32) if self.shown is not None else self.raw

    @property
    def display(self) -> np.ndarray:
        return np.maximum(self.signed_display, 0.0)

    @property
    def values(self) -> np.ndarray:
        """The map at the input image's size, in [0, 1] (H×W float32)."""
        return self.at(self.size)

    def at(self, size: tuple[int, int]) -> np.ndarray:
        """The map resized to `size` = (width, height) and scaled to [0, 1] by its maximum."""
        return normalize_map(resize_map(self.display, size))

    @property
    def nbytes(self) -> int:
        return self.stored.nbytes + (self.shown.nbytes if self.shown is not None else 0)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "raw_shape": list(self.stored.shape), "signed": self.signed}


def _compact(values: np.ndarray, scaled: bool = True) -> tuple[np.ndarray, float]:
    """(array, scale) with values ≈ array · scale: float32 as is when small, float16 divided by the largest
    magnitude when large (so that the largest value is ±1 and nothing underflows that matters when drawn)."""
    values = np.asarray(values, dtype=np.float32)
    if values.size <= COMPACT_ABOVE:
        return values, 1.0
    peak = float(np.abs(values).max()) if scaled and values.size else 0.0
    scale = peak if peak > 0 else 1.0
    return (values / scale).astype(np.float16), scale


@dataclass(frozen=True)
class Verification:
    """How far to trust the grounding, from both models' point of view (an improved iXIC check).

    - CLIP: is the region's composite closer to the query than the whole image?
    - BLIP shown only the region (the rest greyed out): does its caption still contain the word, and how
      likely is the word there (same context, teacher forcing)?
    - Deletion: Δlog p(word) when the region is blurred out of the full image (negative = the word needed
      the region).
    - How much of each heatmap's mass falls inside the region (1.0 = all of it).
    """

    clip_region: float
    clip_image: float
    region_caption: str
    region_says_word: bool
    region_logprob: float
    blurred_logprob: float
    delta_logprob_blurred: float
    mass_inside: dict[str, float]

    @property
    def clip_prefers_region(self) -> bool:
        return self.clip_region > self.clip_image

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"clip_prefers_region": self.clip_prefers_region}


@dataclass
class Explanation:
    """Why the captioner said a word (or would say a free query), for one image.

    The target explained is `word_logprob` = Σ_t log p(y_t | image, y_<t) over `tokens`, under teacher
    forcing on `context` (the caption so far, or a neutral prompt for free text).
    """

    query: str
    in_caption: bool  #: False when the query is free text explained after a neutral prompt
    words: tuple[Word, ...]  #: the caption words explained (empty for free text)
    tokens: tuple[str, ...]
    token_positions: tuple[int, ...]  #: positions of `tokens` in the teacher-forced sequence `token_ids`
    context: str  #: the text the decoder was conditioned on before the explained tokens
    word_logprob: float
    maps: dict[str, Heatmap]
    token_ids: tuple[int, ...]  #: the teacher-forced sequence (the caption's, or prompt + free query)
    image_size: tuple[int, int]  #: (width, height) of the input image
    caption: Caption | None = None
    #: Map key → why the captioner cannot have that map (no cross-attention map for a decoder without any).
    unavailable_maps: dict[str, str] = field(default_factory=dict)
    #: Map key → why computing that map failed (the others were computed).
    failed_maps: dict[str, str] = field(default_factory=dict)
    grounding: Grounding | None = None  #: the region CLIP matches to the query (None without CLIP)
    verification: Verification | None = None
    segmenter: str = ""  #: which segmenter proposed the regions
    notes: list[str] = field(default_factory=list)
    settings: Settings | None = None  #: the (resolved) settings it was computed with
    pending: tuple[str, ...] = ()  #: what is still being computed, for a partial explanation (see `explain_stages`)
    prior_logprob: float | None = None  #: log p of the same tokens when the image is blank (the language prior)

    @property
    def image_evidence(self) -> float | None:
        """log p(word | image) − log p(word | blank image): how much the picture, not the language model,
        made the word likely (≤ 0: the captioner would have said it anyway)."""
        return None if self.prior_logprob is None else self.word_logprob - self.prior_logprob

    @property
    def word_probability(self) -> float:
        return float(np.exp(self.word_logprob))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (maps described, not inlined: export them as images)."""
        return {
            "query": self.query,
            "in_caption": self.in_caption,
            "words": [w.text for w in self.words],
            "word_indices": [w.index for w in self.words],
            "tokens": list(self.tokens),
            "token_positions": list(self.token_positions),
            "token_ids": list(self.token_ids),
            "context": self.context,
            "word_logprob": self.word_logprob,
            "word_probability": self.word_probability,
            "prior_logprob": self.prior_logprob,
            "image_evidence": self.image_evidence,
            "maps": {name: heatmap.describe() for name, heatmap in self.maps.items()},
            "unavailable_maps": dict(self.unavailable_maps),
            "failed_maps": dict(self.failed_maps),
            "image_size": list(self.image_size),
            "caption": self.caption.text if self.caption else None,
            "grounding": self.grounding.to_dict() if self.grounding else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "segmenter": self.segmenter,
            "notes": list(self.notes),
            "captioner": self.caption.captioner if self.caption else None,
            "settings": self.settings.to_dict() if self.settings else None,
        }
