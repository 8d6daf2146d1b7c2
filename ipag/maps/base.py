"""The shared plumbing of every map type: from captured gradients to a normalised map at image size.

Like Captum, every map type has one verb, `attribute(gradients, image_size)`; computing the gradients
(one forward and one backward of the target, see `ipag.attribution`) is separate, and so is drawing.
A map type implements `_raw`, the unnormalised attribution at the model's resolution.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..images import normalize_map, resize_map
from ..results import Heatmap


@dataclass(frozen=True)
class TargetGradients:
    """What one target's forward and backward left behind, as numpy arrays (batch dimension removed).

    `pixels` holds one input gradient per pass: (1, 3, S, S) normally, (n, 3, S, S) for SmoothGrad.
    `attention` / `attention_gradients` are the cross-attention rows that predict the target tokens,
    shape (heads, rows, patches); `vision_*` are the chosen block's patch tokens as (D, gh, gw).
    """

    pixels: np.ndarray
    vision_activations: np.ndarray
    vision_gradients: np.ndarray
    attention: np.ndarray
    attention_gradients: np.ndarray
    vision_layer: str
    attention_layer: str

    @property
    def grid(self) -> tuple[int, int]:
        return self.vision_activations.shape[1], self.vision_activations.shape[2]


class MapType(ABC):
    """One kind of heatmap. Subclasses set `key` (the name in `Explanation.maps`) and implement `_raw`."""

    key: ClassVar[str]

    @property
    @abstractmethod
    def method(self) -> str:
        """Human-readable method name, shown next to the map."""

    @abstractmethod
    def layer(self, gradients: TargetGradients) -> str:
        """Which module the map was taken from."""

    @abstractmethod
    def _raw(self, gradients: TargetGradients) -> np.ndarray:
        """The unnormalised, non-negative 2-D attribution at the model's resolution."""

    def attribute(self, gradients: TargetGradients, image_size: tuple[int, int]) -> Heatmap:
        """The map at `image_size` = (width, height), in [0, 1], plus its raw values and provenance."""
        raw = np.maximum(np.nan_to_num(self._raw(gradients).astype(np.float32)), 0.0)
        values = normalize_map(resize_map(raw, image_size))
        return Heatmap(values=values, raw=raw, method=self.method, layer=self.layer(gradients))
