"""Drawing explanations (kept apart from computing them, as Captum does): heatmap overlays and regions.

A map is drawn for people, not as stored: its strongest values are clipped as Captum's `visualize_image_attr`
does (`outlier_perc`: the values that hold the top `Settings.clip_percent` of the map's mass are drawn at full
strength, so that one hot pixel does not wash out the rest), a pixel-level map is smoothed (`Settings.smoothing`:
its gradient noise and the ViT's patch grid would show as a lattice), and the colour's opacity rises with the
value, so that where the map is near zero the photo stays as it is. Colours come from a perceptual matplotlib
colour map; a signed map drawn with its sign (`Settings.signed`) uses a diverging one. Stored values and every
score computed from them are untouched.

The page draws at most `DISPLAY_SIDE` pixels along the longer side (a browser shows less, and drawing a
12-megapixel overlay per map would cost a click seconds); exports draw at the image's full size.
"""

from __future__ import annotations

import functools

import matplotlib
from matplotlib import font_manager
import numpy as np
from captum.attr import visualization
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter
from skimage.segmentation import find_boundaries

from .images import resize_map
from .results import Explanation, Heatmap
from .settings import COLORMAPS, Settings

#: The longest side the page draws at.
DISPLAY_SIDE = 1024
#: Smaller pictures (a 96 px generated scene, a thumbnail) are enlarged to at least this, by whole pixels.
MIN_DISPLAY_SIDE = 384
#: The colour map of signed maps drawn with their sign: blue against the word, red for it (zero is transparent).
DIVERGING = "RdBu_r"
#: Pixel-level maps are smoothed on a copy at most this many values along its side: the smoothing is wider than
#: the detail this drops, and a 384 px map costs a click milliseconds instead of tens of them.
SMOOTHING_SIDE = 128


def overlay(image: Image.Image, values: np.ndarray, colormap: str = COLORMAPS[0], opacity: float = 0.7,
            signed: bool = False) -> Image.Image:
    """Colour `values` (at the image's size; in [0, 1], or [-1, 1] when `signed`) over the image, each pixel's
    colour as opaque as its value's magnitude times `opacity`: zero leaves the photo unchanged."""
    if values.shape != (image.height, image.width):
        raise ValueError(f"Map of shape {values.shape} does not match the image size {image.size}.")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"Opacity must be in [0, 1], got {opacity}.")
    values = np.clip(np.nan_to_num(values), -1.0 if signed else 0.0, 1.0)
    position = (values + 1.0) / 2.0 if signed else values
    colours = Image.fromarray(_table(colormap)[(position * 255.0).round().astype(np.uint8)])
    alpha = Image.fromarray((np.abs(values) * opacity * 255.0).round().astype(np.uint8), "L")
    return Image.composite(colours, image.convert("RGB"), alpha)


def strength(heatmap: Heatmap, settings: Settings) -> np.ndarray:
    """What is drawn of a map, on its own grid: in [0, 1] (or [-1, 1] for a signed map drawn with its sign),
    smoothed when it is pixel-level, its outliers clipped as Captum does. A map that is zero everywhere stays so."""
    signed = heatmap.signed and settings.signed
    values = heatmap.signed_display if signed else heatmap.display
    if heatmap.pixel_level and settings.smoothing > 0:
        values = _smoothed(values, settings.smoothing / 100.0)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return np.zeros_like(values, dtype=np.float32)
    return visualization._normalize_attr(values / peak, "all" if signed else "positive",
                                         settings.clip_percent).astype(np.float32)


def _smoothed(values: np.ndarray, sigma: float) -> np.ndarray:
    """`values` blurred with a Gaussian of `sigma` (a fraction of the longer side), on a copy of at most
    `SMOOTHING_SIDE` values along its side (enlarged back when drawn)."""
    side = max(values.shape)
    if side > SMOOTHING_SIDE:
        height, width = values.shape
        scale = SMOOTHING_SIDE / side
        values = np.asarray(Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), "F").resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.BOX), dtype=np.float32)
    return gaussian_filter(values, sigma * max(values.shape), mode="nearest")


def colours(settings: Settings, signed: bool = False,
            steps: int = 11) -> list[tuple[float, tuple[int, int, int], float]]:
    """(value, RGB, opacity) at `steps` values from the weakest to the strongest (from −1 for a signed map drawn
    with its sign): what a colour bar shows."""
    table = _table(DIVERGING if signed else settings.colormap)
    values = np.linspace(-1.0 if signed else 0.0, 1.0, steps)
    positions = (values + 1.0) / 2.0 if signed else values
    return [(float(value), tuple(int(c) for c in table[round(position * 255)]), abs(float(value)) * settings.opacity)
            for value, position in zip(values, positions)]


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
    """Every map of the explanation as an overlay on the image, drawn with the settings (see the module)."""
    shown = _shrunk(image, max_side)
    return {key: draw_map(shown, heatmap, settings, None) for key, heatmap in explanation.maps.items()}


def draw_map(image: Image.Image, heatmap: Heatmap, settings: Settings,
             max_side: int | None = DISPLAY_SIDE) -> Image.Image:
    """One map over the image, at most `max_side` pixels along the longer side (None: the image's size)."""
    shown = _shrunk(image, max_side)
    signed = heatmap.signed and settings.signed
    return overlay(shown, resize_map(strength(heatmap, settings), shown.size),
                   DIVERGING if signed else settings.colormap, settings.opacity, signed)


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


def captioned(picture: Image.Image, lines: list[str], side: int = 200, size: int = 15) -> Image.Image:
    """`picture` fitted into a `side`-pixel square (small ones enlarged by whole pixels) above its caption, drawn
    in: a gallery's own captions cover the picture and cut long ones short."""
    tile = enlarged(picture, side)
    tile.thumbnail((side, side))
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)  # matplotlib's: it has every glyph
    line_height = size + 4
    canvas = Image.new("RGB", (side, side + line_height * len(lines) + 4), (255, 255, 255))
    canvas.paste(tile, ((side - tile.width) // 2, (side - tile.height) // 2))
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((4, side + 2 + row * line_height), line, fill=(20, 20, 20), font=font)
    return canvas
