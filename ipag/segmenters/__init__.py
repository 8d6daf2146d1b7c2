"""Region proposals for grounding a word: pick a segmenter by name, get `Segment`s with input-size masks.

Names: "detectron2" (panoptic FPN: things and stuff), "detectron2-maskrcnn", "torchvision" (Mask R-CNN,
installs from PyPI alone), "superpixels" (scikit-image, no weights), and "auto": Detectron2 where it is
installed, else torchvision.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any

from ipag.errors import ModelUnavailableError
from ipag.segmenters.base import Segment, Segmenter
from ipag.segmenters.detectron2 import Detectron2Segmenter
from ipag.segmenters.superpixels import Superpixels
from ipag.segmenters.torchvision_maskrcnn import TorchvisionMaskRCNN

__all__ = [
    "SEGMENTER_NAMES",
    "Detectron2Segmenter",
    "ModelUnavailableError",
    "Segment",
    "Segmenter",
    "Superpixels",
    "TorchvisionMaskRCNN",
    "available_segmenters",
    "load_segmenter",
    "resolve_name",
]

SEGMENTER_NAMES = ("auto", "detectron2", "detectron2-maskrcnn", "torchvision", "superpixels")


def load_segmenter(name: str = "auto", device: str = "cpu", **options: Any) -> Segmenter:
    """Build the segmenter called `name` on `device`; `options` go to its constructor.

    Raises `ValueError` for an unknown name and `ModelUnavailableError` (with the fix in its message) when
    Detectron2 is asked for but not installed, or weights cannot be downloaded.
    """
    key = resolve_name(name)
    if key == "detectron2":
        return Detectron2Segmenter(model="panoptic", device=device, **options)
    if key == "detectron2-maskrcnn":
        return Detectron2Segmenter(model="maskrcnn", device=device, **options)
    if key == "torchvision":
        return TorchvisionMaskRCNN(device=device, **options)
    if key == "superpixels":
        return Superpixels(**options)  # CPU-only scikit-image: no device to place
    raise ValueError(f"Unknown segmenter {name!r}; choose one of {', '.join(SEGMENTER_NAMES)}.")


def resolve_name(name: str) -> str:
    """The concrete segmenter "auto" stands for here (Detectron2 when installed, else torchvision)."""
    key = name.strip().lower()
    if key == "auto":
        return "detectron2" if _detectron2_installed() else "torchvision"
    return key


def available_segmenters() -> list[str]:
    """The names `load_segmenter` can build here (weights may still need one download)."""
    if _detectron2_installed():
        return list(SEGMENTER_NAMES)
    return [name for name in SEGMENTER_NAMES if not name.startswith("detectron2")]


def _detectron2_installed() -> bool:
    """Whether Detectron2 can be imported, without importing it (that takes seconds and a C extension)."""
    return find_spec("detectron2") is not None
