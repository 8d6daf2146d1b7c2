"""IPAG: explain what an image captioner looked at, word by word.

Start with `Explainer` (`Explainer.tiny()` works offline); see README.md for the architecture.
"""

from .captioners import DecodeOptions
from .errors import ModelUnavailableError, QueryError
from .explainer import Explainer, Explainers, GroundingSettings, MapSettings
from .perturbation import Occlusion
from .images import ImageError, load_image
from .results import Caption, Explanation, Heatmap, Word

__all__ = [
    "Caption", "DecodeOptions", "Explainer", "Explainers", "Explanation", "GroundingSettings", "Heatmap", "ImageError",
    "MapSettings", "ModelUnavailableError", "Occlusion", "QueryError", "Word", "load_image",
]
