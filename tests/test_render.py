"""Maps drawn for people: low values leave the photo as it is, outliers are clipped as Captum clips them, pixel-level
maps are smoothed for display only, signed maps get a diverging colour map, and the colour bar says what the colours
mean. Measured on planted maps, whose right drawing is known."""

import numpy as np
import pytest
from PIL import Image

from ipag import Settings
from ipag.render import DIVERGING, colours, draw_map, strength
from ipag.results import Heatmap
from ipag.ui import colour_bar

SIDE = 96
BOX = (slice(30, 60), slice(40, 70))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray((rng.random((SIDE, SIDE, 3)) * 200 + 20).astype(np.uint8))


def planted(signed: bool = False, pixel_level: bool = False, outside: float = 0.0) -> Heatmap:
    """1 inside `BOX`, `outside` elsewhere, at the model's resolution (here the image's)."""
    values = np.full((SIDE, SIDE), outside, dtype=np.float32)
    values[BOX] = 1.0
    return Heatmap.make(values, (SIDE, SIDE), "planted", "pixels", signed=signed, pixel_level=pixel_level)


def change(photo: Image.Image, drawn: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(drawn, dtype=float) - np.asarray(photo, dtype=float)).max(axis=2)


def away_from_box(margin: int) -> np.ndarray:
    """Pixels at least `margin` pixels from the box."""
    near = np.zeros((SIDE, SIDE), dtype=bool)
    near[BOX[0].start - margin:BOX[0].stop + margin, BOX[1].start - margin:BOX[1].stop + margin] = True
    return ~near


def test_a_planted_map_changes_the_photo_inside_its_box_only(photo):
    settings = Settings()
    diff = change(photo, draw_map(photo, planted(), settings))
    assert diff[away_from_box(2)].max() <= 1  # the photo, within rounding
    inside = diff[BOX[0].start + 2:BOX[0].stop - 2, BOX[1].start + 2:BOX[1].stop - 2]
    assert inside.min() > 20  # drawn at full strength (the settings' opacity) where the map is strongest


def test_opacity_rises_with_the_value(photo):
    weak, strong = (draw_map(photo, planted(outside=level), Settings(clip_percent=0)) for level in (0.2, 0.6))
    outside = away_from_box(2)
    assert change(photo, weak)[outside].mean() < change(photo, strong)[outside].mean()
    assert change(photo, draw_map(photo, planted(outside=0.2), Settings(opacity=0.0))).max() <= 1


def test_outliers_are_clipped_as_captum_does():
    values = np.full((SIDE, SIDE), 0.01, dtype=np.float32)
    values[0, 0] = 10.0  # one hot pixel (1.8% of the mass) that would wash out the rest, scaled by the maximum
    values[BOX] = 0.5
    heatmap = Heatmap.make(values, (SIDE, SIDE), "planted", "pixels")
    clipped = strength(heatmap, Settings())  # the top 2% of the mass at full strength
    assert clipped[0, 0] == 1.0 and clipped[BOX].min() == pytest.approx(1.0)
    # by the maximum (float16)
    assert strength(heatmap, Settings(clip_percent=0))[BOX].max() == pytest.approx(0.5 / 10, rel=1e-3)


def test_pixel_level_maps_are_smoothed_for_display_only(photo):
    rng = np.random.default_rng(0)
    noisy = np.where(rng.random((SIDE, SIDE)) < 0.5, 1.0, 0.0).astype(np.float32)  # a salt-and-pepper lattice
    plain = Heatmap.make(noisy, (SIDE, SIDE), "noise", "pixels")
    pixel = Heatmap.make(noisy, (SIDE, SIDE), "noise", "pixels", pixel_level=True)
    assert strength(plain, Settings()).std() > 0.4  # not pixel-level: drawn as computed
    assert strength(pixel, Settings()).std() < 0.1  # smoothed
    assert strength(pixel, Settings(smoothing=0)).std() > 0.4
    np.testing.assert_array_equal(pixel.display, noisy)  # the stored values are untouched


def test_signed_maps_are_drawn_in_a_diverging_colour_map_when_asked(photo):
    values = np.zeros((SIDE, SIDE), dtype=np.float32)
    values[BOX] = 1.0
    values[70:90, 5:25] = -1.0  # evidence against the word
    heatmap = Heatmap.make(values, (SIDE, SIDE), "signed", "pixels", signed=True)
    against = (slice(72, 88), slice(7, 23))
    positive = draw_map(photo, heatmap, Settings())
    assert change(photo, positive)[against].max() <= 1  # by default only the evidence for the word is drawn
    both = np.asarray(draw_map(photo, heatmap, Settings(signed=True, opacity=1.0)), dtype=int)
    red, blue = both[BOX].reshape(-1, 3).mean(axis=0), both[against].reshape(-1, 3).mean(axis=0)
    assert red[0] > red[2] and blue[2] > blue[0]  # red for, blue against (DIVERGING)
    assert DIVERGING == "RdBu_r"


def test_a_map_that_is_zero_everywhere_leaves_the_photo_as_it_is(photo):
    heatmap = Heatmap.make(np.zeros((SIDE, SIDE), dtype=np.float32), (SIDE, SIDE), "flat", "pixels")
    assert change(photo, draw_map(photo, heatmap, Settings())).max() == 0


def test_the_colour_bar_shows_the_colours_as_drawn():
    settings = Settings(opacity=0.6)
    stops = colours(settings)
    assert stops[0][0] == 0.0 and stops[0][2] == 0.0 and stops[-1][2] == pytest.approx(0.6)  # transparent → opaque
    bar = colour_bar(settings, signed=False)
    assert "0: the photo as it is" in bar and "top 2% of the map" in bar and bar.count("rgba(") == len(stops)
    signed = colour_bar(settings, signed=True)
    assert "evidence against the word" in signed and colours(settings, signed=True)[0][0] == -1.0
