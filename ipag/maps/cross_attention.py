"""Decoder cross-attention Grad-CAM: where the decoder looked while predicting the word, weighted by how
much that look raised the word's log-probability (LAVIS's formula, adapted to generation). For a decoder-only
vision-language model, its self-attention from the word's rows to the image tokens; for BLIP-2, its Q-Former's
cross-attention from the queries to the patches (the gradient makes it the word's)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .base import MapContext, MapType

if TYPE_CHECKING:
    from ..captioners.base import Captioner


@dataclass(frozen=True)
class CrossAttentionMap(MapType):
    """mean over heads of A ⊙ ReLU(∂target/∂A), summed over the query rows that predict the word's tokens."""

    key = "cross_attention"
    title = "Cross-attention"
    method = "cross-attention Grad-CAM"

    def unavailable(self, captioner: "Captioner") -> str | None:
        if captioner.num_decoder_layers:
            return super().unavailable(captioner)
        reason = captioner.no_cross_attention
        return f"This captioner has no cross-attention{f': {reason}' if reason else ''}."

    def layer(self, context: MapContext) -> str:
        return context.gradients.attention_layer

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        weighted = gradients.attention * np.maximum(gradients.attention_gradients, 0.0)
        return gradients.attention_layout.place(weighted.mean(axis=0).sum(axis=0))
