"""What is explained, and what explaining it left behind: the vocabulary `ipag.attribution` (which computes
gradients) and `ipag.maps` (which turns them into heatmaps) share, so that neither imports the other.

A target is a set of token positions of a teacher-forced sequence y₁..y_T; its value is
Σ_{t in target} log p(y_t | image, y_<t). Every place that scores a word (the gradients, integrated gradients,
occlusion, the trust numbers, the faithfulness curves, the ground-truth counterfactuals) asks `Target.score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .layout import Layout

#: A numpy array or a torch tensor: `Target.score` sums either without converting it (tensors keep their graph).
Values = TypeVar("Values", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Target:
    """The token positions (in the teacher-forced sequence) whose summed log-probability is explained."""

    positions: tuple[int, ...]

    @property
    def rows(self) -> list[int]:
        """Where the target's tokens are in per-token log-probabilities (`token_logprobs`): position t at row
        t − 1, because the decoder's output at t − 1 predicts y_t and position 0 (the start token) has none."""
        return [position - 1 for position in self.positions]

    def check(self, length: int) -> None:
        """Refuse positions outside a sequence of `length` tokens (position 0 is the start token: no prediction)."""
        if not self.positions or min(self.positions) < 1 or max(self.positions) >= length:
            raise ValueError(f"Target positions {self.positions} must lie in 1..{length - 1}.")

    def score(self, logprobs: Values) -> Values:
        """Σ log p(y_t) over the target, from per-token log-probabilities whose last axis holds positions 1..T−1
        (shape (T−1,) → a scalar; (B, T−1) → one value per image of a batch)."""
        self.check(logprobs.shape[-1] + 1)
        return logprobs[..., self.rows].sum(-1)


def token_logprobs(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """(B, T−1) log p(y_t | image, y_<t) for t ≥ 1, picked from a teacher-forced forward's log-softmax (B, T, V)
    over the vocabulary (the row at t − 1 predicts y_t)."""
    ids = torch.as_tensor(list(token_ids)[1:], device=logprobs.device)
    return logprobs[:, :-1].gather(2, ids.expand(logprobs.shape[0], -1)[..., None])[..., 0]


@dataclass(frozen=True)
class TargetGradients:
    """What one target's backward pass left behind, as numpy arrays (batch dimension removed).

    `pixels` holds one input gradient per pass: (1, 3, S, S) normally, (n + 1, 3, S, S) with SmoothGrad's n
    noisy copies after the clean one; None until the backward pass through the vision encoder has run.
    `attention` / `attention_gradients` are the decoder's attention rows that predict the target tokens over all
    its keys, shape (heads, rows, keys), None for a decoder without attention to the image; `vision_*` are the chosen
    vision layer's output as a (D, gh, gw) grid (ViT patch tokens, CNN feature maps, or several tiles' grids one above
    the other). The layouts place a value per grid cell or per attention key on the pixel input (`Layout.place`);
    `rows` are the target's rows in the decoder's attention (relevancy propagates them). `row_weights`: how much the
    target reads each row of `attention` (BLIP-2: each query's), None when the rows are the target's own.
    """

    vision_activations: np.ndarray
    vision_gradients: np.ndarray
    attention: np.ndarray | None
    attention_gradients: np.ndarray | None
    vision_layer: str
    attention_layer: str | None
    vision_layout: Layout
    attention_layout: Layout | None = None
    rows: tuple[int, ...] = ()
    row_weights: np.ndarray | None = None
    pixels: np.ndarray | None = None
    #: Every attention layer's (probabilities, gradient) as torch tensors (heads, queries, keys), by
    #: ("vision" | "decoder_self" | "decoder_cross", layer); None unless a map type needs them.
    attentions: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def layers(self, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (probabilities, gradient) pairs of one kind of attention, first layer first."""
        return [self.attentions[key] for key in sorted(self.attentions) if key[0] == kind]

    @property
    def grid(self) -> tuple[int, int]:
        return self.vision_activations.shape[1], self.vision_activations.shape[2]
