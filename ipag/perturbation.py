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
from typing import ClassVar, Literal

import numpy as np
import torch
from torchvision.transforms.v2.functional import gaussian_blur

from .attribution import Target
from .captioners.base import Captioner
from .images import normalize_map, resize_map
from .results import Heatmap

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
class Occlusion:
    """Sliding-window occlusion maps (frozen and hashable, so it can be part of a cache key).

    `patch` is the window's side as a fraction of the model input's side, so a setting means the same
    thing for a 224 px and a 384 px captioner; `stride` is the step as a fraction of the window (0.5:
    windows overlap by half, and every pixel's value averages the windows that cover it). The defaults
    give 15 × 15 windows. `baseline="blur"` keeps colours and layout but wipes out anything the size of a
    window (Gaussian, σ = half the window), so the model is not shown an unnatural grey hole; "mean" fills
    the window with the image's mean colour.
    """

    key: ClassVar[str] = "occlusion"

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

    @property
    def method(self) -> str:
        return f"occlusion ({self.baseline}, patch {self.patch:g} of the side, stride {self.stride:g})"

    def attribute(self, captioner: Captioner, pixel_values: torch.Tensor, token_ids: Sequence[int],
                  targets: Sequence[Target], image_size: tuple[int, int]) -> tuple[list[Heatmap], PerturbationCost]:
        """One map per target for the model input `pixel_values` (1, 3, S, S), and what the sweep cost.

        Each map's `values` are in [0, 1] at `image_size` = (width, height) and show evidence for the word
        only; its `raw` is the signed evidence per window on the (rows, columns) grid of window positions
        (negative: hiding the window made the word more likely).
        """
        if not targets:
            return [], PerturbationCost(images=0, forward_passes=0, seconds=0.0)
        token_ids = list(token_ids)
        for target in targets:
            target.check(len(token_ids))
        height, width = pixel_values.shape[-2:]
        window = (_pixels(self.patch, height), _pixels(self.patch, width))
        rows, columns = _starts(height, window[0], self.stride), _starts(width, window[1], self.stride)
        boxes = [(slice(None), slice(top, top + window[0]), slice(left, left + window[1]))
                 for top in rows for left in columns]
        logprobs, cost = self._sweep(captioner, pixel_values, token_ids, boxes)

        coverage = np.zeros((height, width))
        for box in boxes:
            coverage[box[1:]] += 1.0
        heatmaps = []
        for target in targets:
            word = logprobs[:, target.rows].sum(axis=1)
            evidence = word[0] - word[1:]
            total = np.zeros((height, width))
            for box, value in zip(boxes, evidence):
                total[box[1:]] += value
            per_pixel = np.maximum(total / coverage, 0.0)  # every window covering the pixel, averaged
            heatmaps.append(Heatmap(values=normalize_map(resize_map(per_pixel, image_size)),
                                    raw=evidence.reshape(len(rows), len(columns)).astype(np.float32),
                                    method=self.method, layer="input pixels"))
        return heatmaps, cost

    def _sweep(self, captioner: Captioner, pixel_values: torch.Tensor, token_ids: list[int],
               boxes: list[tuple[slice, slice, slice]]) -> tuple[np.ndarray, PerturbationCost]:
        """log p of every token (1 + windows, T − 1): the unperturbed image first, then one per occluded box."""
        background = self._background(pixel_values, max(box[1].stop - box[1].start for box in boxes))
        started = time.perf_counter()
        scored = []
        for first in range(0, len(boxes) + 1, self.batch_size):
            batch = pixel_values.repeat(min(self.batch_size, len(boxes) + 1 - first), 1, 1, 1)
            for row in range(batch.shape[0]):
                if first + row:  # image 0 stays unperturbed: the reference goes through the same batches
                    box = boxes[first + row - 1]
                    batch[row][box] = background[0][box]
            scored.append(captioner.batch_token_logprobs(batch, token_ids).double().cpu())
        cost = PerturbationCost(images=len(boxes) + 1, forward_passes=len(scored),
                                seconds=time.perf_counter() - started)
        return torch.cat(scored).numpy(), cost

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
