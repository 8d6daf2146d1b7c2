"""Grad-CAM family on the vision encoder's patch tokens, weighted by the `grad-cam` library's methods.

The library normally runs its own forward and backward through hooks; we already have the activations and
gradients of the word's target from our single pass, so we call its weighting (`get_cam_image`) directly.
Every method listed here needs only activations and gradients; perturbation methods (ScoreCAM,
AblationCAM) would need extra forwards and are deliberately not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytorch_grad_cam as gc
from pytorch_grad_cam.base_cam import BaseCAM
from torch import nn

from ..settings import Setting, Settings
from .base import MapContext, MapType

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


@dataclass(frozen=True)
class GradCAMMap(MapType):
    """Grad-CAM of the word's log-probability on a vision block's patch-token grid."""

    key = "gradcam"
    title = "Grad-CAM"
    #: GradCAM, although HiResCAM and EigenGradCAM localise better on the ground-truth benchmark: under bfloat16
    #: their maps changed on the tiny captioners (HiResCAM still does; EigenGradCAM's sign flip went away with the
    #: weighting in float32; GradCAM++ and XGradCAM move on the synthetic one: docs/performance.md#bfloat16),
    #: GradCAM's do not. The page opens on input × gradient instead.
    declares = {"cam_method": Setting("GradCAM", "gradients", "CAM method", choices=tuple(CAM_METHODS))}
    cam_method: str = "GradCAM"

    @classmethod
    def from_settings(cls, settings: Settings) -> "GradCAMMap":
        return cls(settings.cam_method)

    @property
    def method(self) -> str:
        return self.cam_method

    def layer(self, context: MapContext) -> str:
        return context.gradients.vision_layer

    def _raw(self, context: MapContext) -> np.ndarray:
        gradients = context.gradients
        cam = _weighting(self.cam_method).get_cam_image(
            None, None, None, gradients.vision_activations[None], gradients.vision_gradients[None], False
        )
        return gradients.vision_layout.place(np.maximum(cam[0], 0.0))
