"""Map types: how a word's evidence becomes a heatmap. One file per type over `base.MapType`.

`MAP_TYPES` is the registry, in the order the page shows them: a new map type is one file plus one line here.
"""

from .attention import AttentionMap
from .base import MapContext, MapType, TargetGradients
from .clip_relevance import ClipRelevanceMap
from .cross_attention import CrossAttentionMap
from .gradcam import CAM_METHODS, GradCAMMap
from .input_x_gradient import InputXGradientMap
from .integrated_gradients import IntegratedGradientsMap
from .legrad import LeGradMap
from .occlusion import Occlusion
from .relevancy import RelevancyMap
from .saliency import SaliencyMap

MAP_TYPES: tuple[type[MapType], ...] = (
    GradCAMMap, SaliencyMap, InputXGradientMap, CrossAttentionMap, AttentionMap, RelevancyMap, LeGradMap,
    ClipRelevanceMap, Occlusion, IntegratedGradientsMap)

#: The page's name for each map key.
MAP_TITLES: dict[str, str] = {map_type.key: map_type.title for map_type in MAP_TYPES}

__all__ = ["AttentionMap", "CAM_METHODS", "ClipRelevanceMap", "CrossAttentionMap", "GradCAMMap", "InputXGradientMap",
           "IntegratedGradientsMap", "LeGradMap", "MAP_TITLES", "MAP_TYPES", "MapContext", "MapType", "Occlusion",
           "RelevancyMap", "SaliencyMap", "TargetGradients"]
