"""IPAG: explain what an image captioner looked at, word by word.

Start with `Explainer` (`Explainer.tiny()` works offline); see README.md for the architecture.
"""

from .captioners import DecodeOptions
from .errors import ModelUnavailableError, QueryError
from .explainer import Explainer, MapSettings
from .images import ImageError, load_image
from .results import Caption, Explanation, Heatmap, Word

__all__ = [
    "Caption", "DecodeOptions", "Explainer", "Explanation", "Heatmap", "ImageError", "MapSettings",
    "ModelUnavailableError", "QueryError", "Word", "load_image",
]
