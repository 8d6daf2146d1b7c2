"""IPAG: explain what an image captioner looked at, word by word.

Start with `Explainer` (`Explainer.tiny()` works offline); see README.md for the architecture.
"""

from .captioners import CAPTIONERS
from .errors import ModelUnavailableError, QueryError, SettingError
from .explainer import Explainer, Explainers
from .images import ImageError, load_image
from .maps import MAP_TYPES
from .results import Caption, Explanation, Heatmap, Word
from .segmenters import SEGMENTERS
from .settings import DEFAULTS, Settings

# Installed plugins join once the package is complete, so that they may import anything from it.
for _registry in (MAP_TYPES, CAPTIONERS, SEGMENTERS):
    _registry.load_plugins()

__all__ = [
    "Caption", "DEFAULTS", "Explainer", "Explainers", "Explanation", "Heatmap", "ImageError", "ModelUnavailableError",
    "QueryError", "SettingError", "Settings", "Word", "load_image",
]
