"""Which number format each stage of the models' work computes in: bfloat16 where the processor computes it
natively and the maps survive it, float32 elsewhere.

bfloat16 runs under torch's autocast: matrix products and convolutions in bfloat16, the weights and the
pixels stay float32, so gradients reach the float32 input and every map keeps its shape; what the maps are
made from (activations, gradients, attention) is converted to float32 before any CAM weighting or relevance
accumulation (`ipag.attribution`). Not float16: without loss scaling, small pixel gradients would underflow.

A stage runs in bfloat16 under "auto" only if it is in `ACCEPTED`: the stages whose maps agreed with float32
on generated scenes (`python -m ipag check-precision`, `ipag.evaluation.precision`; the figures are in
docs/performance.md). Where the device has no native bfloat16 (a CPU without AVX512-BF16, Apple MPS),
emulated bfloat16 would be slower than float32, so "auto" means float32 there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .errors import ModelUnavailableError

Requested = Literal["auto", "float32", "bfloat16"]
PRECISIONS: tuple[Requested, ...] = ("auto", "float32", "bfloat16")
Stage = Literal["caption", "gradients", "scoring", "occlusion", "clip"]
#: The stages that run in one format each: the captioner's generation; the word's forward and backward pass
#: (every gradient map); its batched scoring passes (trust numbers, integrated gradients, evaluations);
#: occlusion's sweep (its evidence is a small difference of two log-probabilities); CLIP (the proposals' and
#: the query's embeddings, CLIP relevance).
STAGES: tuple[Stage, ...] = ("caption", "gradients", "scoring", "occlusion", "clip")
#: The stages "auto" runs in bfloat16, chosen by `python -m ipag check-precision` on the synthetic models
#: (docs/performance.md#bfloat16): on held-out scenes 0–19 (100 content words) generation wrote the same caption
#: every time and every map and region stayed put with the caption, scoring or CLIP stage in bfloat16. The word's
#: backward pass (GradCAM++ and XGradCAM amplify its rounding) and occlusion's sweep (ρ 0.58: its evidence is a
#: small difference of log-probabilities) failed, so they stay float32.
ACCEPTED: frozenset[Stage] = frozenset({"caption", "scoring", "clip"})


@dataclass(frozen=True)
class Precision:
    """The stages that run in bfloat16 (all others in float32)."""

    bfloat16: frozenset[Stage] = frozenset()

    def dtype(self, stage: Stage) -> torch.dtype:
        return torch.bfloat16 if stage in self.bfloat16 else torch.float32

    @contextmanager
    def autocast(self, device: torch.device, stage: Stage, reused: Iterable[nn.Parameter] = ()) -> Iterator[None]:
        """Where `stage` runs: torch's bfloat16 autocast when it is one of ours, else a no-op. `reused`: the weights
        the block runs more than once (a decoder's once per token, a tower's once per chunk); without gradients,
        each is then cast once for the whole block (`casts_cached`). Weights a block runs once gain nothing from
        that, and their bfloat16 copies would be held until it ends (BLIP-base's are 0.45 GB)."""
        enabled = stage in self.bfloat16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled), \
                casts_cached(reused, enabled and not torch.is_grad_enabled()):
            yield

    def describe(self) -> str:
        if not self.bfloat16:
            return "float32"
        if self.bfloat16 == frozenset(STAGES):
            return "bfloat16"
        return "bfloat16 for " + ", ".join(stage for stage in STAGES if stage in self.bfloat16) + "; float32 otherwise"


FLOAT32 = Precision()


@contextmanager
def casts_cached(weights: Iterable[nn.Parameter], enabled: bool) -> Iterator[None]:
    """Under a bfloat16 autocast, let each of these `weights` be cast once for the whole block instead of at every
    use: generation runs the decoder once per token, and re-casting its weights each time made bfloat16 generation
    slower than float32 (BLIP-base's 20 tokens: 2.2 s against 1.5 s here; 1.0–1.1 s with the casts cached), and
    CLIP's proposals in chunks likewise. Autocast caches only the casts of leaf tensors that require gradients,
    which a frozen model's weights do not; so they are marked for the block and frozen again after. Only under
    `torch.no_grad` (the caller's `enabled` says so): with gradients on, marked weights would get gradients."""
    frozen = [parameter for parameter in weights if not parameter.requires_grad] if enabled else []
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def bfloat16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    (AMD Zen 4 and later, Intel Cooper Lake and later, AMX CPUs among them). torch's probe for the CPU flag is
    private; a torch without it is taken to say no."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe and probe())
    return False


def choose_precision(requested: str, device: torch.device) -> Precision:
    """The precision for `requested` on `device` ("auto": `ACCEPTED` in bfloat16 where it is native, else
    float32). Asking for bfloat16 where it is not native is refused: it would be slower, not faster."""
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}.")
    if requested == "float32":
        return FLOAT32
    if not bfloat16_native(device):
        if requested == "bfloat16":
            raise ModelUnavailableError(
                f"bfloat16 was asked for, but this {device.type.upper()} has no native bfloat16 (emulated, it is "
                "slower than float32). Fix: use --precision auto or float32.")
        return FLOAT32
    return Precision(frozenset(STAGES) if requested == "bfloat16" else ACCEPTED)
