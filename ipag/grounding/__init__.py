"""Grounding a word in the image: the segment (or union, or superpixel part) CLIP matches to it best.

`Grounder(ClipModel.from_pretrained()).prepare(image, segments)` once per image, then `ground(prepared,
word)` per query. `ClipModel.relevance` is CLIP's own view of where the word is (Chefer et al.).
"""

from .clip import ClipModel
from .composite import CompositeMode, composite
from .phrase import noun_phrase
from .proposals import Proposal
from .result import Candidate, Grounding, mask_summary
from .select import GroundedImage, Grounder, Scorer

__all__ = [
    "Candidate", "ClipModel", "CompositeMode", "GroundedImage", "Grounder", "Grounding", "Proposal", "Scorer",
    "composite", "mask_summary", "noun_phrase",
]
