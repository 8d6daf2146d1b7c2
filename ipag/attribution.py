"""Where a word's explanation is computed: one forward, one backward per target, every map from it.

For caption tokens y₁..y_T and a target covering positions a..b, the target is
Σ_{t=a..b} log p(y_t | image, y_<t) under teacher forcing (the logits at t−1 predict y_t). One forward of
the captioner on the whole sequence serves every target (the decoder is causal, so later tokens do not
change earlier predictions); each target then needs one `torch.autograd.grad` call, which yields at once
the gradients for Grad-CAM (vision patch tokens), cross-attention Grad-CAM (attention probabilities) and
saliency (pixels). Weights are frozen, so no parameter gradient is ever computed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .captioners.base import Captioner, DecoderPass
from .maps import TargetGradients


@dataclass(frozen=True)
class Target:
    """The token positions (in `token_ids`) whose summed log-probability is explained."""

    positions: tuple[int, ...]

    @property
    def rows(self) -> list[int]:
        """The decoder output rows that predict the target's tokens (row t−1 holds log p(y_t))."""
        return [position - 1 for position in self.positions]

    def check(self, length: int) -> None:
        """Refuse positions outside a sequence of `length` tokens (position 0 is the start token: no prediction)."""
        if not self.positions or min(self.positions) < 1 or max(self.positions) >= length:
            raise ValueError(f"Target positions {self.positions} must lie in 1..{length - 1}.")


def target_gradients(
    captioner: Captioner,
    pixel_values: torch.Tensor,
    token_ids: Sequence[int],
    targets: Sequence[Target],
    vision_layer: int,
    attention_layer: int,
    smoothgrad_samples: int = 0,
    smoothgrad_noise: float = 0.15,
    seed: int = 0,
) -> Iterator[tuple[float, TargetGradients]]:
    """(log-probability, gradients) for each target, sharing one forward pass (two with SmoothGrad).

    Yielded one target at a time, as soon as its backward pass is done, so that a caller can use (and
    cache) the first words while the others are still being computed; the graph is freed after the last.
    SmoothGrad's noisy copies go through the model as one batch; their pixel gradients are stacked after
    the clean pass's, so the saliency map type sees all of them.
    """
    if not targets:
        return
    token_ids = list(token_ids)
    for target in targets:
        target.check(len(token_ids))
    clean = captioner.forward_for_attribution(pixel_values, token_ids, vision_layer, attention_layer)
    noisy = None
    if smoothgrad_samples:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        spread = float(pixel_values.max() - pixel_values.min()) * smoothgrad_noise
        noise = torch.randn((smoothgrad_samples, *pixel_values.shape[1:]), generator=generator) * spread
        noisy_pixels = pixel_values + noise.to(pixel_values.device, pixel_values.dtype)
        noisy = captioner.forward_for_attribution(noisy_pixels, token_ids, vision_layer, attention_layer)
    for index, target in enumerate(targets):
        keep = index < len(targets) - 1
        value = _logprob(clean, token_ids, target)
        pixel_grad, vision_grad, attention_grad = torch.autograd.grad(
            value, [clean.pixel_values, clean.vision_tokens, clean.cross_attention], retain_graph=keep
        )
        pixels = pixel_grad
        if noisy is not None:
            (noisy_grad,) = torch.autograd.grad(_logprob(noisy, token_ids, target), [noisy.pixel_values],
                                                retain_graph=keep)
            pixels = torch.cat([pixel_grad, noisy_grad])
        rows = target.rows
        patches = clean.grid[0] * clean.grid[1]  # the last gh·gw tokens; the CLS token comes first
        yield float(value.detach()), TargetGradients(
            pixels=_numpy(pixels),
            vision_activations=_grid(clean.vision_tokens, clean.grid),
            vision_gradients=_grid(vision_grad, clean.grid),
            attention=_numpy(clean.cross_attention[0][:, rows, -patches:]),
            attention_gradients=_numpy(attention_grad[0][:, rows, -patches:]),
            vision_layer=clean.vision_layer,
            attention_layer=clean.attention_layer,
        )


def _logprob(decoded: DecoderPass, token_ids: list[int], target: Target) -> torch.Tensor:
    """Σ_t log p(y_t | image, y_<t) over the target's positions, summed over the batch (noisy copies)."""
    rows = torch.tensor(target.rows, device=decoded.logprobs.device)
    ids = torch.tensor([token_ids[p] for p in target.positions], device=decoded.logprobs.device)
    picked = decoded.logprobs[:, rows, ids]
    return picked.sum()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _grid(tokens: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """(1, 1+N, D) block output → its N patch tokens as (D, gh, gw), the layout grad-cam's weighting expects."""
    return _numpy(tokens[0, -grid[0] * grid[1]:].T.reshape(-1, *grid))
