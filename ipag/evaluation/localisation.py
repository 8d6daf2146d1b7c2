"""How well a heatmap finds a known evidence mask (Arras, Osman & Samek 2022, "CLEVR-XAI"), plus baselines.

For a map M ≥ 0 and the evidence mask G of the word (both H×W):

- **pointing game**: is the map's maximum inside G;
- **relevance mass accuracy**: ΣM·G / ΣM, the share of the map's mass on the evidence;
- **relevance rank accuracy**: the share of the |G| highest-valued pixels of M that lie inside G;
- **AUROC**: M as a detector of G's pixels (0.5 is chance, 1 a map that ranks all evidence first).

Ties are resolved by their expectation under random tie-breaking, so a constant map (or an all-zero one, which
says nothing) scores exactly chance: |G|/N on the first three and 0.5 on AUROC, never a lucky 1.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..images import normalize_map, resize_map

METRICS = ("pointing", "mass", "rank", "auroc")


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
