"""Input × gradient: each pixel's value times the word's gradient there, summed over colour channels.

It comes free with saliency (same gradient) and is the first-order Taylor term of the target: how much the
word's log-probability would change if the pixel moved to the model's zero input, which for normalised inputs
is the dataset's mean colour. Signed: `raw` keeps both signs, the drawn map shows evidence for the word.
(Shrikumar et al. 2016; Captum's `InputXGradient` computes the same product.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import MapContext, MapType


@dataclass(frozen=True)
class InputXGradientMap(MapType):
    """(x ⊙ ∂target/∂x) summed over channels, on the clean pass (not SmoothGrad's noisy copies)."""

    key = "input_x_gradient"
    title = "Input × gradient"
    needs = "pixels"
    signed = True
    pixel_level = True
    method = "input × gradient"

    def layer(self, context: MapContext) -> str:
        return "input pixels"

    def _raw(self, context: MapContext) -> np.ndarray:
        pixels = context.pixel_values[0].detach().float().cpu().numpy()
        return (pixels * context.gradients.pixels[0]).sum(axis=0)
