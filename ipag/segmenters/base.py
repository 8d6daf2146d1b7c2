"""What every segmenter returns, and the plumbing they share.

A segmenter proposes image regions for CLIP to score against a word. Backends differ wildly (Detectron2,
torchvision, scikit-image superpixels) in input colour order, resolution and output format; this module
fixes the one contract the grounding code relies on: boolean masks at the size of the image the user gave,
best proposals first, a bounded number of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ipag.images import ImageInput, load_image
from ipag.masks import MaskField


@dataclass(frozen=True, eq=False)
class Segment:
    """One proposed region. Compared by identity (`eq=False`): element-wise array equality has no truth value.

    `mask` is H×W bool at the size of the image given to `Segmenter.segment`, never at a model's internal size;
    it is stored packed (`ipag.masks`): a photo's ~24 segments take kilobytes, not 3 MB each.
    """

    mask: np.ndarray = MaskField()
    label: str | None  #: class name when the segmenter has classes (COCO "person", "sky"…), else None
    score: float | None  #: detector confidence; None where there is none (stuff regions, superpixels)
    source: str  #: `Segmenter.name` of the segmenter that proposed it

    @property
    def area(self) -> int:
        """Number of pixels in the region."""
        return int(np.count_nonzero(self.mask))


class Segmenter(ABC):
    """Proposes regions of an image. Subclasses implement `_segment` on an RGB uint8 array and `describe`, and
    are registered with `ipag.segmenters.register` or an entry point (docs/plugins.md)."""

    name: ClassVar[str]  #: short registry name, e.g. "detectron2"; also each Segment's `source`

    @classmethod
    def load(cls, device: str = "cpu", **options: Any) -> "Segmenter":
        """Build one on `device`; `options` go to the constructor (`load_segmenter` calls this)."""
        return cls(device=device, **options)

    @classmethod
    def available(cls) -> bool:
        """Whether it can be built here (its library is installed); the page offers only those that can."""
        return True

    def __init__(self, max_segments: int | None = 24) -> None:
        """`max_segments` bounds what CLIP has to score per query; None keeps every region."""
        if max_segments is not None and max_segments < 1:
            raise ValueError(f"max_segments must be at least 1 or None, got {max_segments}.")
        self.max_segments = max_segments

    def segment(self, image: ImageInput) -> list[Segment]:
        """Regions of `image` (anything `ipag.images.load_image` accepts), best first, empty ones dropped.

        Order: scored regions by descending score, then unscored ones by descending area, so that the cap
        at `max_segments` drops the least confident detections and then the smallest regions.
        """
        rgb = np.asarray(load_image(image))
        height, width = rgb.shape[:2]
        segments = []
        for segment in self._segment(rgb):  # a mask that is not bool was refused when its Segment was made
            mask = segment.mask
            if mask.shape != (height, width):
                raise ValueError(
                    f"Segmenter {self.name!r} returned a mask of shape {mask.shape} "
                    f"for a {height}×{width} image; masks must be bool at the input size."
                )
            if mask.any():
                segments.append(segment)
        segments.sort(key=lambda s: (s.score is None, -(s.score or 0.0), -s.area))
        return segments[: self.max_segments]

    @abstractmethod
    def describe(self) -> str:
        """Which model ran, in words for the UI and result files, e.g. "detectron2 panoptic FPN R50 (COCO)"."""

    @abstractmethod
    def _segment(self, rgb: np.ndarray) -> list[Segment]:
        """Regions of an H×W×3 uint8 RGB image, each a bool H×W mask at that same size, in any order."""
