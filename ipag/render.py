"""Drawing explanations (kept apart from computing them, as Captum does): heatmap overlays and regions."""

from __future__ import annotations

import matplotlib
import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

#: Colour maps offered in the UI (any matplotlib name works through the API).
COLORMAPS = ("jet", "viridis", "inferno", "magma", "turbo", "gray")


def overlay(image: Image.Image, values: np.ndarray, colormap: str = "jet", opacity: float = 0.5) -> Image.Image:
    """Blend a [0, 1] map (at the image's size) over the image; `opacity` is the heatmap's weight."""
    if values.shape != (image.height, image.width):
        raise ValueError(f"Map of shape {values.shape} does not match the image size {image.size}.")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"Opacity must be in [0, 1], got {opacity}.")
    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError as err:
        raise ValueError(f"Unknown colour map '{colormap}'. Try one of: {', '.join(COLORMAPS)}.") from err
    colours = cmap(np.clip(values, 0.0, 1.0))[..., :3]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    blended = (1.0 - opacity) * base + opacity * colours
    return Image.fromarray((blended * 255.0).round().astype(np.uint8))


def heatmap_image(values: np.ndarray, colormap: str = "jet") -> Image.Image:
    """The map alone, coloured (for exports)."""
    return Image.fromarray((matplotlib.colormaps[colormap](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8))


def region_image(image: Image.Image, mask: np.ndarray, dim: float = 0.55,
                 outline: tuple[int, int, int] = (255, 214, 0)) -> Image.Image:
    """Show a region: the rest of the image dimmed towards grey, the region's border drawn in `outline`."""
    if mask.shape != (image.height, image.width):
        raise ValueError(f"Mask of shape {mask.shape} does not match the image size {image.size}.")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    shaded = np.where(mask[..., None], pixels, (1.0 - dim) * pixels + dim * 96.0)
    border = find_boundaries(mask, mode="inner") if mask.any() and not mask.all() else np.zeros_like(mask)
    shaded[border] = outline
    return Image.fromarray(shaded.round().astype(np.uint8))

