"""Any image a user has becomes RGB with the right orientation, and maps come back at its size."""

import io

import numpy as np
import pytest
from PIL import Image

from ipag import ImageError, Settings, load_image


def make(mode, size=(37, 23)):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        return Image.fromarray((rng.random((size[1], size[0])) * 65535).astype(np.uint16))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


MODES = ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "1"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_rgb(mode):
    image = load_image(make(mode))
    assert image.mode == "RGB" and image.size == (37, 23)


def test_transparent_pixels_become_neutral_grey_not_black():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(rgba).getpixel((0, 0)) == (128, 128, 128)


def test_sixteen_bit_is_rescaled_not_clipped():
    grey = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(grey).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_honoured():
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    buffer.seek(0)
    assert load_image(Image.open(buffer)).size == (20, 40)


def test_arrays_keep_their_colours():
    red = np.zeros((5, 6, 3), np.uint8)
    red[..., 0] = 255
    assert load_image(red).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(red.astype(np.float32) / 255).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(red[..., 0]).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.full((4, 4, 3), 3.0), r"\[0, 1\]"),
    (np.full((4, 4, 3), np.nan), "NaN"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.zeros((4, 4, 3), np.complex64), "dtype"),
    (42, "Expected a PIL image"),
])
def test_bad_arrays_and_types_are_rejected_clearly(bad, message):
    with pytest.raises(ImageError, match=message):
        load_image(bad)


def test_bad_files_are_rejected_clearly(tmp_path):
    with pytest.raises(ImageError, match="No such image file"):
        load_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="Cannot read"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="Cannot read"):
        load_image(text)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(37, 23), (1, 1), (3, 50)])
def test_maps_have_the_input_size_for_every_mode(explainer, mode, size):
    image = make(mode, size)
    caption = explainer.caption(image, Settings(max_new_tokens=3))
    explanation = explainer.explain(image, 0, caption=caption)
    for key, heatmap in explanation.maps.items():
        values = heatmap.values
        assert values.shape == (size[1], size[0]), key
        assert values.dtype == np.float32 and np.isfinite(values).all()
        assert values.min() >= 0.0 and values.max() <= 1.0
