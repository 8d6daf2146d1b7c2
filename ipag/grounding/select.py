"""Choosing the region CLIP matches to a query, among segmentation proposals and the whole image.

`Grounder.prepare` does everything that does not depend on the query once per image: proposals, their
composites and CLIP embeddings. `Grounder.ground` then costs one text encoding and a few dot products.

The choice is a softmax over logits, the whole image included as a baseline, and the argmax wins. The original
IPAG clipped scores at 1 and OR-ed the tied masks, so every query got the same mask; here nothing is clipped
and nothing is merged after scoring, so different queries can, and do, pick different regions. CLIP alone
favours large regions (a composite with more of the scene left sharp looks more like any scene), so the logits
can also punish background: a crop instead of a composite, an area penalty, the counterfactual drop, and the
captioner's own map of the word (see `Grounder`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import QueryError
from ..images import normalize_map, resize_map, to_rgb
from ..segmenters import Segment, Superpixels
from ..segmenters.superpixels import Method as SuperpixelMethod
from .composite import DEFAULT_SIGMA, VIEWS, View, backdrop, view
from .proposals import Proposal, grow_mask, region_label, segment_proposals, superpixel_parts, working_size
from .result import Candidate, Grounding

if TYPE_CHECKING:
    from ..settings import Settings


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
    Embeddings are kept per view, so grounders that look at the image differently share one `GroundedImage`
    and each view is embedded once.
    """

    size: tuple[int, int]  #: (width, height) of the input image
    pixels: np.ndarray  #: the image at the working size, H'×W'×3 uint8
    segments: tuple[Segment, ...]
    proposals: tuple[Proposal, ...]  #: the whole image first
    #: Unit embeddings (one row per proposal or part) per (view, blur sigma, None or the stage II parts' key).
    embeddings: dict[tuple, np.ndarray] = field(default_factory=dict)
    #: Stage II parts per (proposal index, superpixel method, parameters).
    parts: dict[tuple, tuple[Proposal, ...]] = field(default_factory=dict)
    backdrops: dict[tuple, np.ndarray] = field(default_factory=dict)  #: per (grey or blur, sigma), working size

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

    def backdrop(self, mode: str, sigma: float) -> np.ndarray:
        """What replaces the outside of a region ("grey", or "blur" with `sigma`), made once per image."""
        key = (mode, sigma if mode == "blur" else None)
        if key not in self.backdrops:
            self.backdrops[key] = backdrop(Image.fromarray(self.pixels), mode, sigma)
        return self.backdrops[key]


