"""The regions CLIP chooses among: the segments, a bounded number of their unions, and the whole image.

A word often names more than one segment ("people", "a man and his dog"), so unions are proposed too, but
never all 2ⁿ − 2 of them as the original IPAG did: only the union of each class's segments, then pairs of
the most confident segments, at most `max_unions` in all. Stage II's superpixel parts are cut here too.

Every proposal is labelled for a person (`region_label`): by what the segmenter says it is when it says
("dog", "person ×3", "man + dog"), else by where it is and how large ("segment, upper left, 8% of the image"):
"region 2 + region 4" tells a reader nothing.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
import numpy as np
from PIL import Image

from ..masks import MaskField
from ..segmenters import Segment, Segmenter
from .composite import check_mask

#: Label and source of the whole-image baseline proposal.
WHOLE_IMAGE = "whole image"

#: Where a region is, by its centre of mass in a 3×3 grid over the image (rows top to bottom).
POSITIONS = (("upper left", "top", "upper right"), ("left", "centre", "right"), ("lower left", "bottom", "lower right"))

#: Superpixel parts smaller than this fraction of the region they split are dropped: CLIP cannot judge them.
MIN_PART_FRACTION = 0.02


@dataclass(frozen=True, eq=False)
class Proposal:
    """One region CLIP is asked about. `mask` is at the working size the composites are made at (stored packed:
    an image has up to ~40 proposals, and stage II adds parts after its `GroundedImage` is cached)."""

    label: str
    source: str  #: the segmenter(s) its segments came from, or `WHOLE_IMAGE`
    members: tuple[int, ...]  #: indices of the segments it is made of; () for the whole image
    detector_score: float | None  #: the weakest member's score (a union is as sure as its least sure part)
    mask: np.ndarray = MaskField()
    part_of: int | None = None  #: stage II: index of the proposal this is a superpixel part of


def working_size(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) scaled down so that the longer side is at most `longest` (never scaled up)."""
    width, height = size
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` at `size` = (width, height): a pixel is in if any part of the area it covers is (thin objects
    such as poles and kites must not vanish at the working size)."""
    if mask.shape == (size[1], size[0]):
        return mask
    coverage = Image.fromarray(mask.astype(np.float32)).resize(size, Image.BOX)
    return np.asarray(coverage) > 0


def grow_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`mask` at `size` = (width, height) by nearest-neighbour upsampling."""
    if mask.shape == (size[1], size[0]):
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST), dtype=bool)


def segment_proposals(segments: Sequence[Segment], image_size: tuple[int, int], size: tuple[int, int],
                      max_unions: int) -> list[Proposal]:
    """The whole image first, then each segment, then at most `max_unions` unions; masks at `size`.

    So there are at most 1 + len(segments) + max_unions proposals. Empty masks and duplicates (including
    segments that cover the whole image) are dropped, so that no two proposals split one region's score.
    """
    masks = []
    for index, segment in enumerate(segments):
        mask = segment.mask  # unpacked once (segments store their masks packed)
        check_mask(mask, image_size, what=f"Segment {index}'s mask")
        masks.append(shrink_mask(mask, size))
    whole = np.ones((size[1], size[0]), dtype=bool)
    proposals = [Proposal(WHOLE_IMAGE, WHOLE_IMAGE, (), None, whole)]
    seen = {_key(whole)}
    groups = itertools.chain(((i,) for i in range(len(segments))),
                             itertools.islice(_union_groups(segments), max_unions))
    for members in groups:
        mask = np.logical_or.reduce([masks[i] for i in members])
        key = _key(mask)
        if key in seen or not mask.any():
            continue
        seen.add(key)
        proposals.append(Proposal(region_label(segments, members, mask), _union_source(segments, members), members,
                                  _union_score(segments, members), mask))
    return proposals


def superpixel_parts(pixels: np.ndarray, mask: np.ndarray, splitter: Segmenter) -> list[np.ndarray]:
    """Split the region `mask` of the H×W×3 uint8 `pixels` into parts (H×W bool masks) with `splitter`.

    The splitter (superpixels, normally) runs on the region's bounding box only, so its parts follow the
    region rather than the whole image; each part is then cut to the region. Parts below
    `MIN_PART_FRACTION` of the region, and a "part" that is the whole region, are left out.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    area = int(mask.sum())
    parts = []
    for segment in splitter.segment(pixels[box]):
        part = np.zeros_like(mask)
        part[box] = segment.mask & mask[box]
        if MIN_PART_FRACTION * area <= part.sum() < area:
            parts.append(part)
    return parts


def _union_groups(segments: Sequence[Segment]) -> Iterator[tuple[int, ...]]:
    """Candidate unions, most plausible first: each class's segments together (what a plural word names),
    then pairs among the top-ranked segments, (0,1), (0,2), (1,2), (0,3)… so any prefix is all pairs of
    the top k. The caller takes a bounded prefix; pairs are generated lazily, never all at once."""
    by_label: dict[str, list[int]] = {}
    for index, segment in enumerate(segments):
        if segment.label:
            by_label.setdefault(segment.label, []).append(index)
    classes = [tuple(members) for members in by_label.values() if len(members) > 1]
    yield from classes
    # Confident detections first (segments without a score, e.g. "stuff", after them), then larger ones.
    ranked = sorted(range(len(segments)), key=lambda i: (segments[i].score is None, -(segments[i].score or 0.0),
                                                         -segments[i].area))
    for j in range(1, len(ranked)):
        for i in range(j):
            pair = tuple(sorted((ranked[i], ranked[j])))
            if pair not in classes:  # a class of exactly two was proposed already
                yield pair


def region_label(segments: Sequence[Segment], members: tuple[int, ...], mask: np.ndarray, part: bool = False) -> str:
    """What a person reads for the union of `members` (its `mask` at any size): 'dog', 'person ×3', 'man + dog'
    when every member has a class; with unclassified members, where and how large it is: 'segment, upper left,
    8% of the image', 'dog + 2 segments, centre, 30% of the image'. A stage II `part` is 'part of dog, top, 2%
    of the image'."""
    counts = Counter(segments[i].label for i in members if segments[i].label)
    unnamed = sum(not segments[i].label for i in members)
    names = [label if count == 1 else f"{label} ×{count}" for label, count in counts.items()]
    if unnamed:
        names.append("segment" if unnamed == 1 else f"{unnamed} segments")
    name = " + ".join(names)
    if part:
        name = f"part of {name}"
    if not (unnamed or part):
        return name
    return f"{name}, {position(mask)}, {_percent(float(mask.mean()))} of the image"


def position(mask: np.ndarray) -> str:
    """Where `mask`'s centre of mass lies, in words ("upper left", "centre", …; see `POSITIONS`)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return "nowhere"
    row = min(int(3 * (rows.mean() + 0.5) / mask.shape[0]), 2)
    col = min(int(3 * (cols.mean() + 0.5) / mask.shape[1]), 2)
    return POSITIONS[row][col]


def _percent(fraction: float) -> str:
    return "<1%" if 0 < fraction < 0.005 else f"{fraction:.0%}"


def _union_source(segments: Sequence[Segment], members: tuple[int, ...]) -> str:
    return "+".join(dict.fromkeys(segments[i].source for i in members))


def _union_score(segments: Sequence[Segment], members: tuple[int, ...]) -> float | None:
    scores = [segments[i].score for i in members]
    return None if any(score is None for score in scores) else float(min(scores))


def _key(mask: np.ndarray) -> bytes:
    return np.packbits(mask).tobytes()
