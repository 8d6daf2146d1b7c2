"""Grad-CAM family on the vision encoder's patch tokens, weighted by the `grad-cam` library's methods.

The library normally runs its own forward and backward through hooks; we already have the activations and
gradients of the word's target from our single pass, so we call its weighting (`get_cam_image`) directly.
Every method listed here needs only activations and gradients; perturbation methods (ScoreCAM,
AblationCAM) would need extra forwards and are deliberately not offered.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytorch_grad_cam as gc
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from .base import MapType, TargetGradients

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "GradCAM": gc.GradCAM,
    "GradCAM++": gc.GradCAMPlusPlus,
    "HiResCAM": gc.HiResCAM,
    "LayerCAM": gc.LayerCAM,
    "XGradCAM": gc.XGradCAM,
    "EigenGradCAM": gc.EigenGradCAM,
    "GradCAMElementWise": gc.GradCAMElementWise,
}


@lru_cache(maxsize=None)
def _weighting(method: str) -> BaseCAM:
    """A library CAM object used only for its weighting: it hooks no layer of ours (empty target list)."""
    return CAM_METHODS[method](model=nn.Linear(1, 1), target_layers=[])


class GradCAMMap(MapType):
    """Grad-CAM of the word's log-probability on a vision block's patch-token grid."""

    key = "gradcam"

    def __init__(self, method: str = "GradCAM") -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"Unknown CAM method '{method}'. Choose one of: {', '.join(CAM_METHODS)}.")
        self._method = method

    @property
    def method(self) -> str:
        return self._method

    def layer(self, gradients: TargetGradients) -> str:
        return gradients.vision_layer

    def _raw(self, gradients: TargetGradients) -> np.ndarray:
        cam = _weighting(self._method).get_cam_image(
            None, None, None, gradients.vision_activations[None], gradients.vision_gradients[None], False
        )
        return np.maximum(cam[0], 0.0)
