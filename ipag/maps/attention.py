"""Raw cross-attention: where the decoder's attention went while it predicted the word. No gradient.

This is what attention captioners show as "where the model looked" (per-word attention plots, as in Show, Attend and Tell). It is
attention, not an explanation: a head may attend to a patch whose content it then ignores, which is why the
cross-attention Grad-CAM beside it weights the same probabilities by their gradient. Shown for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import MapContext
from .cross_attention import CrossAttentionMap


@dataclass(frozen=True)
class AttentionMap(CrossAttentionMap):
    """Mean over heads of the chosen decoder layer's cross-attention, summed over the rows predicting the word
    (the cross-attention Grad-CAM without its gradient weighting); over BLIP-2's queries, each weighted by how much
    the word reads it (`TargetGradients.row_weights`)."""

    key = "attention"
    title = "Attention"
    method = "cross-attention weights (attention, not an explanation)"

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        rows = gradients.attention.mean(axis=0)
        if gradients.row_weights is not None:
            rows = rows * gradients.row_weights[:, None]
        return gradients.attention_layout.place(rows.sum(axis=0))
