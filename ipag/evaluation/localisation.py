"""How well a heatmap finds a known evidence mask (Arras, Osman & Samek 2022, "CLEVR-XAI"), plus baselines.

For a map M ≥ 0 and the evidence mask G of the word (both H×W):

- **pointing game**: is the map's maximum inside G;
- **relevance mass accuracy**: ΣM·G / ΣM, the share of the map's mass on the evidence;
- **relevance rank accuracy**: the share of the |G| highest-valued pixels of M that lie inside G;
- **AUROC**: M as a detector of G's pixels (0.5 is chance, 1 a map that ranks all evidence first).

Ties are resolved by their expectation under random tie-breaking, so a constant map (or an all-zero one, which
says nothing) scores exactly chance: |G|/N on the first three and 0.5 on AUROC, never a lucky 1.

A region chosen for the word (grounding) is scored against G too (`region_record`): is it the right object, and if
not, was the object among the proposals at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import rankdata

from ..images import normalize_map, resize_map
from ..results import Explanation
from ..synthetic.scenes import Scene, evidence_for
from .report import summarize

if TYPE_CHECKING:
    from ..grounding import Grounding

METRICS = ("pointing", "mass", "rank", "auroc")
#: A region is the right object when its IoU with the object's mask is at least this (the usual detection
#: criterion; objects never overlap, so no other object can reach it at the same time).
RIGHT_OBJECT_IOU = 0.5


def score_map(heatmap: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All four metrics of `heatmap` against `mask` (H×W; the mask must hold some but not all pixels)."""
    if np.shape(heatmap) != np.shape(mask):
        raise ValueError(f"The map {np.shape(heatmap)} and the mask {np.shape(mask)} differ in shape.")
    values = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0).ravel()
    inside = np.asarray(mask, dtype=bool).ravel()
    if not 0 < inside.sum() < inside.size:
        raise ValueError("The mask must cover some of the image, but not all of it.")
    return {"pointing": pointing_game(values, inside), "mass": mass_accuracy(values, inside),
            "rank": rank_accuracy(values, inside), "auroc": auroc(values, inside)}


def pointing_game(values: np.ndarray, inside: np.ndarray) -> float:
    """1.0 if the map's maximum lies in the mask, 0.0 if not; for tied maxima, the share of them inside."""
    top = values == values.max()
    return float(inside[top].mean())


def mass_accuracy(values: np.ndarray, inside: np.ndarray) -> float:
    """Share of the map's mass inside the mask (an all-zero map counts as constant: chance)."""
    total = values.sum()
    return float(values[inside].sum() / total) if total > 0 else float(inside.mean())


def rank_accuracy(values: np.ndarray, inside: np.ndarray) -> float:
    """Share of the top-|G| pixels inside the mask; pixels tied at the cut-off count pro rata."""
    size = int(inside.sum())
    cutoff = np.partition(values, values.size - size)[values.size - size]
    above, tied = values > cutoff, values == cutoff
    remaining = size - int(above.sum())
    hits = (above & inside).sum() + remaining * (tied & inside).sum() / tied.sum()
    return float(hits / size)


def auroc(values: np.ndarray, inside: np.ndarray) -> float:
    """Area under the ROC curve of the map as a detector of the mask (Mann–Whitney U; ties count half)."""
    ranks = rankdata(values)
    positives = int(inside.sum())
    negatives = values.size - positives
    return float((ranks[inside].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def random_map(size: tuple[int, int], grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Baseline: uniform noise on a patch grid, stretched to `size` = (width, height) like a Grad-CAM."""
    return normalize_map(resize_map(rng.random(grid), size))


def centre_prior(size: tuple[int, int], spread: float = 0.25) -> np.ndarray:
    """Baseline: a Gaussian bump at the image centre (σ = `spread` × each side): "objects are in the middle"."""
    width, height = size
    rows = (np.arange(height) + 0.5 - height / 2) / (spread * height)
    cols = (np.arange(width) + 0.5 - width / 2) / (spread * width)
    return np.exp(-0.5 * (rows[:, None] ** 2 + cols[None, :] ** 2)).astype(np.float32)


def region_record(grounding: "Grounding", truth: np.ndarray, proposals: Sequence[np.ndarray]) -> dict[str, Any]:
    """How the grounding of one word went against the mask of its object (`truth`), with every proposal's mask
    (at the image size) to tell a missing proposal from a wrong choice."""
    chosen = grounding.mask
    overlap = float(np.count_nonzero(chosen & truth))
    best = max(iou(mask, truth) for mask in proposals)
    right = iou(chosen, truth)
    return {"query": grounding.query, "label": grounding.label, "iou": right, "right": right >= RIGHT_OBJECT_IOU,
            "best_iou": best, "recall": best >= RIGHT_OBJECT_IOU, "precision": overlap / np.count_nonzero(chosen),
            "coverage": overlap / np.count_nonzero(truth), "area": float(chosen.mean()),
            "probability": grounding.score, "decided": grounding.decided, "whole_image": grounding.baseline_won}


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    return float((first & second).sum() / (first | second).sum())


def region_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means ± std of `region_record`s: overall, the choice among words whose object was proposed, and the
    choice among decided and undecided words."""
    def where(condition: str, value: bool) -> list[float]:
        return [float(r["right"]) for r in records if r[condition] == value]

    numbers = ("iou", "precision", "coverage", "area", "probability")
    return {"right_object": summarize(float(r["right"]) for r in records),
            "recall": summarize(float(r["recall"]) for r in records),
            "right_given_recall": summarize(where("recall", True)),
            **{name: summarize(r[name] for r in records) for name in numbers},
            "decided": summarize(float(r["decided"]) for r in records),
            "right_when_decided": summarize(where("decided", True)),
            "right_when_undecided": summarize(where("decided", False)),
            "whole_image": summarize(float(r["whole_image"]) for r in records)}


@dataclass(frozen=True)
class GroundTruth:
    """One word's maps scored against the object the word names in a generated scene: what the page shows and
    exports for it (`ground_truth`)."""

    mask: np.ndarray = field(repr=False)  #: the object's pixels (H×W bool)
    scores: dict[str, dict[str, float]]  #: map key → `score_map`'s metrics

    @property
    def object_share(self) -> float:
        """The object's share of the image: the mass a random map puts on it."""
        return float(self.mask.mean())

    def hit(self, key: str) -> bool:
        """Whether the map's peak is on the object (all of it, when the peak is a tie)."""
        return self.scores[key]["pointing"] >= 0.5

    def to_dict(self) -> dict[str, Any]:
        return {"object_share": self.object_share, "maps": self.scores}


def ground_truth(explanation: Explanation, scene: Scene | None) -> GroundTruth | None:
    """The ground truth of an explained caption word when the image is a generated scene and the word names an
    object in it (`evidence_for`); None otherwise (a real photo, a phrase or free text, a function word)."""
    if scene is None or len(explanation.words) != 1 or explanation.caption is None:
        return None
    mask = evidence_for(scene, [word.text for word in explanation.caption.words], explanation.words[0].index)
    if mask is None:
        return None
    return GroundTruth(mask, {key: score_map(heatmap.values, mask) for key, heatmap in explanation.maps.items()})
