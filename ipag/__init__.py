"""IPAG: explain what an image captioner looked at, word by word.

Start with `Explainer` (`Explainer.tiny()` works offline); see README.md for the architecture.
"""

from .errors import ModelUnavailableError, QueryError
from .explainer import Explainer, Explainers
from .images import ImageError, load_image
from .results import Caption, Explanation, Heatmap, Word
from .settings import DEFAULTS, Settings

__all__ = [
    "Caption", "DEFAULTS", "Explainer", "Explainers", "Explanation", "Heatmap", "ImageError", "ModelUnavailableError",
    "QueryError", "Settings", "Word", "load_image",
]
