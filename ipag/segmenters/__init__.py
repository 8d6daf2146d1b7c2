"""Region proposals for grounding a word: pick a segmenter by name, get `Segment`s with input-size masks.

`SEGMENTERS` is the registry: "detectron2" (panoptic FPN: things and stuff), "detectron2-maskrcnn",
"torchvision" (Mask R-CNN, installs from PyPI alone), "superpixels" (scikit-image, no weights), then those
installed as plugins (entry point group "ipag.segmenters", loaded by `ipag/__init__.py`) or registered at run time with `register`
(docs/plugins.md). "auto" stands for Detectron2 where it is installed, else torchvision.
"""

from __future__ import annotations

from typing import Any

from ipag.errors import ModelUnavailableError
from ipag.plugins import Registry
from ipag.segmenters.base import Segment, Segmenter
from ipag.segmenters.detectron2 import Detectron2MaskRCNN, Detectron2Segmenter
from ipag.segmenters.superpixels import Superpixels
from ipag.segmenters.torchvision_maskrcnn import TorchvisionMaskRCNN

SEGMENTERS: Registry[type[Segmenter]] = Registry("ipag.segmenters", Segmenter, lambda segmenter: segmenter.name)
register = SEGMENTERS.register
unregister = SEGMENTERS.unregister

for _builtin in (Detectron2Segmenter, Detectron2MaskRCNN, TorchvisionMaskRCNN, Superpixels):
    register(_builtin)


def segmenter_names() -> list[str]:
    """Every name `load_segmenter` knows: "auto", then the registered segmenters."""
    return ["auto", *SEGMENTERS.names()]


def load_segmenter(name: str = "auto", device: str = "cpu", **options: Any) -> Segmenter:
    """Build the segmenter called `name` on `device`; `options` go to its constructor.

    Raises `ValueError` for an unknown name and `ModelUnavailableError` (with the fix in its message) when
    Detectron2 is asked for but not installed, or weights cannot be downloaded.
    """
    segmenter = SEGMENTERS.get(resolve_name(name))
    if segmenter is None:
        raise ValueError(f"Unknown segmenter {name!r}; choose one of {', '.join(segmenter_names())}.")
    return segmenter.load(device=device, **options)


def resolve_name(name: str) -> str:
    """The concrete segmenter "auto" stands for here (Detectron2 when installed, else torchvision)."""
    key = name.strip().lower()
    if key == "auto":
        return "detectron2" if Detectron2Segmenter.available() else "torchvision"
    return key


def available_segmenters() -> list[str]:
    """The names `load_segmenter` can build here (weights may still need one download)."""
    return ["auto", *(segmenter.name for segmenter in SEGMENTERS if segmenter.available())]


__all__ = [
    "SEGMENTERS", "Detectron2MaskRCNN", "Detectron2Segmenter", "ModelUnavailableError", "Segment", "Segmenter",
    "Superpixels", "TorchvisionMaskRCNN", "available_segmenters", "load_segmenter", "register", "resolve_name",
    "segmenter_names", "unregister",
]
