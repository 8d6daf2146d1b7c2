"""Integrated gradients (Sundararajan et al. 2017), through Captum: the word's gradient averaged along the
straight path from a baseline image to the image, times the difference between them.

Unlike a single gradient it satisfies completeness: the attributions add up to log p(word | image) −
log p(word | baseline), which the note reports as Captum's convergence delta. The baseline is the image
blurred (the composites' backdrop, as in the deletion/insertion metrics): no object detail, same colours
and layout, so the attributions say what the detail contributed. It costs a forward and a backward pass per
step (batched), hence off by default on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from captum.attr import IntegratedGradients
from PIL import Image

from ..grounding.composite import backdrop
from ..settings import Setting, Settings
from .base import MapContext, MapType


@dataclass(frozen=True)
class IntegratedGradientsMap(MapType):
    """Σ over channels of Captum's integrated gradients of the word's log-probability."""

    key = "integrated_gradients"
    title = "Integrated gradients"
    needs = "own"
    signed = True
    pixel_level = True
    declares = {
        "integrated_gradients": Setting(False, "maps", "Integrated gradients (a forward and backward per step)"),
        "ig_steps": Setting(16, "maps", "Integrated gradients: steps", minimum=2, maximum=256, step=1),
    }
    steps: int = 16
    #: Steps per forward and backward pass (Captum's `internal_batch_size`): each step's autograd graph through
    #: BLIP-base at 384 px holds ~0.6 GiB, so 2 keep the peak ~1.3 GiB above the models' (measured,
    #: docs/performance.md#memory); on a CPU larger batches are no faster.
    batch_size: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> "IntegratedGradientsMap | None":
        return cls(settings.ig_steps) if settings.integrated_gradients else None

    @property
    def method(self) -> str:
        return f"integrated gradients ({self.steps} steps, blurred-image baseline)"

    def layer(self, context: MapContext) -> str:
        return "input pixels"

    def _raw(self, context: MapContext) -> np.ndarray:
        return self._attributions(context)[0]

    def note(self, context: MapContext) -> str:
        _, delta, seconds = self._attributions(context)
        return (f"Integrated gradients: {self.steps} steps in {seconds:.1f} s; completeness gap (Σ attributions − "
                f"Δlog p between image and baseline) {delta:+.3g}.")

    def _attributions(self, context: MapContext) -> tuple[np.ndarray, float, float]:
        """(channel-summed attributions, convergence delta, seconds), computed once per word."""
        return context.memo(("integrated gradients", self, context.token_ids, context.target.positions),
                            lambda: self.compute(context))

    def compute(self, context: MapContext) -> tuple[np.ndarray, float, float]:
        captioner = context.captioner
        baseline = captioner.preprocess(Image.fromarray(backdrop(context.image, "blur")))

        def word_logprob(pixels: torch.Tensor) -> torch.Tensor:
            return context.target.score(captioner.differentiable_token_logprobs(pixels, context.token_ids))

        started = time.perf_counter()
        with torch.enable_grad():
            attributions, delta = IntegratedGradients(word_logprob).attribute(
                context.pixel_values, baselines=baseline, n_steps=self.steps, internal_batch_size=self.batch_size,
                return_convergence_delta=True)
        summed = attributions[0].sum(dim=0).detach().float().cpu().numpy()
        return summed, float(delta[0]), time.perf_counter() - started
