"""Verification numbers: does the chosen region really carry the word, for CLIP and for the captioner?

This is the iXIC idea of the systems we replace, made quantitative: instead of one yes/no from a second
caption, we report the captioner's own log-probability of the word with only the region visible and with
the region blurred away, next to CLIP's preference and how much of each heatmap lies in the region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .align import align
from .budget import section
from .captioners import Captioner, DecodeOptions
from .grounding import Grounding, composite
from .images import BACKGROUND
from .results import Heatmap, Verification
from .target import Target


class RegionCaption(NamedTuple):
    """The captioner's caption of a region alone, and its words in lower case."""

    text: str
    words: frozenset[str]


#: Masses are compared at most this many pixels along the longer side: maps are far coarser than that, and a
#: full-size comparison per map of a 12-megapixel photo would cost a click a second.
MASS_SIDE = 512


def mass_inside(values: np.ndarray, mask: np.ndarray) -> float:
    """Share of a heatmap's total mass inside a region (a soft "pointing game"; 1.0 = all of it)."""
    total = float(values.sum())
    return float(values[mask].sum()) / total if total > 0 else 0.0


def masses_inside(maps: Mapping[str, Heatmap], mask: np.ndarray) -> dict[str, float]:
    """`mass_inside` of every map, at most `MASS_SIDE` pixels along the longer side (the mask subsampled)."""
    height, width = mask.shape
    step = max(1, -(-max(height, width) // MASS_SIDE))
    small = mask[::step, ::step]
    return {key: mass_inside(heatmap.at(small.shape[::-1]), small) for key, heatmap in maps.items()}


def caption_region(captioner: Captioner, image: Image.Image, mask: np.ndarray,
                   instruction: str | None) -> RegionCaption:
    """What the captioner says when shown only the region (the rest greyed out), asked the caption's `instruction`
    (a vision-language model's; None: its own). Generated only, not scored: just its words are needed, and scoring
    would cost another forward pass."""
    with section("region caption"):
        pixels = captioner.preprocess(composite(image, mask, mode="grey"))
        token_ids = captioner.generate(pixels, DecodeOptions(instruction=instruction))
    text, words = align(captioner.pieces(token_ids), token_ids, [0.0] * len(token_ids))
    return RegionCaption(text, frozenset(word.text.lower() for word in words))


def blank_image(size: tuple[int, int]) -> Image.Image:
    """A neutral grey image: log p(y_t) on it is what the language model says without any picture, for the
    language-prior score log p(word | image) − log p(word | blank)."""
    return Image.new("RGB", size, BACKGROUND)


def region_images(image: Image.Image, mask: np.ndarray) -> list[Image.Image]:
    """The image with only the region visible (grey outside), and with the region blurred away: the sequence
    scored on them gives each word grounded to this region its region and blurred log-probabilities."""
    return [composite(image, mask, mode="grey"), composite(image, ~mask, mode="blur")]


def score_images(captioner: Captioner, images: Sequence[Image.Image], token_ids: Sequence[int]) -> np.ndarray:
    """log p(y_t) of every token of the sequence on each image (one row each), from one batched forward."""
    with section("trust forwards"):
        pixels = torch.cat([captioner.preprocess(image) for image in images])
        return captioner.batch_token_logprobs(pixels, list(token_ids)).double().cpu().numpy()


def verify(grounding: Grounding, region_caption: RegionCaption, logprobs: np.ndarray, target: Target,
           words: Sequence[str], word_logprob: float, maps: Mapping[str, Heatmap]) -> Verification:
    """Check `grounding` for the word with `target` tokens, given what the caller computed (and caches) for
    its region: the region's own caption and the caption's tokens scored on its `region_images`."""
    region_logprob, blurred_logprob = (float(value) for value in target.score(logprobs))
    return Verification(
        clip_region=grounding.similarity,
        clip_image=grounding.image_similarity,
        region_caption=region_caption.text,
        region_says_word=all(word.lower() in region_caption.words for word in words),
        region_logprob=region_logprob,
        blurred_logprob=blurred_logprob,
        delta_logprob_blurred=blurred_logprob - word_logprob,
        mass_inside=masses_inside(maps, grounding.mask),
    )
