"""Transformer relevancy (Chefer, Gur & Wolf, ICCV 2021): the word's relevance propagated through every
attention layer of the captioner, with the paper's rules.

Each layer's attention A is weighted by the target's gradient on it, Ā = mean over heads of (∇A ⊙ A)⁺, and
relevance accumulates over the residual stream. An encoder–decoder captioner (BLIP, ViT-GPT2, Florence-2) gets the
encoder–decoder rules: R_ii ← R_ii + Ā R_ii through the image encoder (its vision tower's blocks, or Florence-2's
text-and-image encoder); in each decoder layer, R_tt ← R_tt + Ā R_tt and R_ti ← R_ti + Ā R_ti for its
self-attention, then R_ti ← R_ti + R̄_ttᵀ Ā R̄_ii for its cross-attention (R̄: the relevance without its identity,
rows normalised, identity added back); the word's rows of R_ti over the image tokens are the map. A decoder-only
vision-language model, whose one sequence holds the image tokens and the text, gets the self-attention rules:
R ← R + Ā R through every layer, and the word's rows of R over the image tokens are the map. All the gradients
come from the word's one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .base import MapContext, MapType

if TYPE_CHECKING:
    from ..captioners.base import Captioner
    from ..target import TargetGradients


@dataclass(frozen=True)
class RelevancyMap(MapType):
    """The rows of R_ti that predict the word, summed, over the image's patch tokens."""

    key = "relevancy"
    title = "Relevancy"
    needs = "pixels"
    needs_attentions = True
    method = "transformer relevancy (Chefer et al. 2021)"

    def unavailable(self, captioner: "Captioner") -> str | None:
        if not captioner.exposes_attentions or not captioner.num_decoder_layers:
            return ("This captioner does not expose every attention map of a decoder that attends to the image, "
                    "which relevance propagation needs.")
        return super().unavailable(captioner)

    def layer(self, context: MapContext) -> str:
        return "every attention layer"

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        relevance = _encoder_decoder if gradients.layers("decoder_cross") else _decoder_only
        return gradients.attention_layout.place(relevance(gradients).numpy())


def _encoder_decoder(gradients: "TargetGradients") -> torch.Tensor:
    """The word's rows of R_ti, summed, over the decoder's cross-attention keys (the encoder–decoder rules)."""
    crosses = gradients.layers("decoder_cross")
    image = _accumulate(torch.eye(crosses[0][0].shape[-1]), gradients.layers("vision") + gradients.layers("encoder"))
    text_size = gradients.layers("decoder_self")[0][0].shape[-1]
    text, text_image = torch.eye(text_size), torch.zeros(text_size, image.shape[-1])
    for (self_attention, cross_attention) in zip(gradients.layers("decoder_self"), crosses):
        weighted = _weighted(*self_attention)
        text, text_image = text + weighted @ text, text_image + weighted @ text_image
        text_image = text_image + _without_residual(text).T @ _weighted(*cross_attention) @ _without_residual(image)
    return text_image[list(gradients.rows)].sum(dim=0)


def _decoder_only(gradients: "TargetGradients") -> torch.Tensor:
    """The word's rows of R = (I + Ā_L) ⋯ (I + Ā_1), summed, over every position (the self-attention rules),
    computed row by row from the last layer down: only the word's rows are needed, so no L × L product is formed."""
    layers = gradients.layers("decoder_self")
    rows = torch.eye(layers[0][0].shape[-1])[list(gradients.rows)]
    for pair in reversed(layers):
        rows = rows + rows @ _weighted(*pair)
    return rows.sum(dim=0)


def _weighted(attention: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of (∇A ⊙ A)⁺ (the paper's rule 5)."""
    return (gradient * attention).clamp(min=0).mean(dim=0)


def _accumulate(relevance: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """R ← R + Ā R through self-attention layers, first to last (rule 6)."""
    for pair in layers:
        relevance = relevance + _weighted(*pair) @ relevance
    return relevance


def _without_residual(relevance: torch.Tensor) -> torch.Tensor:
    """R̄: the identity (the residual connections' share) removed, rows normalised to sum to 1, identity added
    back (rules 8–9), so that a cross-attention update is not dominated by each token's relevance to itself."""
    eye = torch.eye(relevance.shape[-1])
    rest = relevance - eye
    sums = rest.sum(dim=-1, keepdim=True)
    return torch.where(sums > 0, rest / sums.clamp(min=1e-12), torch.zeros_like(rest)) + eye
