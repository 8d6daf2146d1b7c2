"""Stored maps: compact at the model's resolution, drawn at any size, equal (within one grey level) to the maps
drawn from full float32 arrays; and the registry that every consumer reads."""

import numpy as np
import pytest

from ipag.images import normalize_map, resize_map
from ipag.maps import MAP_TYPES, map_titles
from ipag.results import COMPACT_ABOVE, Heatmap
from ipag.settings import Settings


@pytest.mark.parametrize("shape, scale", [((384, 384), 1e-7), ((384, 384), 3.0), ((24, 24), 1e-7), ((64, 97), 1e-3)])
def test_compact_maps_draw_like_full_precision_ones(shape, scale):
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal(shape) * scale).astype(np.float32)  # signed, and tiny like real pixel gradients
    heatmap = Heatmap.make(raw, (2048, 1536), "test", "layer")
    full = normalize_map(resize_map(np.maximum(raw, 0), (2048, 1536)))
    drawn = heatmap.values
    assert drawn.shape == (1536, 2048) and drawn.dtype == np.float32
    assert np.abs(drawn - full).max() <= 1 / 255
    np.testing.assert_allclose(heatmap.raw, raw, rtol=1e-3, atol=1e-3 * np.abs(raw).max())
    expected_bytes = raw.size * (2 if raw.size > COMPACT_ABOVE else 4)
    assert heatmap.nbytes == expected_bytes  # pixel-sized maps in float16, grids exactly as computed
    if raw.size <= COMPACT_ABOVE:
        np.testing.assert_array_equal(heatmap.raw, raw)


def test_a_display_map_of_its_own_is_drawn_instead_of_the_raw_values():
    raw = np.array([[-1.0, 2.0], [3.0, -4.0]], dtype=np.float32)
    display = np.zeros((100, 100), dtype=np.float32)
    display[:50, :50] = 1.0
    heatmap = Heatmap.make(raw, (10, 10), "windows", "input pixels", display)
    np.testing.assert_array_equal(heatmap.raw, raw)
    values = heatmap.values
    assert values[:4, :4].min() == pytest.approx(1.0) and values[6:, 6:].max() == 0.0


def test_an_all_zero_map_stays_zero():
    heatmap = Heatmap.make(np.zeros((300, 300), dtype=np.float32), (30, 20), "flat", "layer")
    assert heatmap.scale == 1.0 and not heatmap.values.any()


def test_the_registry_names_every_map_once_and_settings_switch_the_optional_ones():
    keys = [map_type.key for map_type in MAP_TYPES]
    assert len(keys) == len(set(keys)) == len(map_titles())
    default = {map_type.key for map_type in MAP_TYPES if map_type.from_settings(Settings()) is not None}
    assert {"gradcam", "saliency", "cross_attention", "clip_relevance"} <= default and "occlusion" not in default
    assert all(map_type.from_settings(Settings(occlusion=True)) is not None for map_type in MAP_TYPES
               if map_type.key == "occlusion")
    assert not any(map_type.from_settings(Settings(grounding=False)) for map_type in MAP_TYPES
                   if map_type.key == "clip_relevance")
