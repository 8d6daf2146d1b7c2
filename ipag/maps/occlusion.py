"""Occlusion: the model-agnostic check beside the gradient maps. Hide part of the image, rescore the word.

For a target word (its summed teacher-forced log-probability, exactly as in `ipag.attribution`), every window
of a sliding grid is replaced by a baseline — the same image blurred, or its mean colour — and the word is
rescored: evidence(window) = log p(word | image) − log p(word | image, window occluded). Positive means the
window is evidence for the word. Unlike gradients this measures a finite change, so it neither saturates nor
depends on the model being locally linear; the price is one image per window (Zeiler & Fergus 2014, Captum's
`Occlusion`), which is why the cost is reported with the maps.

Windows are occluded in the model's input space (`pixel_values`), so this works for every captioner unchanged.
The occluded images are scored many per forward (`Captioner.batch_token_logprobs`), and that forward yields
every position's log-probability, so one sweep scores all targets on the same token sequence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from ..captioners.base import Captioner
from ..results import Heatmap
from ..settings import Setting, Settings
from ..target import Target
from .base import MapContext, MapType

Baseline = Literal["blur", "mean"]


@dataclass(frozen=True)
class PerturbationCost:
    """What a perturbation map cost: images scored (the unperturbed one included), batched forwards, time."""

    images: int
    forward_passes: int
    seconds: float

    def to_dict(self) -> dict[str, int | float]:
        return {"images": self.images, "forward_passes": self.forward_passes, "seconds": self.seconds}


@dataclass(frozen=True)
class Sweep:
    """One occlusion sweep of a token sequence: log p of every token (row 0 unperturbed, then one row per
    window), the windows' boxes on the model input, and what it cost. Every word of the sequence reads its
    map from it."""

    logprobs: np.ndarray
    boxes: tuple[tuple[slice, slice, slice], ...]
    grid: tuple[int, int]  #: window positions (rows, columns)
    input_size: tuple[int, int]  #: (height, width) of the model input
    cost: PerturbationCost


@dataclass(frozen=True)
class Occlusion(MapType):
    """Sliding-window occlusion maps (frozen and hashable, so it can be part of a cache key).

    `patch` is the window's side as a fraction of the model input's side, so a setting means the same
    thing for a 224 px and a 384 px captioner; `stride` is the step as a fraction of the window (0.5:
    windows overlap by half, and every pixel's value averages the windows that cover it). The defaults
    give 15 × 15 windows. `baseline="blur"` keeps colours and layout but wipes out anything the size of a
    window (Gaussian, σ = half the window), so the model is not shown an unnatural grey hole; "mean" fills
    the window with the image's mean colour.
    """

    key = "occlusion"
    title = "Occlusion"
    needs = "own"
    signed = True
    declares = {"occlusion": Setting(False, "maps", "Occlusion map (model-agnostic: 225 occluded copies, slower)")}

    patch: float = 0.125
    stride: float = 0.5
    baseline: Baseline = "blur"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.patch <= 0.5:
            raise ValueError(f"Occlusion patch must be a fraction of the image side in (0, 0.5], got {self.patch}.")
        if not 0.0 < self.stride <= 1.0:
            raise ValueError(f"Occlusion stride must be a fraction of the patch in (0, 1], got {self.stride}.")
        if self.baseline not in ("blur", "mean"):
            raise ValueError(f"Unknown occlusion baseline {self.baseline!r}; use 'blur' or 'mean'.")
        if not 1 <= self.batch_size <= 256:
            raise ValueError(f"Occlusion batch size must be between 1 and 256, got {self.batch_size}.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "Occlusion | None":
        return cls() if settings.occlusion else None

    @property
    def method(self) -> str:
        return f"occlusion ({self.baseline}, patch {self.patch:g} of the side, stride {self.stride:g})"

    def layer(self, context: MapContext) -> str:
        return "input pixels"

    def _raw(self, context: MapContext) -> np.ndarray:
        """The signed evidence per window on the (rows, columns) grid of window positions (negative: hiding the
        window made the word more likely); one sweep serves every word of the token sequence."""
        return self.evidence(self._shared_sweep(context), context.target)

    def _display(self, raw: np.ndarray, context: MapContext) -> np.ndarray:
        """The evidence per pixel of the model input: the mean over the windows covering it (its positive part is
        the evidence for the word, `Heatmap.display`)."""
        sweep = self._shared_sweep(context)
        total, coverage = np.zeros(sweep.input_size), np.zeros(sweep.input_size)
        for box, value in zip(sweep.boxes, raw.ravel()):
            total[box[1:]] += value
            coverage[box[1:]] += 1.0
        return total / coverage

    def note(self, context: MapContext) -> str:
        cost = self._shared_sweep(context).cost
        return (f"Occlusion cost: {cost.images} images in {cost.forward_passes} forward passes, "
                f"{cost.seconds:.2f} s (one sweep for every word of the caption).")

    def _shared_sweep(self, context: MapContext) -> Sweep:
        return context.memo(("occlusion sweep", self, context.token_ids),
                            lambda: self.sweep(context.captioner, context.pixel_values, context.token_ids))

    def attribute_targets(self, captioner: Captioner, pixel_values: torch.Tensor, token_ids: Sequence[int],
                          targets: Sequence[Target], image_size: tuple[int, int]) -> tuple[list[Heatmap], PerturbationCost]:
        """One map per target for the model input `pixel_values` (1, 3, S, S) from one sweep, and its cost."""
        sweep = self.sweep(captioner, pixel_values, token_ids)
        contexts = [MapContext(image_size, captioner=captioner, pixel_values=pixel_values, token_ids=tuple(token_ids),
                               target=target, memo=lambda key, compute: sweep) for target in targets]
        return [self.attribute(context) for context in contexts], sweep.cost

    @staticmethod
    def evidence(sweep: Sweep, target: Target) -> np.ndarray:
        """log p(word | image) − log p(word | window occluded), per window, on the window grid."""
        word = target.score(sweep.logprobs)
        return (word[0] - word[1:]).reshape(sweep.grid).astype(np.float32)

    def sweep(self, captioner: Captioner, pixel_values: torch.Tensor, token_ids: Sequence[int]) -> Sweep:
        """log p of every token (1 + windows, T − 1): the unperturbed image first, then one per occluded box."""
        height, width = pixel_values.shape[-2:]
        window = (_pixels(self.patch, height), _pixels(self.patch, width))
        rows, columns = _starts(height, window[0], self.stride), _starts(width, window[1], self.stride)
        boxes = tuple((slice(None), slice(top, top + window[0]), slice(left, left + window[1]))
                      for top in rows for left in columns)
        background = self._background(pixel_values, window[0])
        started = time.perf_counter()
        scored = []
        for first in range(0, len(boxes) + 1, self.batch_size):
            batch = pixel_values.repeat(min(self.batch_size, len(boxes) + 1 - first), 1, 1, 1)
            for row in range(batch.shape[0]):
                if first + row:  # image 0 stays unperturbed: the reference goes through the same batches
                    box = boxes[first + row - 1]
                    batch[row][box] = background[0][box]
            scored.append(captioner.batch_token_logprobs(batch, list(token_ids), "occlusion").double().cpu())
        cost = PerturbationCost(images=len(boxes) + 1, forward_passes=len(scored),
                                seconds=time.perf_counter() - started)
        return Sweep(torch.cat(scored).numpy(), boxes, (len(rows), len(columns)), (height, width), cost)

    def _background(self, pixel_values: torch.Tensor, window: int) -> torch.Tensor:
        """What an occluded window shows: the blurred image, or the image's mean colour (same shape as input)."""
        if self.baseline == "mean":
            return pixel_values.mean(dim=(-2, -1), keepdim=True).expand_as(pixel_values)
        sigma = window / 2  # patch ≤ 0.5 keeps the kernel's reach (3σ) inside the image, as reflect padding needs
        size = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(pixel_values, kernel_size=[size, size], sigma=[sigma, sigma])


def _pixels(fraction: float, side: int) -> int:
    return max(1, round(fraction * side))


def _starts(side: int, window: int, stride: float) -> list[int]:
    """Window offsets along one axis, the last one flush with the edge so that every pixel is covered."""
    step = max(1, round(stride * window))
    starts = list(range(0, side - window + 1, step))
    return starts if starts[-1] == side - window else starts + [side - window]
