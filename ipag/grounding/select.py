"""Choosing the region CLIP matches to a query, among segmentation proposals and the whole image.

`Grounder.prepare` does everything that does not depend on the query once per image: proposals, their
composites and CLIP embeddings. `Grounder.ground` then costs one text encoding and a few dot products.

The choice is a softmax over logit_scale · cos(composite, prompt), the whole image included as a baseline,
and the argmax wins. The original IPAG clipped scores at 1 and OR-ed the tied masks, so every query got the
same mask; here nothing is clipped and nothing is merged after scoring, so different queries can, and do,
pick different regions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import QueryError
from ..images import normalize_map, resize_map, to_rgb
from ..segmenters import Segment, Superpixels
from ..segmenters.superpixels import Method as SuperpixelMethod
from .composite import DEFAULT_SIGMA, CompositeMode, backdrop, paste
from .proposals import Proposal, grow_mask, segment_proposals, superpixel_parts, working_size
from .result import Candidate, Grounding


class Scorer(Protocol):
    """What the Grounder needs from CLIP (`ClipModel` is one); tests inject simple ones.

    Embeddings need not be normalised: the Grounder normalises them before taking cosines.
    """

    @property
    def logit_scale(self) -> float: ...

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


@dataclass(eq=False)
class GroundedImage:
    """Everything about one image that does not depend on the query (made by `Grounder.prepare`).

    Proposal masks and composites live at a working size (longer side ≤ `Grounder.work_size`): CLIP sees
    224–336 px anyway. Masks at the input size are rebuilt from the segments (stored packed) only for the
    regions reported. The input image itself is not kept (12 MB for a 2048×1536 photo in Pillow): only its size.
    """

    size: tuple[int, int]  #: (width, height) of the input image
    pixels: np.ndarray  #: the image at the working size, H'×W'×3 uint8
    background: np.ndarray  #: what replaces the outside of a region in composites, at the working size
    segments: tuple[Segment, ...]
    proposals: tuple[Proposal, ...]  #: the whole image first
    embeddings: np.ndarray  #: (len(proposals), D) unit vectors of the proposals' composites
    #: Stage II parts and their embeddings, per (proposal index, superpixel method, parameters).
    parts: dict[tuple, tuple[tuple[Proposal, ...], np.ndarray]] = field(default_factory=dict)

    @property
    def segmenter(self) -> str:
        """The segmenter(s) the segments came from, e.g. "detectron2" ("none" without segments)."""
        return "+".join(dict.fromkeys(segment.source for segment in self.segments)) or "none"

    def mask(self, proposal: Proposal) -> np.ndarray:
        """The proposal's region at the input size (exact segment outlines, not the working-size mask)."""
        width, height = self.size
        if not proposal.members:
            return np.ones((height, width), dtype=bool)
        union = np.logical_or.reduce([self.segments[i].mask for i in proposal.members])
        if proposal.part_of is None:
            return union
        return union & grow_mask(proposal.mask, self.size)


