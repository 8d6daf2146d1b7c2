"""Where a word's explanation is computed: one forward per caption, one backward per word, every map from it.

For caption tokens y₁..y_T and a target covering positions a..b, the target is
Σ_{t=a..b} log p(y_t | image, y_<t) under teacher forcing (the logits at t−1 predict y_t). One forward of
the captioner on the whole sequence serves every target (the decoder is causal, so later tokens do not
change earlier predictions). Each target's backward pass runs in two steps, with no extra work:

1. from the target to the chosen vision layer's output (patch tokens or feature maps) and the decoder's
   cross-attention, when it has any — for a late layer that is a backward through the decoder only, a small
   fraction of the whole — which is all Grad-CAM and cross-attention Grad-CAM need, so they can be shown at once;
2. from that output on through the rest of the vision encoder to the pixels (saliency): by the chain rule,
   ∂target/∂pixels = (∂output/∂pixels)ᵀ · ∂target/∂output, because every path from the pixels to the target
   goes through the layer's output.

Weights are frozen, so no parameter gradient is ever computed. SmoothGrad's noisy copies go through the
model as one extra batch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .budget import section
from .captioners.base import Captioner, DecoderPass
from .target import Target, TargetGradients, token_logprobs


@dataclass(frozen=True)
class PassNeeds:
    """What a map type needs from its word's pass beyond the gradients every pass gives (`MapType.pass_needs`).
    The explainer combines the needs of the maps it computes (`|`), so one pass serves all of them."""

    smoothgrad_samples: int = 0  #: noisy copies of the image, their gradients after the clean one's; 0: none
    smoothgrad_noise: float = 0.15  #: their noise, as a fraction of the input's value range
    attentions: bool = False  #: also every layer's attention and its gradient (relevance propagation)

    def __or__(self, other: "PassNeeds") -> "PassNeeds":
        noisy = max(self, other, key=lambda needs: needs.smoothgrad_samples)
        return PassNeeds(noisy.smoothgrad_samples, noisy.smoothgrad_noise, self.attentions or other.attentions)


@dataclass(frozen=True)
class PassSpec:
    """What one attribution forward depends on besides the image and the tokens (part of cache keys).
    Layers are concrete indices (resolved by the explainer)."""

    vision_layer: int
    attention_layer: int | None  #: None: no cross-attention (the captioner has none)
    needs: PassNeeds = PassNeeds()
    seed: int = 0


class AttributionPass:
    """One teacher-forced forward of `token_ids` on an image, kept (with its autograd graph) so that every
    target on the sequence gets its gradients from it. Holds the graph until it is dropped: keep one at a
    time (the explainer keeps the last one while it works through a caption's words)."""

    def __init__(self, captioner: Captioner, pixel_values: torch.Tensor, token_ids: Sequence[int],
                 spec: PassSpec) -> None:
        self.captioner = captioner
        self.token_ids = list(token_ids)
        self.spec = spec
        self.clean = captioner.forward_for_attribution(pixel_values, self.token_ids, spec.vision_layer,
                                                       spec.attention_layer, spec.needs.attentions)
        self.noisy: DecoderPass | None = None
        #: Each target's first step, kept for its second (see `first_step`).
        self._first: dict[Target, tuple[float, TargetGradients, torch.Tensor]] = {}
        samples = spec.needs.smoothgrad_samples
        if samples:
            generator = torch.Generator(device="cpu").manual_seed(spec.seed)
            spread = float(pixel_values.max() - pixel_values.min()) * spec.needs.smoothgrad_noise
            noise = torch.randn((samples, *pixel_values.shape[1:]), generator=generator) * spread
            noisy_pixels = pixel_values + noise.to(pixel_values.device, pixel_values.dtype)
            self.noisy = captioner.forward_for_attribution(noisy_pixels, self.token_ids, spec.vision_layer,
                                                           spec.attention_layer)

    def first_step(self, target: Target) -> tuple[float, TargetGradients, torch.Tensor]:
        """`token_gradients`, computed once per target while the pass lives (the explainer runs the two steps of
        a word as separate tasks). Timed as the budget's "decoder backward" when it runs."""
        if target not in self._first:
            with section("decoder backward"):
                self._first[target] = self.token_gradients(target)
        return self._first[target]

    def token_gradients(self, target: Target) -> tuple[float, TargetGradients, torch.Tensor]:
        """Step 1: (log-probability, gradients without pixels, ∂target/∂vision output for step 2)."""
        clean = self.clean
        value = _logprob(clean, self.token_ids, target)
        cross = [] if clean.cross_attention is None else [clean.cross_attention]
        later = self._attentions(upstream=False)  # downstream of the vision layer: reached by this step
        vision_grad, *attention_grad = torch.autograd.grad(value, [clean.vision_output, *cross, *later.values()],
                                                           retain_graph=True)
        grid = self.captioner.vision_grid
        rows = _rows(clean, target)
        gradients = TargetGradients(
            vision_activations=_numpy(grid(clean.vision_output)[0]),
            vision_gradients=_numpy(grid(vision_grad)[0]),
            attention=_rows_of(clean.cross_attention, rows),
            attention_gradients=_rows_of(attention_grad[0] if cross else None, rows),
            vision_layer=clean.vision_layer,
            attention_layer=clean.attention_layer,
            vision_layout=clean.vision_layout,
            attention_layout=clean.attention_layout,
            rows=tuple(row + clean.row_offset for row in target.rows),
            row_weights=_row_weights(clean, target),
            attentions=None if clean.attentions is None else _pairs(later, attention_grad[len(cross):]),
        )
        return float(value.detach()), gradients, vision_grad

    def pixel_gradients(self, target: Target, gradients: TargetGradients, vision_grad: torch.Tensor) -> TargetGradients:
        """Step 2: `gradients` with their pixel gradients (the clean pass's, then SmoothGrad's noisy copies')."""
        earlier = self._attentions(upstream=True)  # the vision encoder's up to the chosen layer
        pixels, *attention_grad = torch.autograd.grad(self.clean.vision_output, [self.clean.pixel_values, *earlier.values()],
                                                      grad_outputs=vision_grad, retain_graph=True)
        if self.noisy is not None:
            (noisy,) = torch.autograd.grad(_logprob(self.noisy, self.token_ids, target), self.noisy.pixel_values,
                                           retain_graph=True)
            pixels = torch.cat([pixels, noisy])
        attentions = None if gradients.attentions is None else {**gradients.attentions,
                                                                **_pairs(earlier, attention_grad)}
        return replace(gradients, pixels=_numpy(pixels), attentions=attentions)

    def _attentions(self, upstream: bool) -> dict[tuple[str, int], torch.Tensor]:
        """The attention probabilities (by (kind, layer)) that lie before the chosen vision layer's output
        (`upstream`: the vision encoder's blocks up to it) or after it (the rest, and every decoder layer)."""
        every = self.clean.attentions
        if every is None:
            return {}
        cut = self.clean.vision_index + 1
        vision = dict(enumerate(every.vision))
        if upstream:
            return {("vision", i): a for i, a in vision.items() if i < cut}
        return {**{("vision", i): a for i, a in vision.items() if i >= cut},
                **{("encoder", i): a for i, a in enumerate(every.encoder)},
                **{("decoder_self", i): a for i, a in enumerate(every.decoder_self)},
                **{("decoder_cross", i): a for i, a in enumerate(every.decoder_cross)}}


class KeptPass:
    """The last attribution pass, kept (with its autograd graph) while the words of a caption are explained one
    after another: they share its forward. Only the explainer's worker uses it; `drop` frees the graph (hundreds
    of MB for BLIP-base) once the worker has nothing to do."""

    def __init__(self) -> None:
        self._kept: tuple[Hashable, AttributionPass] | None = None

    def get(self, wanted: Hashable, make: Callable[[], AttributionPass]) -> AttributionPass:
        """The kept pass if it was made for `wanted` (the image, the sequence and the spec), else `make()`'s."""
        if self._kept is None or self._kept[0] != wanted:
            self._kept = None  # free the old graph before building the new one
            self._kept = (wanted, make())
        return self._kept[1]

    def drop(self) -> bool:
        """Free the kept pass; whether there was one."""
        kept, self._kept = self._kept, None
        return kept is not None


def target_gradients(captioner: Captioner, pixel_values: torch.Tensor, token_ids: Sequence[int],
                     targets: Sequence[Target], vision_layer: int, attention_layer: int | None,
                     smoothgrad_samples: int = 0, smoothgrad_noise: float = 0.15, seed: int = 0,
                     attentions: bool = False) -> Iterator[tuple[float, TargetGradients]]:
    """(log-probability, complete gradients) for each target, sharing one forward pass (two with SmoothGrad),
    yielded as each target's backward pass finishes. Layer indices may be negative (Python-style); a captioner
    without cross-attention ignores `attention_layer`. `attentions`: every layer's attention gradient too."""
    if not targets:
        return
    spec = PassSpec(vision_layer, attention_layer, PassNeeds(smoothgrad_samples, smoothgrad_noise, attentions), seed)
    attribution = AttributionPass(captioner, pixel_values, token_ids, spec)
    for target in targets:
        value, gradients, vision_grad = attribution.token_gradients(target)
        yield value, attribution.pixel_gradients(target, gradients, vision_grad)


def _logprob(decoded: DecoderPass, token_ids: list[int], target: Target) -> torch.Tensor:
    """The target's log-probability, summed over the batch (SmoothGrad's noisy copies share one backward)."""
    return target.score(token_logprobs(decoded.logprobs, token_ids)).sum()


def _pairs(attentions: dict[tuple[str, int], torch.Tensor],
           gradients: Sequence[torch.Tensor]) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(probabilities, gradient) per attention, batch dimension removed, off the graph."""
    return {key: (a[0].detach().float(), g[0].detach().float()) for (key, a), g in zip(attentions.items(), gradients)}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _rows(decoded: DecoderPass, target: Target) -> list[int]:
    """The rows of the decoder's attention that predict the target (or the captioner's query rows)."""
    if decoded.query_rows is not None:
        return list(decoded.query_rows)
    return [row + decoded.row_offset for row in target.rows]


def _row_weights(decoded: DecoderPass, target: Target) -> np.ndarray | None:
    """How much the target's rows read each query row (`DecoderPass.query_weights`), None without queries."""
    if decoded.query_weights is None:
        return None
    return _numpy(decoded.query_weights[0, [row + decoded.row_offset for row in target.rows]].sum(dim=0))


def _rows_of(attention: torch.Tensor | None, rows: list[int]) -> np.ndarray | None:
    """The decoder's attention to the image (or its gradient) in `rows`, over all keys: (heads, rows, keys). None
    for a decoder without attention to the image."""
    return None if attention is None else _numpy(attention[0][:, rows])
