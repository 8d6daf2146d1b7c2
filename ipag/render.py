"""Drawing explanations (kept apart from computing them, as Captum does): heatmap overlays and regions.

The page draws at most `DISPLAY_SIDE` pixels along the longer side (a browser shows less, and drawing a
12-megapixel overlay per map would cost a click seconds); exports draw at the image's full size.
"""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

from .results import Explanation, Heatmap
from .settings import COLORMAPS, Settings

#: The longest side the page draws at.
DISPLAY_SIDE = 1024
#: Smaller pictures (a 96 px generated scene, a thumbnail) are enlarged to at least this, by whole pixels.
MIN_DISPLAY_SIDE = 384


def overlay(image: Image.Image, values: np.ndarray, colormap: str = "jet", opacity: float = 0.5) -> Image.Image:
    """Blend a [0, 1] map (at the image's size) over the image; `opacity` is the heatmap's weight."""
    if values.shape != (image.height, image.width):
        raise ValueError(f"Map of shape {values.shape} does not match the image size {image.size}.")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"Opacity must be in [0, 1], got {opacity}.")
    return Image.blend(image.convert("RGB"), heatmap_image(values, colormap), opacity)


def heatmap_image(values: np.ndarray, colormap: str = "jet") -> Image.Image:
    """The map alone, coloured: its values in 256 levels through the colour map's table (as matplotlib does)."""
    levels = (np.clip(values, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(_table(colormap)[levels])


@functools.lru_cache(maxsize=None)
def _table(colormap: str) -> np.ndarray:
    """The colour map as a 256 × 3 uint8 lookup table."""
    try:
        colours = matplotlib.colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3]
    except KeyError as err:
        raise ValueError(f"Unknown colour map '{colormap}'. Try one of: {', '.join(COLORMAPS)}.") from err
    return (colours * 255.0).round().astype(np.uint8)


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


def display_size(size: tuple[int, int], max_side: int | None = DISPLAY_SIDE) -> tuple[int, int]:
    """`size` = (width, height) scaled down so that its longer side is at most `max_side` (None: unchanged)."""
    width, height = size
    if max_side is None or max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw_maps(image: Image.Image, explanation: Explanation, settings: Settings,
              max_side: int | None = DISPLAY_SIDE) -> dict[str, Image.Image]:
    """Every map of the explanation as an overlay on the image, with the settings' colour map and opacity."""
    shown = _shrunk(image, max_side)
    return {key: draw_map(shown, heatmap, settings, None) for key, heatmap in explanation.maps.items()}


def draw_map(image: Image.Image, heatmap: Heatmap, settings: Settings,
             max_side: int | None = DISPLAY_SIDE) -> Image.Image:
    shown = _shrunk(image, max_side)
    return overlay(shown, heatmap.at(shown.size), settings.colormap, settings.opacity)


def _shrunk(image: Image.Image, max_side: int | None) -> Image.Image:
    size = display_size(image.size, max_side)
    return image if size == image.size else image.resize(size, Image.BILINEAR)


def draw_region(image: Image.Image, mask: np.ndarray, max_side: int | None = DISPLAY_SIDE) -> Image.Image:
    """The region on the image, drawn at most `max_side` pixels along the longer side."""
    size = display_size(image.size, max_side)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return region_image(image, mask)


def draw_outline(picture: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """`picture` (any size) with the border of `mask` (at the image's size) drawn on it: the true object of a
    generated scene, outlined on a map or a region."""
    if mask.shape != (picture.height, picture.width):
        mask = np.asarray(Image.fromarray(mask).resize(picture.size, Image.NEAREST))
    pixels = np.array(picture.convert("RGB"))
    pixels[find_boundaries(mask, mode="thick")] = colour
    return Image.fromarray(pixels)


def enlarged(picture: Image.Image, min_side: int = MIN_DISPLAY_SIDE) -> Image.Image:
    """`picture` scaled up by a whole factor (nearest neighbour: every pixel stays a crisp square) until its
    longer side is at least `min_side`, so that a small image fills the page's view instead of a corner of it."""
    factor = -(-min_side // max(picture.size))
    if factor <= 1:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)