class Grounder:
    """Ground query words in an image's segments with CLIP.

    Scores: with s_i = cos(view_i, prompt) for each proposal i (i = 0 is the whole image), where the view is
    what CLIP is shown of the region (`view`: a blurred or grey composite, or the blurred composite cropped to
    the region; `ipag.grounding.composite`),

        logit_i = logit_scale · s_i  [+ logit_scale · (s_0 − r_i)]  − area_penalty · a_i  + fusion_weight · J_i

    and probability_i = softmax(logit)_i. The terms that punish background:

    - `counterfactual`: r_i = cos(image with region i blurred away, prompt), so s_0 − r_i is the drop in CLIP's
      match when the region is removed: a region the query needs loses the match when it goes.
    - `area_penalty`: a_i is the region's share of the image; the penalty is in logits for the whole image, so
      a region of 5% pays 5% of it. CLIP's logits for competing regions usually differ by a few units.
    - `fusion_weight`: J_i is the agreement of region R_i with the captioner's own map c of the word (scaled to
      a maximum of 1), their fuzzy Jaccard index: J_i = Σ_{R_i} c / (|R_i| + Σ_{outside R_i} c) =
      m_i·C / (|R_i| + (1 − m_i)·C), with C = Σ c and m_i = Σ_{R_i} c / C the fraction of the map's mass
      inside R_i (reported as `Candidate.cam_mass`). J is 1 for a region exactly where the map is and drops
      both when the region misses mass and when it adds area the map does not cover (the mass fraction alone,
      or log m, would always favour the whole image, whose m is 1). An all-zero map changes nothing; a flat
      one favours larger regions, the whole image most (nothing is localised). ~10 lets the map settle close
      calls and ≳100 lets it decide.

    Stage II (`stage2=True`): when a proposal beats the whole image, its superpixel parts (`Superpixels`
    with method `superpixels` and `superpixel_params`, e.g. n_segments, compactness) are scored the same
    way and join the softmax; a part is chosen only if its logit is higher than the winner's.
    """

    def __init__(self, scorer: Scorer, template: str = "a photo of {}", max_unions: int = 16,
                 top_k: int | None = 5, stage2: bool = False, superpixels: SuperpixelMethod = "slic",
                 superpixel_params: Mapping[str, Any] | None = None, fusion_weight: float = 0.0,
                 view: View = "blur", sigma: float = DEFAULT_SIGMA, work_size: int = 448,
                 area_penalty: float = 0.0, counterfactual: bool = False) -> None:
        if "{}" not in template:
            raise ValueError(f"The prompt template must contain '{{}}' where the query goes; got {template!r}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1 (or None for all candidates); got {top_k}.")
        if view not in VIEWS or view == "removed":
            raise ValueError(f"Unknown view {view!r}; choose blur, grey or crop.")
        self.scorer = scorer
        self.template = template
        self.max_unions = max_unions  #: at most 1 + len(segments) + max_unions proposals per image
        self.top_k = top_k  #: candidates reported per query; None reports all
        self.stage2 = stage2
        self.superpixels = superpixels
        self.superpixel_params = {"n_segments": 8, **(superpixel_params or {})}
        self._splitter()  # a bad method or parameter fails here, not at the first query with stage II
        self.fusion_weight = fusion_weight
        self.view = view
        self.sigma = sigma  #: blur sigma as a fraction of the image's longer side
        self.work_size = work_size  #: longer side of the image composites are made at
        self.area_penalty = area_penalty
        self.counterfactual = counterfactual

    @classmethod
    def from_settings(cls, scorer: Scorer, settings: "Settings") -> "Grounder":
        """The grounder a page's or an API call's `Settings` ask for."""
        return cls(scorer, template=settings.template, top_k=settings.top_k, stage2=settings.stage2,
                   fusion_weight=settings.fusion_weight, view=settings.region_view,
                   area_penalty=settings.area_penalty, counterfactual=settings.counterfactual)

    @property
    def views(self) -> tuple[View, ...]:
        """What CLIP is shown of each region for this grounder's scores."""
        return (self.view, "removed") if self.counterfactual else (self.view,)

    def prepare(self, image: Image.Image, segments: Sequence[Segment]) -> GroundedImage:
        """Build and embed the proposals of `image` (from `load_image`; segment masks at its size)."""
        image = to_rgb(image)
        size = working_size(image.size, self.work_size)
        work = image if size == image.size else image.resize(size, Image.BICUBIC)
        proposals = tuple(segment_proposals(segments, image.size, size, self.max_unions))
        prepared = GroundedImage(image.size, np.asarray(work), tuple(segments), proposals)
        for name in self.views:
            self._embeddings(prepared, None, proposals, name)
        return prepared

    def ground(self, prepared: GroundedImage, query: str, cam: np.ndarray | None = None) -> Grounding:
        """The region of `prepared` that best matches `query`.

        `cam` (a 2-D map over the whole image at any resolution, e.g. the word's saliency) is fused into the
        choice when `fusion_weight` is not 0; either way each candidate reports the share of its mass it holds.
        """
        query = query.strip()
        if not query:
            raise QueryError("Nothing to ground: the query is empty.")
        prompt = self.template.format(query)
        text = _unit(self.scorer.encode_text([prompt]))[0]
        cam_work = self._cam(prepared, cam)
        proposals = prepared.proposals
        similarities, logits, masses = self._scores(prepared, None, proposals, text, cam_work)
        image_similarity = similarities[0]
        winner = int(np.argmax(logits))
        if self.stage2 and winner != 0:
            key, parts = self._parts(prepared, winner)
            part_similarities, part_logits, part_masses = self._scores(prepared, key, parts, text, cam_work,
                                                                       image_similarity)
            proposals = proposals + parts
            similarities = np.concatenate([similarities, part_similarities])
            logits = np.concatenate([logits, part_logits])
            masses = np.concatenate([masses, part_masses])
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-probabilities, kind="stable")  # ties keep the earlier, so the baseline wins ties

        def candidate(i: int) -> Candidate:
            return Candidate(prepared.mask(proposals[i]), proposals[i].label, float(probabilities[i]),
                             float(similarities[i]), proposals[i].detector_score, proposals[i].source,
                             proposals[i].members, refined=proposals[i].part_of is not None,
                             cam_mass=None if cam_work is None else float(masses[i]))

        shown = order if self.top_k is None else order[: self.top_k]
        candidates = tuple(candidate(i) for i in shown)
        rival = _rival(proposals, probabilities, int(order[0]))
        chosen = candidates[0]
        return Grounding(
            query=query, prompt=prompt, mask=chosen.mask, label=chosen.label, score=chosen.probability,
            similarity=chosen.similarity, image_similarity=float(image_similarity), baseline_won=bool(order[0] == 0),
            refined=chosen.refined, source=chosen.source, segmenter=prepared.segmenter, candidates=candidates,
            fusion_weight=self.fusion_weight, rival=None if rival is None else candidate(rival),
        )

    def _embeddings(self, prepared: GroundedImage, group: tuple | None, proposals: Sequence[Proposal],
                    name: View) -> np.ndarray:
        """Unit embeddings of `name` views of `proposals` (the image's proposals when `group` is None, else the
        stage II parts keyed `group`), computed in one call to the scorer the first time they are asked for."""
        key = (name, self.sigma, group)
        if key not in prepared.embeddings:
            background = prepared.backdrop("grey" if name == "grey" else "blur", self.sigma)
            prepared.embeddings[key] = _unit(self.scorer.encode_images(
                [view(name, prepared.pixels, background, p.mask) for p in proposals]))
        return prepared.embeddings[key]

    def _scores(self, prepared: GroundedImage, group: tuple | None, proposals: Sequence[Proposal], text: np.ndarray,
                cam: np.ndarray | None, image_similarity: float | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The proposals' similarities and logits (see the class docstring), and the fraction of the map's mass
        inside each (zeros without a map). `image_similarity` is s_0 (None: the first proposal is the image)."""
        if not proposals:  # a stage II winner too small to split
            return np.zeros(0), np.zeros(0), np.zeros(0)
        similarities = self._embeddings(prepared, group, proposals, self.view) @ text
        logits = self.scorer.logit_scale * similarities
        masks = np.stack([p.mask for p in proposals])
        if self.counterfactual:
            whole = similarities[0] if image_similarity is None else image_similarity
            removed = self._embeddings(prepared, group, proposals, "removed") @ text
            logits = logits + self.scorer.logit_scale * (whole - removed)
        if self.area_penalty:
            logits = logits - self.area_penalty * masks.mean(axis=(1, 2))
        total = 0.0 if cam is None else float(cam.sum())
        if total == 0:
            return similarities, logits, np.zeros(len(proposals))
        inside = (masks * cam).sum(axis=(1, 2))
        agreement = inside / (masks.sum(axis=(1, 2)) + total - inside)
        return similarities, logits + self.fusion_weight * agreement, inside / total

    def _cam(self, prepared: GroundedImage, cam: np.ndarray | None) -> np.ndarray | None:
        """The map at the working size, scaled to a maximum of 1 (None without one)."""
        if cam is None:
            return None
        if cam.ndim != 2 or not cam.size:
            raise ValueError(f"The map must be a 2-D map over the image; got shape {cam.shape}.")
        return normalize_map(resize_map(cam, (prepared.pixels.shape[1], prepared.pixels.shape[0])))

    def _parts(self, prepared: GroundedImage, winner: int) -> tuple[tuple, tuple[Proposal, ...]]:
        """Stage II parts of proposal `winner` (computed once per image and setting) and their key."""
        key = (winner, self.superpixels, tuple(sorted(self.superpixel_params.items())))
        if key not in prepared.parts:
            region = prepared.proposals[winner]
            masks = superpixel_parts(prepared.pixels, region.mask, self._splitter())
            prepared.parts[key] = tuple(
                Proposal(region_label(prepared.segments, region.members, mask, part=True), region.source,
                         region.members, region.detector_score, mask, part_of=winner) for mask in masks)
        return key, prepared.parts[key]

    def _splitter(self) -> Superpixels:
        return Superpixels(self.superpixels, **self.superpixel_params)


#: Two regions overlapping by less than this IoU are different places in the picture (`_rival`).
ELSEWHERE_IOU = 0.5


def _rival(proposals: Sequence[Proposal], probabilities: np.ndarray, winner: int) -> int | None:
    """The most probable proposal elsewhere in the picture than the winner (IoU with it < `ELSEWHERE_IOU`), or
    None. A runner-up that mostly *is* the winner (the object with a sliver of background) leaves no doubt about
    where the word is; a rival elsewhere with nearly the winner's probability does (`Grounding.decided`)."""
    chosen = proposals[winner].mask

    def elsewhere(index: int) -> bool:
        mask = proposals[index].mask
        return np.count_nonzero(mask & chosen) < ELSEWHERE_IOU * np.count_nonzero(mask | chosen)

    return next((int(i) for i in np.argsort(-probabilities, kind="stable") if elsewhere(i)), None)


def _unit(embeddings: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as float64 numpy (so cosines and the softmax are computed exactly)."""
    return F.normalize(embeddings.detach().double(), dim=-1).cpu().numpy()
