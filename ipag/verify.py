"""Verification numbers: does the chosen region really carry the word, for CLIP and for the captioner?

This is the iXIC idea of the systems we replace, made quantitative: instead of one yes/no from a second
caption, we report the captioner's own log-probability of the word with only the region visible and with
the region blurred away, next to CLIP's preference and how much of each heatmap lies in the region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from .captioners import Captioner
from .grounding import Grounding, composite
from .results import Caption, Heatmap, Verification


def mass_inside(values: np.ndarray, mask: np.ndarray) -> float:
    """Share of a heatmap's total mass inside a region (a soft "pointing game"; 1.0 = all of it)."""
    total = float(values.sum())
    return float(values[mask].sum()) / total if total > 0 else 0.0


def verify(captioner: Captioner, image: Image.Image, grounding: Grounding, region_caption: Caption,
           token_ids: Sequence[int], positions: Sequence[int], words: Sequence[str], word_logprob: float,
           maps: Mapping[str, Heatmap]) -> Verification:
    """Check `grounding` for the target at `positions` of `token_ids` (the explained word's tokens).

    `region_caption` is the captioner's caption of the region alone (the rest greyed out); the caller
    caches it, since the words of one caption often share a region.
    """
    region_only = captioner.preprocess(composite(image, grounding.mask, mode="grey"))
    blurred = captioner.preprocess(composite(image, ~grounding.mask, mode="blur"))
    said = {word.text.lower() for word in region_caption.words}
    blurred_logprob = _target_logprob(captioner, blurred, token_ids, positions)
    return Verification(
        clip_region=grounding.similarity,
        clip_image=grounding.image_similarity,
        region_caption=region_caption.text,
        region_says_word=all(word.lower() in said for word in words),
        region_logprob=_target_logprob(captioner, region_only, token_ids, positions),
        blurred_logprob=blurred_logprob,
        delta_logprob_blurred=blurred_logprob - word_logprob,
        mass_inside={key: mass_inside(heatmap.values, grounding.mask) for key, heatmap in maps.items()},
    )


def _target_logprob(captioner: Captioner, pixel_values, token_ids: Sequence[int], positions: Sequence[int]) -> float:
    logprobs = captioner.token_logprobs(pixel_values, list(token_ids))
    return float(sum(logprobs[p - 1] for p in positions))

