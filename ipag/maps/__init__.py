"""Map types: how a word's evidence becomes a heatmap. One file per type over `base.MapType`.

`MAP_TYPES` is the registry, in the order the page shows them: the built-in map types below, then those
installed as plugins (entry point group "ipag.maps", loaded by `ipag/__init__.py`), then those registered at
run time with `register` (docs/plugins.md). Everything that lists map types reads it when it runs.
"""

from ..attribution import PassNeeds
from ..plugins import Registry
from ..settings import Setting, declare, undeclare
from .attention import AttentionMap
from .base import MapContext, MapType
from .clip_relevance import ClipRelevanceMap
from .cross_attention import CrossAttentionMap
from .gradcam import CAM_METHODS, GradCAMMap
from .input_x_gradient import InputXGradientMap
from .integrated_gradients import IntegratedGradientsMap
from .legrad import LeGradMap
from .occlusion import Occlusion
from .relevancy import RelevancyMap
from .saliency import SaliencyMap

NEEDS = ("tokens", "pixels", "own")


def _attach(map_type: type[MapType]) -> None:
    """Check the class keeps `MapType`'s contract, and declare the settings it owns."""
    key = getattr(map_type, "key", None)
    if not isinstance(key, str) or not key.isidentifier():
        raise ValueError(f"{map_type.__qualname__}.key must be a name like 'my_map' (it names files), got {key!r}.")
    if not isinstance(getattr(map_type, "title", None), str):
        raise ValueError(f"{map_type.__qualname__}.title must be the text the page shows for it.")
    if map_type.needs not in NEEDS:
        raise ValueError(f"{map_type.__qualname__}.needs must be one of {', '.join(NEEDS)}, got {map_type.needs!r}.")
    declare(map_type.declares)


MAP_TYPES: Registry[type[MapType]] = Registry("ipag.maps", MapType, lambda map_type: map_type.key, _attach,
                                              lambda map_type: undeclare(list(map_type.declares)))
register = MAP_TYPES.register
unregister = MAP_TYPES.unregister

for _builtin in (GradCAMMap, SaliencyMap, InputXGradientMap, CrossAttentionMap, AttentionMap, RelevancyMap, LeGradMap,
                 ClipRelevanceMap, Occlusion, IntegratedGradientsMap):
    register(_builtin)


def map_titles() -> dict[str, str]:
    """The page's name for each map key, in the registry's order."""
    return {map_type.key: map_type.title for map_type in MAP_TYPES}


#: The grounding's choice of the word's map fused with CLIP's scores (`ipag.grounding.Grounder`): any registered
#: map type's key. Declared here, where the keys are known; the region is chosen without it when that map is not
#: computed with the other settings (a note says so). Saliency was best on the ground truth's tuning scenes.
declare({"fusion_map": Setting("saliency", "grounding", "Captioner map fused into the choice",
                               choices=lambda: list(map_titles()))})


__all__ = ["AttentionMap", "CAM_METHODS", "ClipRelevanceMap", "CrossAttentionMap", "GradCAMMap", "InputXGradientMap",
           "IntegratedGradientsMap", "LeGradMap", "MAP_TYPES", "MapContext", "MapType", "Occlusion", "PassNeeds",
           "RelevancyMap", "SaliencyMap", "Setting", "map_titles", "register", "unregister"]
