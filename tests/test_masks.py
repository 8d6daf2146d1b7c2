"""Region masks stored packed: the same masks back, kilobytes instead of megabytes, the records unchanged."""

from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ipag.cache import nbytes
from ipag.grounding import Candidate, Proposal
from ipag.masks import PackedMask
from ipag.segmenters import Segment

PHOTO = (1536, 2048)  # a 12-megapixel photo once our loader has downscaled it


def blob(shape=PHOTO, centre=(700, 900), radii=(400, 600)) -> np.ndarray:
    """An object-shaped region (what detectors and superpixels give)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 < 1


@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_a_mask_packs_and_unpacks_to_itself(mask):
    np.testing.assert_array_equal(PackedMask.pack(mask).unpack(), mask)


def test_a_photos_region_takes_kilobytes_and_noise_at_most_a_bit_a_pixel():
    assert PackedMask.pack(blob()).unpack().sum() == blob().sum()
    assert nbytes(PackedMask.pack(blob())) < 20_000  # the bool array: 3.1 MB
    noise = np.random.default_rng(0).random(PHOTO) < 0.5
    assert nbytes(PackedMask.pack(noise)) < noise.size / 8 * 1.01


@pytest.mark.parametrize("mask", [np.ones((4, 5), dtype=np.uint8), np.ones((2, 4, 5), dtype=bool), [[True]]])
def test_anything_but_a_2d_bool_array_is_refused(mask):
    with pytest.raises(ValueError, match="H×W bool array"):
        PackedMask.pack(mask)


@pytest.mark.parametrize("make", [
    lambda mask: Segment(mask, "dog", 0.9, "test"),
    lambda mask: Proposal("dog", "test", (0,), 0.9, mask),
    lambda mask: Candidate(mask, "dog", 0.5, 0.3, 0.9, "test", (0,)),
])
def test_records_keep_their_constructor_and_mask_and_hold_it_packed(make):
    mask = blob()
    record = make(mask)
    np.testing.assert_array_equal(record.mask, mask)
    assert nbytes(record) < 25_000
    record.mask[:] = False  # each read is a new array: changing it changes nothing stored
    np.testing.assert_array_equal(record.mask, mask)
    with pytest.raises(FrozenInstanceError):
        record.mask = mask
    np.testing.assert_array_equal(replace(record, label="cat").mask, mask)
