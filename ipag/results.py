"""What the engine returns: plain dataclasses with numpy arrays, no tensors and no model references.

They are safe to cache, to hand to the UI, and to serialise (`to_dict`) for the API, the CLI and exports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .grounding.result import Grounding


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

    def find(self, text: str) -> Word | None:
        """The first word whose text equals `text` (case-insensitive), or None."""
        wanted = text.strip().lower()
        return next((word for word in self.words if word.text.lower() == wanted), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "captioner": self.captioner,
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


@dataclass(frozen=True)
class Heatmap:
    """One attribution map: `values` is H×W float32 in [0, 1] at the input image's size.

    `raw` keeps the unnormalised attribution at the model's resolution (a patch grid, or pixels) for
    anyone who wants to post-process it differently, as Captum users expect.
    """

    values: np.ndarray
    raw: np.ndarray
    method: str  #: e.g. "GradCAM", "cross-attention Grad-CAM", "saliency", "SmoothGrad"
    layer: str  #: which module it was taken from, e.g. "vision_model.encoder.layers.10"

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "layer": self.layer, "raw_shape": list(self.raw.shape)}


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
    token_positions: tuple[int, ...]  #: positions of `tokens` in the teacher-forced sequence
    context: str  #: the text the decoder was conditioned on before the explained tokens
    word_logprob: float
    maps: dict[str, Heatmap]
    image_size: tuple[int, int]  #: (width, height) of the input image
    caption: Caption | None = None
    grounding: Grounding | None = None  #: the region CLIP matches to the query (None without CLIP)
    verification: Verification | None = None
    segmenter: str = ""  #: which segmenter proposed the regions
    notes: list[str] = field(default_factory=list)

    @property
    def gradcam(self) -> np.ndarray:
        return self.maps["gradcam"].values

    @property
    def saliency(self) -> np.ndarray:
        return self.maps["saliency"].values

    @property
    def cross_attention(self) -> np.ndarray:
        return self.maps["cross_attention"].values

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
            "context": self.context,
            "word_logprob": self.word_logprob,
            "word_probability": self.word_probability,
            "maps": {name: heatmap.describe() for name, heatmap in self.maps.items()},
            "image_size": list(self.image_size),
            "caption": self.caption.text if self.caption else None,
            "grounding": self.grounding.to_dict() if self.grounding else None,
            "verification": self.verification.to_dict() if self.verification else None,
            "segmenter": self.segmenter,
            "notes": list(self.notes),
        }
