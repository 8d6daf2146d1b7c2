"""Does a map depend on what the model learned? The model-randomisation sanity check (Adebayo et al. 2018).

Re-initialise the top blocks of the captioner's vision encoder, explain the same word again, and compare each
map with the original by rank correlation. A map that barely changes when the weights that made the caption are
replaced by random ones explains the architecture (or the image's edges), not the model: Adebayo et al. found
this for guided backpropagation and some gradient variants. The page runs the cascade (top 1, 2, 4, … blocks, and
all of them) for the clicked word; the ground-truth benchmark runs every step of it. Both give their verdict with
every block re-initialised. A map that is constant on either model has no rank correlation: its verdict is
"undefined", never a pass.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import spearmanr

from .captioners.base import Captioner
from .results import Explanation

#: Above this rank correlation with the randomised model's map, a map "barely depends on the learned weights".
FLAG_ABOVE = 0.5

Verdict = Literal["passes", "fails", "undefined"]


def verdict(correlation: float) -> Verdict:
    """A map fails when it stays correlated above `FLAG_ABOVE` with its re-initialised self; its correlation is
    undefined (NaN) when the map is constant on either model, and that is no pass."""
    if math.isnan(correlation):
        return "undefined"
    return "fails" if correlation > FLAG_ABOVE else "passes"


def cascade_levels(total: int) -> list[int]:
    """How many of `total` blocks each step of the cascade re-initialises: 1, 2, 4, … and all of them (every step
    costs an explanation; the benchmark runs all `total`)."""
    return sorted({min(2 ** step, total) for step in range(total.bit_length() + 1)} | {total}) if total else []


@dataclass(frozen=True)
class SanityCheck:
    """Per map key, the Spearman rank correlation between the word's map on the trained captioner and on a copy
    whose top `blocks` vision blocks were re-initialised (1: unchanged; ~0: unrelated)."""

    blocks: int
    total_blocks: int
    correlations: dict[str, float]

    @property
    def flagged(self) -> list[str]:
        """The maps that stay similar although the learned weights were replaced."""
        return [key for key, value in self.correlations.items() if verdict(value) == "fails"]

    def verdicts(self) -> dict[str, Verdict]:
        return {key: verdict(value) for key, value in self.correlations.items()}

    def to_dict(self) -> dict:
        """JSON-ready: an undefined correlation is null (JSON has no NaN), and its verdict says why."""
        return {"blocks": self.blocks, "total_blocks": self.total_blocks,
                "correlations": {key: None if math.isnan(value) else value for key, value in self.correlations.items()},
                "verdicts": self.verdicts(), "flagged": self.flagged, "flag_above": FLAG_ABOVE}


@dataclass(frozen=True)
class SanityCascade:
    """The sanity check's steps (`cascade_levels`), fewest re-initialised blocks first; the verdict is the last
    step's, with every block re-initialised (as the README's table)."""

    steps: tuple[SanityCheck, ...]

    @property
    def final(self) -> SanityCheck:
        return self.steps[-1]

    def to_dict(self) -> dict:
        return {"basis": f"all {self.final.total_blocks} vision blocks re-initialised",
                "verdicts": self.final.verdicts(), "steps": [step.to_dict() for step in self.steps]}


def randomize_top_blocks(captioner: Captioner, blocks: int, seed: int = 0) -> Captioner:
    """A copy of `captioner` whose last `blocks` vision blocks are re-initialised; the original is untouched.

    Every submodule with `reset_parameters` (linear layers, norms, convolutions) is reset with torch's own
    initialisation, which works for any captioner's encoder without knowing its library's init scheme.
    """
    total = len(captioner.vision_layers)
    if not 1 <= blocks <= total:
        raise ValueError(f"Randomise between 1 and {total} vision blocks, got {blocks}.")
    randomized = copy.copy(captioner)
    randomized.model = copy.deepcopy(captioner.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in randomized.vision_layers[total - blocks:]:
            for module in block.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    randomized.model.requires_grad_(False)
    return randomized


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of one shape (NaN when either is constant)."""
    if a.shape != b.shape:
        raise ValueError(f"Maps of shapes {a.shape} and {b.shape} cannot be compared.")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def compare(original: Explanation, randomized: Explanation, blocks: int, total: int) -> SanityCheck:
    """The correlations of every map the two explanations share, on the maps as drawn (model resolution)."""
    shared = [key for key in original.maps if key in randomized.maps]
    return SanityCheck(blocks, total, {key: rank_correlation(original.maps[key].display, randomized.maps[key].display)
                                       for key in shared})
