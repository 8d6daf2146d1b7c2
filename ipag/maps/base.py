"""The shared plumbing of every map type: from what a method computes to a stored, drawable heatmap.

Like Captum, every map type has one verb, `attribute(context) -> Heatmap`, and computing is separate from
drawing (`ipag.render`). A map type implements `_raw`, its unnormalised attribution at the model's
resolution; the base class makes the `Heatmap`, which is stored at that resolution and resized to the image
only when drawn or exported (`Heatmap.values`), so a cached explanation of a 12-megapixel photo stays small.

Map types differ in what they need (`needs`): the gradients of the word's target with respect to the
vision tokens and cross-attention ("tokens": Grad-CAM, cross-attention), with respect to the pixels
("pixels": saliency), or passes of their own ("own": occlusion, CLIP relevance). The explainer computes the
first two kinds from the word's one backward pass, in two steps, so the token maps are shown before the
backward pass through the vision encoder finishes; "own" maps run after them. What a map needs of that pass
beyond the gradients (SmoothGrad's noisy copies, every layer's attention) it says in `pass_needs`, and the
settings it owns it declares in `declares`: the explainer only combines these declarations.

A map type may not exist for every captioner (`MapType.unavailable`: there is no cross-attention map of a
decoder without cross-attention); the explanation then says why in the map's place.

A new map type is one file with a `MapType` subclass, registered with `ipag.maps.register` (or an entry point,
see docs/plugins.md); the page, the API, exports, the CLI and the benchmarks read the registry and pick it up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from ..attribution import PassNeeds
from ..captioners.base import Captioner
from ..grounding import ClipModel
from ..results import Heatmap
from ..settings import Setting, Settings
from ..target import Target, TargetGradients

Needs = Literal["tokens", "pixels", "own"]


@dataclass(frozen=True)
class MapContext:
    """Everything a map type may use for one target. Gradient map types read `gradients`; map types with
    passes of their own use the models and inputs, and `memo` to share work between the words of a caption
    (occlusion scores every word from one sweep)."""

    image_size: tuple[int, int]  #: (width, height) of the input image
    gradients: TargetGradients | None = None
    captioner: Captioner | None = None
    pixel_values: torch.Tensor | None = None  #: the captioner's input (1, 3, S, S)
    token_ids: tuple[int, ...] = ()
    target: Target | None = None
    image: Image.Image | None = None
    text: str = ""  #: the words explained (or the free query), e.g. for a CLIP prompt
    clip: ClipModel | None = None
    memo: Callable[[Hashable, Callable[[], Any]], Any] = lambda key, compute: compute()


class MapType(ABC):
    """One kind of heatmap. Subclasses set `key`, `title` and `needs`, and implement `method`, `layer`, `_raw`.

    Instances are hashable values (frozen dataclasses) holding their parameters: an instance is part of the
    cache key of the maps it made.
    """

    key: ClassVar[str]  #: the name in `Explanation.maps`, the API's result and export file names
    title: ClassVar[str]  #: what the page calls it
    needs: ClassVar[Needs] = "tokens"
    needs_clip: ClassVar[bool] = False
    needs_attentions: ClassVar[bool] = False  #: every layer's attention and its gradient (`TargetGradients`)
    #: The settings this map type owns, by name: registering it declares them (widget, CLI option, check).
    declares: ClassVar[Mapping[str, Setting]] = {}
    #: Its values' sign means something (negative: evidence against the word); drawn in a diverging colour map
    #: when the settings ask for signed maps (`Settings.signed`), else its positive part, like every map.
    signed: ClassVar[bool] = False
    #: One value per pixel of the model's input: noisy at that scale (a ViT's patch grid shows through), so it is
    #: drawn smoothed (`Settings.smoothing`); its stored values are not.
    pixel_level: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "MapType | None":
        """The instance these settings ask for, or None when the settings switch this map off."""
        return cls()

    def pass_needs(self) -> PassNeeds:
        """What this map needs of its word's pass beyond the gradients every pass gives ("tokens" and
        "pixels" maps only)."""
        return PassNeeds(attentions=self.needs_attentions)

    @property
    @abstractmethod
    def method(self) -> str:
        """Human-readable method name, shown next to the map."""

    @abstractmethod
    def layer(self, context: MapContext) -> str:
        """Which module the map was taken from."""

    @abstractmethod
    def _raw(self, context: MapContext) -> np.ndarray:
        """The unnormalised 2-D attribution at the model's resolution (its positive part is the evidence for the
        word; negative values are evidence against it in a `signed` map, and are never drawn otherwise)."""

    def _display(self, raw: np.ndarray, context: MapContext) -> np.ndarray | None:
        """What is drawn, with its sign, at the model's resolution, before resizing to the image; None: `raw`
        (maps whose raw values live on another grid, like occlusion's windows, override this)."""
        return None

    def unavailable(self, captioner: Captioner) -> str | None:
        """Why `captioner` cannot have this map (None: it can); the explanation says so in the map's place. Here:
        what the captioner itself says (`Captioner.unavailable_map`)."""
        return captioner.unavailable_map(self.key)

    def note(self, context: MapContext) -> str | None:
        """Something the user should know about this map (e.g. what it cost), shown with the explanation."""
        return None

    def attribute(self, context: MapContext) -> Heatmap:
        """The map for the context's target, with its raw values and provenance."""
        raw = np.nan_to_num(np.asarray(self._raw(context), dtype=np.float32))
        return Heatmap.make(raw, context.image_size, self.method, self.layer(context), self._display(raw, context),
                            self.signed, self.pixel_level)
