"""Superpixel proposals from scikit-image: no weights, no classes, any image.

They serve as the weight-free backend and as stage II of grounding (splitting a chosen region into parts).
Unlike detectors, superpixels tile the image: every pixel belongs to exactly one segment, so a region can be
split without losing any of it. `n_segments` is a real bound for all three methods: SLIC aims at it,
and whatever any method returns beyond it is merged away (smallest region first), so CLIP never has to
score hundreds of quickshift fragments.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from PIL import Image
from skimage.segmentation import felzenszwalb, quickshift, slic

from ipag.segmenters.base import Segment, Segmenter

Method = Literal["slic", "quickshift", "felzenszwalb"]
METHODS: tuple[Method, ...] = ("slic", "quickshift", "felzenszwalb")


class Superpixels(Segmenter):
    """scikit-image SLIC, quickshift or felzenszwalb superpixels; segments have no label and no score."""

    name = "superpixels"

    @classmethod
    def load(cls, device: str = "cpu", **options: Any) -> "Superpixels":
        return cls(**options)  # CPU-only scikit-image: no device to place

    def __init__(
        self,
        method: Method = "slic",
        n_segments: int = 16,
        work_size: int | None = 256,
        max_segments: int | None = None,
        **params: Any,
    ) -> None:
        """Configure the partition.

        `n_segments` is the most regions returned. `work_size` is the longest side the algorithm sees:
        superpixels are coarse by design, and quickshift at full photo resolution takes minutes; the label
        map is scaled back by nearest neighbour, so the segments still tile the input exactly. `params`
        override the scikit-image function's arguments (e.g. `compactness=40` for SLIC, `kernel_size=7`
        for quickshift, `scale=300` for felzenszwalb). `max_segments` defaults to None because dropping
        regions would break the tiling; `n_segments` is the bound to use instead.
        """
        if method not in METHODS:
            raise ValueError(f"Unknown superpixel method {method!r}; choose one of {', '.join(METHODS)}.")
        if n_segments < 1:
            raise ValueError(f"n_segments must be at least 1, got {n_segments}.")
        if work_size is not None and work_size < 1:
            raise ValueError(f"work_size must be at least 1 or None, got {work_size}.")
        super().__init__(max_segments)
        self.method = method
        self.n_segments = n_segments
        self.work_size = work_size
        self.params = params

    def describe(self) -> str:
        return f"scikit-image {self.method} superpixels (at most {self.n_segments})"

    def _segment(self, rgb: np.ndarray) -> list[Segment]:
        height, width = rgb.shape[:2]
        if (rgb == rgb[0, 0]).all():
            # No edge to follow: any split of a flat image would be arbitrary (SLIC would return its grid).
            labels = np.zeros((height, width), dtype=np.intp)
        else:
            small = _shrink(rgb, self.work_size)
            labels = _merge_smallest(self._labels(small), small, self.n_segments)
            labels = _enlarge(labels, height, width)
        return [Segment(labels == index, None, None, self.name) for index in range(int(labels.max()) + 1)]

    def _labels(self, rgb: np.ndarray) -> np.ndarray:
        """The chosen method's label map, our defaults overridden by the caller's `params`."""
        # Defaults over-segment a little (SLIC's default compactness of 10 leaves far fewer regions than
        # asked for) and leave the rest to `_merge_smallest`, which is cheap and colour-aware.
        if self.method == "slic":
            function, defaults = slic, {"n_segments": self.n_segments, "compactness": 20.0, "start_label": 0}
        elif self.method == "felzenszwalb":
            # Its own minimum region size, relative so that small crops are not swallowed whole.
            min_size = max(1, rgb.shape[0] * rgb.shape[1] // (8 * self.n_segments))
            function, defaults = felzenszwalb, {"scale": 100.0, "min_size": min_size}
        else:
            function, defaults = quickshift, {"kernel_size": 3, "max_dist": 6.0}
        return function(rgb, **{**defaults, **self.params})


def _shrink(rgb: np.ndarray, work_size: int | None) -> np.ndarray:
    """`rgb` with its longest side at most `work_size` (anti-aliased), or unchanged."""
    height, width = rgb.shape[:2]
    if work_size is None or max(height, width) <= work_size:
        return rgb
    scale = work_size / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _enlarge(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upscaling of a label map; every small pixel maps to at least one output pixel."""
    rows = np.minimum(((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.intp), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.intp), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


def _merge_smallest(labels: np.ndarray, rgb: np.ndarray, limit: int) -> np.ndarray:
    """Relabel to 0..k-1 with k ≤ `limit`, merging the smallest region into its closest-coloured neighbour.

    Merging (rather than dropping) keeps the tiling; closest mean colour keeps distinct objects apart
    longer than merging into the longest shared border would.
    """
    labels = np.unique(labels, return_inverse=True)[1].reshape(labels.shape)
    count = int(labels.max()) + 1
    if count <= limit:
        return labels
    flat = labels.ravel()
    sizes = np.bincount(flat, minlength=count).astype(np.float64)
    colours = np.stack(
        [np.bincount(flat, weights=rgb[..., channel].ravel(), minlength=count) for channel in range(3)], axis=1
    ) / sizes[:, None]
    pairs = np.concatenate(
        [
            np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1),
            np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], axis=1),
        ]
    )
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
    neighbours: list[set[int]] = [set() for _ in range(count)]
    for first, second in pairs.tolist():
        neighbours[first].add(second)
        neighbours[second].add(first)
    target = np.arange(count)
    alive = set(range(count))
    while len(alive) > limit:
        # A label map is 4-connected as a whole, so while two regions remain each has a neighbour.
        small = min(alive, key=lambda region: sizes[region])
        into = min(neighbours[small], key=lambda region: float(np.sum((colours[region] - colours[small]) ** 2)))
        colours[into] = (colours[into] * sizes[into] + colours[small] * sizes[small]) / (sizes[into] + sizes[small])
        sizes[into] += sizes[small]
        for region in neighbours[small] - {into}:
            neighbours[region].discard(small)
            neighbours[region].add(into)
            neighbours[into].add(region)
        neighbours[into].discard(small)
        target[small] = into
        alive.remove(small)
    while not np.array_equal(target[target], target):  # follow chains of merges to the surviving region
        target = target[target]
    return np.unique(target[labels], return_inverse=True)[1].reshape(labels.shape)
