"""Map types: how captured gradients become a heatmap. One file per type over `base.MapType`."""

from .base import MapType, TargetGradients
from .cross_attention import CrossAttentionMap
from .gradcam import CAM_METHODS, GradCAMMap
from .saliency import SaliencyMap

__all__ = ["CAM_METHODS", "CrossAttentionMap", "GradCAMMap", "MapType", "SaliencyMap", "TargetGradients"]
