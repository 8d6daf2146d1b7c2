"""Saliency: |∂target/∂pixels|, max over colour channels; SmoothGrad averages it over noisy copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings import Settings
from .base import MapContext, MapType


@dataclass(frozen=True)
class SaliencyMap(MapType):
    """Vanilla gradient saliency (`samples=0`) or SmoothGrad (`samples` noisy copies of std `noise`).

    `noise` is relative to the model input's value range, as in Smilkov et al. (2017). The noisy copies go
    through the model as one batch (`ipag.attribution`); their gradients follow the clean one in
    `TargetGradients.pixels`, and SmoothGrad averages the noisy ones only.
    """

    key = "saliency"
    title = "Saliency"
    needs = "pixels"
    samples: int = 0
    noise: float = 0.15

    @classmethod
    def from_settings(cls, settings: Settings) -> "SaliencyMap":
        smooth = settings.saliency == "SmoothGrad"
        return cls(settings.smoothgrad_samples if smooth else 0, settings.smoothgrad_noise)

    @property
    def method(self) -> str:
        return f"SmoothGrad (n={self.samples}, σ={self.noise:g})" if self.samples else "saliency"

    def layer(self, context: MapContext) -> str:
        return "input pixels"

    def _raw(self, context: MapContext) -> np.ndarray:
        pixels = context.gradients.pixels
        passes = pixels[1:] if self.samples else pixels[:1]
        return np.abs(passes).max(axis=1).mean(axis=0)