class Grounder:
    """Ground query words in an image's segments with CLIP.

    Scores: with s_i = cos(composite_i, prompt) for each proposal i (i = 0 is the whole image),
    logit_i = logit_scale · s_i + fusion_weight · J_i and probability_i = softmax(logit)_i, where J_i is
    the agreement of region R_i with the Grad-CAM map c (scaled to a maximum of 1), their fuzzy Jaccard
    index: J_i = Σ_{R_i} c / (|R_i| + Σ_{outside R_i} c) = m_i·C / (|R_i| + (1 − m_i)·C), with C = Σ c
    and m_i = Σ_{R_i} c / C the fraction of the CAM mass inside R_i (reported as `Candidate.cam_mass`).
    J is 1 for a region exactly where the CAM is and drops both when the region misses CAM mass and when it
    adds area the CAM does not cover (the mass fraction alone, or log m, would always favour the whole
    image, whose m is 1). An all-zero CAM changes nothing; a flat one favours larger regions, the whole
    image most (nothing is localised). `fusion_weight` is in logits: 0 is CLIP alone; CLIP's logits for
    competing regions usually differ by a few units, so ~10 lets the CAM settle close calls and ≳100 lets
    the CAM decide.

    Stage II (`stage2=True`): when a proposal beats the whole image, its superpixel parts (`Superpixels`
    with method `superpixels` and `superpixel_params`, e.g. n_segments, compactness) are scored the same
    way and join the softmax; a part is chosen only if its logit is higher than the winner's.
    """

    def __init__(self, scorer: Scorer, template: str = "a photo of {}", max_unions: int = 16,
                 top_k: int | None = 5, stage2: bool = False, superpixels: SuperpixelMethod = "slic",
                 superpixel_params: Mapping[str, Any] | None = None, fusion_weight: float = 0.0,
                 mode: CompositeMode = "blur", sigma: float = DEFAULT_SIGMA, work_size: int = 448) -> None:
        if "{}" not in template:
            raise ValueError(f"The prompt template must contain '{{}}' where the query goes; got {template!r}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for all candidates); got {top_k}.")
        self.scorer = scorer
        self.template = template
        self.max_unions = max_unions  #: at most 1 + len(segments) + max_unions proposals per image
        self.top_k = top_k  #: candidates reported per query; None reports all
        self.stage2 = stage2
        self.superpixels = superpixels
        self.superpixel_params = {"n_segments": 8, **(superpixel_params or {})}
        self._splitter()  # a bad method or parameter fails here, not at the first query with stage II
        self.fusion_weight = fusion_weight
        self.mode = mode
        self.sigma = sigma  #: blur sigma as a fraction of the image's longer side
        self.work_size = work_size  #: longer side of the image composites are made at

    def prepare(self, image: Image.Image, segments: Sequence[Segment]) -> GroundedImage:
        """Build and embed the proposals of `image` (from `load_image`; segment masks at its size)."""
        image = to_rgb(image)
        size = working_size(image.size, self.work_size)
        work = image if size == image.size else image.resize(size, Image.BICUBIC)
        pixels = np.asarray(work)
        background = backdrop(work, self.mode, self.sigma)
        proposals = tuple(segment_proposals(segments, image.size, size, self.max_unions))
        return GroundedImage(image.size, pixels, background, tuple(segments), proposals,
                             self._embed(pixels, background, proposals))

    def ground(self, prepared: GroundedImage, query: str, cam: np.ndarray | None = None) -> Grounding:
        """The region of `prepared` that best matches `query`.

        `cam` (a 2-D map over the whole image at any resolution, e.g. the word's Grad-CAM) is fused into the
        choice when `fusion_weight` is not 0; either way each candidate reports the share of its mass it holds.
        """
        query = query.strip()
        if not query:
            raise QueryError("Nothing to ground: the query is empty.")
        prompt = self.template.format(query)
        text = _unit(self.scorer.encode_text([prompt]))[0]
        cam_work = self._cam(prepared, cam)
        proposals = prepared.proposals
        similarities = prepared.embeddings @ text
        logits, masses = self._scores(similarities, proposals, cam_work)
        winner = int(np.argmax(logits))
        if self.stage2 and winner != 0:
            parts, embeddings = self._parts(prepared, winner)
            part_similarities = embeddings @ text
            part_logits, part_masses = self._scores(part_similarities, parts, cam_work)
            proposals = proposals + parts
            similarities = np.concatenate([similarities, part_similarities])
            logits = np.concatenate([logits, part_logits])
            masses = np.concatenate([masses, part_masses])
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities, kind="stable")  # ties keep the earlier, so the baseline wins ties
        shown = order if self.top_k is None else order[: self.top_k]
        candidates = tuple(
            Candidate(prepared.mask(proposals[i]), proposals[i].label, float(probabilities[i]),
                      float(similarities[i]), proposals[i].detector_score, proposals[i].source,
                      proposals[i].members, refined=proposals[i].part_of is not None,
                      cam_mass=None if cam_work is None else float(masses[i]))
            for i in shown
        )
        chosen = candidates[0]
        return Grounding(
            query=query, prompt=prompt, mask=chosen.mask, label=chosen.label, score=chosen.probability,
            similarity=chosen.similarity, image_similarity=float(similarities[0]), baseline_won=bool(order[0] == 0),
            refined=chosen.refined, source=chosen.source, segmenter=prepared.segmenter, candidates=candidates,
            fusion_weight=self.fusion_weight,
        )

    def _embed(self, pixels: np.ndarray, background: np.ndarray, proposals: Sequence[Proposal]) -> np.ndarray:
        """Unit embeddings of the proposals' composites, in one call to the scorer."""
        return _unit(self.scorer.encode_images([paste(pixels, background, p.mask) for p in proposals]))

    def _scores(self, similarities: np.ndarray, proposals: Sequence[Proposal],
                 cam: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Logits of the proposals and the fraction of the CAM mass inside each (zeros without a CAM)."""
        logits = self.scorer.logit_scale * similarities
        total = 0.0 if cam is None or not proposals else float(cam.sum())
        if total == 0:
            return logits, np.zeros(len(proposals))
        masks = np.stack([p.mask for p in proposals])
        inside = (masks * cam).sum(axis=(1, 2))
        agreement = inside / (masks.sum(axis=(1, 2)) + total - inside)
        return logits + self.fusion_weight * agreement, inside / total

    def _cam(self, prepared: GroundedImage, cam: np.ndarray | None) -> np.ndarray | None:
        """The CAM at the working size, scaled to a maximum of 1 (None without one)."""
        if cam is None:
            return None
        if cam.ndim != 2 or not cam.size:
            raise ValueError(f"The CAM must be a 2-D map over the image; got shape {cam.shape}.")
        return normalize_map(resize_map(cam, (prepared.pixels.shape[1], prepared.pixels.shape[0])))

    def _parts(self, prepared: GroundedImage, winner: int) -> tuple[tuple[Proposal, ...], np.ndarray]:
        """Stage II parts of proposal `winner` and their embeddings, computed once per image and setting."""
        key = (winner, self.superpixels, tuple(sorted(self.superpixel_params.items())))
        if key not in prepared.parts:
            region = prepared.proposals[winner]
            masks = superpixel_parts(prepared.pixels, region.mask, self._splitter())
            parts = tuple(Proposal(f"part of {region.label}", region.source, region.members, region.detector_score,
                                   mask, part_of=winner) for mask in masks)
            embeddings = (self._embed(prepared.pixels, prepared.background, parts) if parts
                          else np.zeros((0, prepared.embeddings.shape[1])))
            prepared.parts[key] = (parts, embeddings)
        return prepared.parts[key]

    def _splitter(self) -> Superpixels:
        return Superpixels(self.superpixels, **self.superpixel_params)


def _unit(embeddings: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as float64 numpy (so cosines and the softmax are computed exactly)."""
    return F.normalize(embeddings.detach().double(), dim=-1).cpu().numpy()
