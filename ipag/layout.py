"""Where a model's tokens lie on its pixel input, and how a value per token becomes a map over that input.

A map that has one value per token — Grad-CAM on a vision block's tokens, attention from a word to the image
tokens, relevancy — must be drawn where each token looks. For the classic captioners the tokens are one square
patch grid over the whole (squashed) input, and the map stays on that grid (`Layout.grid`). A vision-language
model's tokens are not: its processor may crop, pad, tile the image or split it at any resolution, and its
projector may merge neighbouring patches, so each token covers a box of the input of its own, and a model may have
several views of the same place (a whole-image thumbnail beside the tiles). `Layout.boxes` says, per token, which
box; `place` paints each token's value over its box, summing where views overlap.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

#: A map placed from boxes is painted at most this many pixels along its longer side (enough for every token of
#: any model here to be several pixels wide; the map is resized to the image when drawn).
PLACED_SIDE = 448


@dataclass(frozen=True, eq=False)
class Layout:
    """Either one row-major grid of `grid` tokens starting at token `first`, covering the whole input, or a box per
    token: `boxes[i]` = (top, left, bottom, right) of token i as fractions of the input's height and width (beyond
    [0, 1] where a box covers padding; NaN for a token without a place, e.g. a CLS or row-separator token).
    `size` is the input's (height, width) in pixels, for the aspect of a placed map."""

    size: tuple[int, int]
    grid: tuple[int, int] | None = None
    first: int = 0
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.grid is None) == (self.boxes is None):
            raise ValueError("A layout is either a grid or boxes.")

    @classmethod
    def of_grid(cls, rows: int, columns: int, first: int = 0) -> "Layout":
        """One row-major grid of tokens `first`, `first` + 1, … over the whole input (maps stay on it)."""
        return cls((rows, columns), grid=(rows, columns), first=first)

    @property
    def count(self) -> int:
        """How many token values `place` reads at least."""
        return self.first + self.grid[0] * self.grid[1] if self.grid else len(self.boxes)

    def place(self, values: np.ndarray) -> np.ndarray:
        """A 2-D map over the input from one value per token (`values` is flattened; tokens beyond the layout's are
        ignored): the grid itself, or every placed token's value painted over its box."""
        flat = np.asarray(values, dtype=np.float32).ravel()
        if len(flat) < self.count:
            raise ValueError(f"{len(flat)} token values for a layout of {self.count} tokens.")
        if self.grid is not None:
            return flat[self.first:self.count].reshape(self.grid)
        height, width = self.size
        scale = min(1.0, PLACED_SIDE / max(height, width))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        placed = np.isfinite(self.boxes).all(axis=1)
        corners = np.round(self.boxes[placed] * np.array([shape[0], shape[1], shape[0], shape[1]])).astype(int)
        top, left = corners[:, 0].clip(0, shape[0]), corners[:, 1].clip(0, shape[1])
        bottom, right = corners[:, 2].clip(0, shape[0]), corners[:, 3].clip(0, shape[1])
        # Each box adds its value to a difference array at its four corners; two running sums paint it.
        painted = np.zeros((shape[0] + 1, shape[1] + 1), dtype=np.float64)
        value = flat[:len(self.boxes)][placed].astype(np.float64)
        for rows, columns, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
            np.add.at(painted, (rows, columns), sign * value)
        return painted.cumsum(axis=0).cumsum(axis=1)[:-1, :-1].astype(np.float32)


def union_boxes(boxes: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Boxes of tokens made of others (a projector's merged patches): `sources` (K, m) holds for each of K tokens
    the indices of the m tokens of `boxes` it was made from (−1: none); each gets the box around its sources'."""
    picked = np.where((sources >= 0)[..., None], boxes[np.maximum(sources, 0)], np.nan)
    with warnings.catch_warnings():  # a token without any placed source keeps a NaN box, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.concatenate([np.nanmin(picked[..., :2], axis=1), np.nanmax(picked[..., 2:], axis=1)], axis=1)


def grid_boxes(rows: int, columns: int) -> np.ndarray:
    """The (rows · columns, 4) boxes of a row-major grid of equal cells over the whole input."""
    vertical, horizontal = np.linspace(0.0, 1.0, rows + 1), np.linspace(0.0, 1.0, columns + 1)
    top, left = np.meshgrid(vertical[:-1], horizontal[:-1], indexing="ij")
    bottom, right = np.meshgrid(vertical[1:], horizontal[1:], indexing="ij")
    return np.stack([top, left, bottom, right], axis=-1).reshape(-1, 4)


def tile_boxes(rows: int, columns: int, side: int) -> np.ndarray:
    """The cells of a rows × columns grid of tiles over the input, each tile cut into side × side cells, tile after
    tile in reading order (each tile's cells row-major): where a tiled model's tokens lie, or a model's patches
    when its processor orders them by merge block (each block a "tile")."""
    cells = grid_boxes(rows * side, columns * side).reshape(rows, side, columns, side, 4)
    return cells.transpose(0, 2, 1, 3, 4).reshape(-1, 4)
