"""CLIP relevance: where CLIP's image embedding matches the word's prompt (Chefer et al. 2021).

Not an explanation of the captioner: it is CLIP's own view of where the word is, the map the original IPAG showed
through CLIP_Explainability, and the evidence behind the grounding's choice of region. It is computed with the
same prompt the region was chosen with, so it explains the same comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings import Settings
from .base import MapContext, MapType


@dataclass(frozen=True)
class ClipRelevanceMap(MapType):
    """Gradient-weighted attention rollout of cos(CLIP image embedding, prompt embedding), on CLIP's patch grid."""

    key = "clip_relevance"
    title = "CLIP relevance"
    needs = "own"
    needs_clip = True
    method = "CLIP relevance (Chefer et al. 2021)"
    template: str = "a photo of {}"

    @classmethod
    def from_settings(cls, settings: Settings) -> "ClipRelevanceMap | None":
        return cls(settings.template) if settings.grounding else None

    def layer(self, context: MapContext) -> str:
        return f"{context.clip.name} vision transformer, all blocks"

    def _raw(self, context: MapContext) -> np.ndarray:
        return context.clip.relevance(context.image, self.template.format(context.text))
