"""Transformer relevancy (Chefer, Gur & Wolf, ICCV 2021): the word's relevance propagated through every
attention layer of the captioner, the vision encoder's self-attention and the decoder's self- and
cross-attention, with the rules the paper gives for encoder–decoder models.

Each layer's attention A is weighted by the target's gradient on it, Ā = mean over heads of (∇A ⊙ A)⁺, and
relevance accumulates over the residual stream: R_ii ← R_ii + Ā R_ii through the image encoder; in each decoder
layer, R_tt ← R_tt + Ā R_tt and R_ti ← R_ti + Ā R_ti for its self-attention, then
R_ti ← R_ti + R̄_ttᵀ Ā R̄_ii for its cross-attention (R̄: the relevance without its identity, rows normalised,
identity added back). The word's rows of R_ti over the patches are the map. All the gradients come from the
word's one backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .base import MapContext, MapType

if TYPE_CHECKING:
    from ..captioners.base import Captioner


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
            return ("This captioner does not expose every attention map with a cross-attention decoder, which "
                    "relevance propagation needs.")
        return None

    def layer(self, context: MapContext) -> str:
        return "every attention layer (vision encoder and decoder)"

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        image = _accumulate(torch.eye(gradients.layers("vision")[0][0].shape[-1]), gradients.layers("vision"))
        text_size = gradients.layers("decoder_self")[0][0].shape[-1]
        text, text_image = torch.eye(text_size), torch.zeros(text_size, image.shape[-1])
        for (self_attention, cross_attention) in zip(gradients.layers("decoder_self"), gradients.layers("decoder_cross")):
            weighted = _weighted(*self_attention)
            text, text_image = text + weighted @ text, text_image + weighted @ text_image
            text_image = text_image + _without_residual(text).T @ _weighted(*cross_attention) @ _without_residual(image)
        patches = gradients.grid[0] * gradients.grid[1]  # the last keys; the CLS token comes first
        return text_image[context.target.rows, -patches:].sum(dim=0).reshape(gradients.grid).numpy()


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
