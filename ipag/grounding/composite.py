"""Composites that show CLIP one region in context: the region pixel-exact, everything else blurred or greyed.

Blurring (the default) keeps the scene's colours and layout, so CLIP still sees "a dog on grass" rather than
a dog cut out onto nothing, but removes the detail that would let other objects match the query. Grey
removes the context entirely, which is stricter and useful to compare against.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image
from skimage.filters import gaussian

from ..images import BACKGROUND, to_rgb

CompositeMode = Literal["blur", "grey"]

#: Blur sigma as a fraction of the image's longer side: about 9 px once CLIP has resized the image to 224 px,
#: enough to wipe out object detail whatever the image's resolution.
DEFAULT_SIGMA = 0.04

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
