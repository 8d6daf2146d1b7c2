"""Composites that show CLIP one region in context: the region pixel-exact, everything else blurred or greyed.

Blurring keeps the scene's colours and layout, so CLIP still sees "a dog on grass" rather than a dog cut out
onto nothing, but removes the detail that would let other objects match the query. Grey removes the context
entirely, which is stricter and useful to compare against. A crop (`crop_to`) is the blurred composite cut to
a square around the region: a small object fills CLIP's view instead of a few of its pixels, and a region that
is mostly background stays mostly background. "Removed" is the other way round: the region blurred away and
the rest sharp, for the counterfactual score (how much the match drops without the region).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image
from skimage.filters import gaussian

from ..images import BACKGROUND, to_rgb

CompositeMode = Literal["blur", "grey"]
#: What CLIP is shown of a region (`view`): a blurred or grey composite, the blurred composite cropped to the
#: region, or the image with the region blurred away.
View = Literal["blur", "grey", "crop", "removed"]
VIEWS: tuple[View, ...] = ("blur", "grey", "crop", "removed")

#: Blur sigma as a fraction of the image's longer side: about 9 px once CLIP has resized the image to 224 px,
#: enough to wipe out object detail whatever the image's resolution.
DEFAULT_SIGMA = 0.04

#: A crop's margin around the region's bounding box, as a fraction of the box's longer side on each side:
#: enough context to see the region's outline against its surroundings.
CROP_MARGIN = 0.15

#: Blurs wider than this (in pixels) are computed on a downscaled copy: a Gaussian that wide removes
#: everything the downscaling loses, and a 4000 px photo would otherwise need kernels of over 1000 taps.
_MAX_DIRECT_SIGMA = 4.0


def backdrop(image: Image.Image, mode: CompositeMode = "blur", sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """The H×W×3 uint8 picture that replaces everything outside a region (one per image, shared by regions)."""
    image = to_rgb(image)
    pixels = np.asarray(image)
    if mode == "grey":
        return np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), pixels.shape).copy()
    if mode != "blur":
        raise ValueError(f"Unknown composite mode {mode!r}; use 'blur' or 'grey'.")
    width, height = image.size
    sigma_px = sigma * max(width, height)
    factor = max(1.0, sigma_px / _MAX_DIRECT_SIGMA)
    small_size = (math.ceil(width / factor), math.ceil(height / factor))
    small = pixels if factor == 1.0 else np.asarray(image.resize(small_size, Image.BOX))
    blurred = gaussian(small, sigma=sigma_px / factor, channel_axis=-1, preserve_range=True, mode="reflect")
    blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
    if factor == 1.0:
        return blurred
    return np.asarray(Image.fromarray(blurred).resize((width, height), Image.BILINEAR))


def paste(pixels: np.ndarray, background: np.ndarray, mask: np.ndarray) -> Image.Image:
    """`pixels` where `mask` is True, `background` elsewhere (all H×W×3 uint8 / H×W bool)."""
    return Image.fromarray(np.where(mask[:, :, None], pixels, background))


def view(name: View, pixels: np.ndarray, backdrop: np.ndarray, mask: np.ndarray) -> Image.Image:
    """What CLIP sees of the region `mask` for view `name`, from the image's `pixels` and the `backdrop` the view
    uses (grey for "grey", blurred otherwise; all at one size)."""
    if name in ("blur", "grey"):
        return paste(pixels, backdrop, mask)
    if name == "crop":
        return crop_to(paste(pixels, backdrop, mask), mask)
    if name == "removed":
        return paste(backdrop, pixels, mask)
    raise ValueError(f"Unknown view {name!r}; choose one of {', '.join(VIEWS)}.")


def crop_to(image: Image.Image, mask: np.ndarray, margin: float = CROP_MARGIN) -> Image.Image:
    """`image` cut to a square around `mask`'s bounding box, `margin` of its longer side wider on every side,
    moved inside the image where it would cross a border (and narrower only where the image is). An empty mask
    leaves the image whole."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return image
    width, height = image.size
    side = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    side = math.ceil(side * (1 + 2 * margin))
    left = _start((cols[0] + cols[-1] + 1) / 2, side, width)
    top = _start((rows[0] + rows[-1] + 1) / 2, side, height)
    return image.crop((left, top, min(left + side, width), min(top + side, height)))


def _start(centre: float, side: int, length: int) -> int:
    """Where a window of `side` centred at `centre` starts once moved inside [0, length)."""
    return int(np.clip(round(centre - side / 2), 0, max(0, length - side)))


def composite(image: Image.Image, mask: np.ndarray, mode: CompositeMode = "blur",
              sigma: float = DEFAULT_SIGMA) -> Image.Image:
    """`image` with the pixels inside `mask` (H×W bool) unchanged and the rest blurred or greyed.

    `sigma` is the blur's standard deviation as a fraction of the image's longer side.
    """
    check_mask(mask, image.size)
    image = to_rgb(image)
    return paste(np.asarray(image), backdrop(image, mode, sigma), mask)


def check_mask(mask: np.ndarray, size: tuple[int, int], what: str = "The mask") -> None:
    """Raise a ValueError unless `mask` is a boolean H×W array for an image of `size` = (width, height)."""
    width, height = size
    if mask.dtype != bool or mask.shape != (height, width):
        raise ValueError(f"{what} must be a boolean array of shape (height, width) = {(height, width)} like "
                         f"the image; got {mask.dtype} {mask.shape}.")
