"""Saliency: |∂target/∂pixels|, max over colour channels; SmoothGrad averages it over noisy copies."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attribution import PassNeeds
from ..settings import Setting, Settings
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
    pixel_level = True
    declares = {
        "saliency": Setting("gradient", "gradients", "Saliency", choices=("gradient", "SmoothGrad"), widget="radio"),
        "smoothgrad_samples": Setting(8, "gradients", "SmoothGrad samples", minimum=1, maximum=64, step=1),
        "smoothgrad_noise": Setting(0.15, "gradients", "SmoothGrad noise (fraction of the input range)",
                                    minimum=0.0, maximum=1.0, step=0.05),
    }
    samples: int = 0
    noise: float = 0.15

    @classmethod
    def from_settings(cls, settings: Settings) -> "SaliencyMap":
        smooth = settings.saliency == "SmoothGrad"
        return cls(settings.smoothgrad_samples if smooth else 0, settings.smoothgrad_noise)

    def pass_needs(self) -> PassNeeds:
        """SmoothGrad's noisy copies go through the word's pass as one extra batch."""
        return PassNeeds(self.samples, self.noise)

    @property
    def method(self) -> str:
        return f"SmoothGrad (n={self.samples}, σ={self.noise:g})" if self.samples else "saliency"

    def layer(self, context: MapContext) -> str:
        return "input pixels"

    def _raw(self, context: MapContext) -> np.ndarray:
        pixels = context.gradients.pixels
        passes = pixels[1:] if self.samples else pixels[:1]
        return np.abs(passes).max(axis=1).mean(axis=0)
