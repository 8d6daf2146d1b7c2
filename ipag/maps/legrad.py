"""LeGrad-style map (after Bousselham et al. 2024): the word's gradient on the attention map of every vision
encoder layer, its positive part averaged over heads and query tokens, summed over layers.

LeGrad reads a score out of every layer of a ViT (its intermediate CLS token through the final projection);
a captioner has no such per-layer readout, so here every layer's attention gradient is of the one target, the
word's log-probability. What stays is LeGrad's idea of using the gradients on all layers' attention maps
rather than one layer's activations. It needs no extra pass: the gradients come from the word's backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import MapContext
from .relevancy import RelevancyMap


@dataclass(frozen=True)
class LeGradMap(RelevancyMap):
    """Σ over vision layers of mean over heads and queries of ReLU(∂target/∂A), over the patch keys."""

    key = "legrad"
    title = "LeGrad"
    method = "LeGrad-style layer-aggregated attention gradients (Bousselham et al. 2024, adapted)"

    def layer(self, context: MapContext) -> str:
        return "every vision encoder layer's attention"

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        patches = gradients.grid[0] * gradients.grid[1]
        total = sum(gradient.clamp(min=0).mean(dim=(0, 1))[-patches:] for _, gradient in gradients.layers("vision"))
        return total.reshape(gradients.grid).numpy()
