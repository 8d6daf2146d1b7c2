"""Turning whatever a user hands us into one well-defined RGB image, and maps back onto it.

Every model in the pipeline sees the image through its own processor, but all of them start from the
same `PIL.Image` in RGB with EXIF orientation applied: that is the contract this module enforces, so the
colour bugs of the system we replace (BGR/RGB mix-ups, uint8 wrap-around) cannot creep in downstream.
"""

from __future__ import annotations

import os
from os import PathLike
from typing import Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[Image.Image, np.ndarray, str, PathLike]

#: Neutral grey that transparent pixels are composited onto (not black: black changes what a captioner says).
BACKGROUND = (128, 128, 128)
#: Larger files are refused before decoding (a few-KB PNG can declare 100 megapixels: a decompression bomb).
MAX_PIXELS = 50_000_000
#: Images are downscaled so that their longer side is at most this; the models see 224–384 px anyway, and
#: full-size maps of a 12-megapixel photo would take ~50 MB each.
MAX_SIDE = 2048
# Pillow's own guard (used wherever an image is decoded, e.g. by Gradio's upload widget) refuses images over
# twice this many pixels: set it so that it refuses exactly what we refuse.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


class ImageError(ValueError):
    """The input cannot be read as an image; the message says why in words a user understands."""


def load_image(image: ImageInput) -> Image.Image:
    """Return `image` as an RGB `PIL.Image`, EXIF rotation applied, whatever its source or mode.

    Accepts a PIL image, a path, or an array (H×W grey, H×W×3 RGB, H×W×4 RGBA; uint8, or float in [0, 1]).
    Images over `MAX_PIXELS` are refused before decoding; larger than `MAX_SIDE` are downscaled. Animated
    images give their first frame.
    """
    if isinstance(image, (str, PathLike)):
        image = _open(image)
    elif isinstance(image, Image.Image):
        _check_pixels(image.width, image.height)
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise ImageError(f"Expected a PIL image, an array or a path, got {type(image).__name__}.")
    if image.width < 1 or image.height < 1:
        raise ImageError("The image is empty (0 pixels wide or high).")
    rgb = to_rgb(ImageOps.exif_transpose(image))
    if max(rgb.size) > MAX_SIDE:
        scale = MAX_SIDE / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    return rgb


def _open(path: str | PathLike) -> Image.Image:
    """Decode an image file safely: size checked from the header first, JPEGs decoded at reduced size."""
    try:
        with Image.open(path) as opened:
            _check_pixels(opened.width, opened.height)
            if opened.format == "JPEG":
                opened.draft("RGB", (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4 or 1/8 scale when possible
            opened.seek(0)  # animated GIF/WebP/APNG: the first frame
            opened.load()
            return opened.copy()
    except ImageError:
        raise
    except FileNotFoundError as err:
        raise ImageError(f"No such image file: {path}") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"The image is larger than {MAX_PIXELS / 1e6:.0f} megapixels, the most accepted (a "
                         "guard against decompression bombs). Downscale it first.") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        name = os.path.basename(path)  # the file's own name only: never where a server keeps its uploads
        raise ImageError(f"Cannot read {name} as an image: the file is not an image, or it is truncated or corrupt "
                         f"({str(err).replace(os.fspath(path), name)}).") from err


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageError(f"The image is {width}×{height} = {width * height / 1e6:.0f} megapixels; at most "
                         f"{MAX_PIXELS / 1e6:.0f} megapixels are accepted. Downscale it first.")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on a neutral grey, 16-bit is rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    """Wrap an array as a PIL image without silently rescaling or wrapping its values."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f"An image array must be H×W, H×W×3 or H×W×4, got shape {array.shape}.")
    if array.size == 0:
        raise ImageError(f"The image array is empty (shape {array.shape}).")
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    if array.dtype == np.uint16:
        return Image.fromarray((array / 257.0).round().astype(np.uint8))
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageError("The image array contains NaN or infinite values.")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ImageError("A float image array must hold values in [0, 1]; use uint8 for 0-255 data.")
        return Image.fromarray((array * 255.0).round().astype(np.uint8))
    raise ImageError(f"Unsupported image array dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map to `size` = (width, height) of the input image (bilinear, float32).

    Maps are computed on the model's input, which every captioner here obtains by a plain resize of the whole
    image (no crop, no padding), so stretching back to the original size is the exact inverse geometry.
    Pillow's float ("F") resampling: the same values as scikit-image's when enlarging, several times faster
    (a click draws every map), and anti-aliased when shrinking.
    """
    return np.asarray(Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), "F").resize(
        size, Image.BILINEAR), dtype=np.float32)


def normalize_map(values: np.ndarray) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by its maximum (a flat map stays all zeros)."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    values = np.maximum(values, 0.0)
    peak = float(values.max()) if values.size else 0.0
    return values / peak if peak > 0 else np.zeros_like(values)
