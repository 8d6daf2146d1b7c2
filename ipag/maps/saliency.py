"""Saliency: |∂target/∂pixels|, max over colour channels; SmoothGrad averages it over noisy copies."""

from __future__ import annotations

import numpy as np

from .base import MapType, TargetGradients


class SaliencyMap(MapType):
    """Vanilla gradient saliency (`samples=0`) or SmoothGrad (`samples` noisy passes of std `noise`).

    `noise` is relative to the model input's value range, as in Smilkov et al. (2017); the noisy passes
    are batched into one extra forward and backward by `ipag.attribution`.
    """

    key = "saliency"

    def __init__(self, samples: int = 0, noise: float = 0.15) -> None:
        if samples < 0 or samples > 64:
            raise ValueError(f"SmoothGrad samples must be between 0 and 64, got {samples}.")
        if not 0.0 < noise <= 1.0:
            raise ValueError(f"SmoothGrad noise must be in (0, 1], got {noise}.")
        self.samples = samples
        self.noise = noise

    @property
    def method(self) -> str:
        return f"SmoothGrad (n={self.samples}, σ={self.noise:g})" if self.samples else "saliency"

    def layer(self, gradients: TargetGradients) -> str:
        return "input pixels"

    def _raw(self, gradients: TargetGradients) -> np.ndarray:
        return np.abs(gradients.pixels).max(axis=1).mean(axis=0)
