"""Captioners behind one interface (`base.Captioner`); adding one is one small file plus a registry line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import ModelUnavailableError
from ..hub import download_fix, require_hub
from .base import Captioner, DecodeOptions, DecoderPass, Piece
from .blip import BlipCaptioner
from .clipcap import DEFAULT_CHECKPOINT, ClipCapCaptioner, is_clipcap_checkpoint
from .vit_gpt2 import VitGpt2Captioner

#: Friendly names for the captioners the playground offers; any hub id or local folder works too, and any
#: ClipCap checkpoint file (see `ipag.captioners.clipcap`).
KNOWN_CAPTIONERS = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "vit-gpt2": "nlpconnect/vit-gpt2-image-captioning",
    "clipcap": str(DEFAULT_CHECKPOINT),
}

#: Which class runs a model, by the `model_type` of its config (so a local folder needs no naming convention).
CAPTIONER_CLASSES: dict[str, type[Captioner]] = {
    "blip": BlipCaptioner,
    "vision-encoder-decoder": VitGpt2Captioner,
}

#: Tiny random stand-ins for each friendly name (same class, same code paths), for `--tiny`, tests and CI.
TINY_CAPTIONERS: dict[str, Callable[[int, torch.device], Captioner]] = {
    "blip-base": BlipCaptioner.tiny,
    "blip-large": BlipCaptioner.tiny,
    "vit-gpt2": VitGpt2Captioner.tiny,
    "clipcap": ClipCapCaptioner.tiny,
}


def load_captioner(model: str, device: torch.device) -> Captioner:
    """Load a captioner by friendly name, hub id, local folder or ClipCap checkpoint, with a clear error when
    that fails.

    A local folder or a model already in the Hugging Face cache loads without touching the network; anything
    else is downloaded (with progress) if the hub can be reached, and refused at once if it cannot. A ClipCap
    checkpoint (no transformers config to dispatch on) goes to ClipCap, which finds its parts the same way.
    """
    model_id = KNOWN_CAPTIONERS.get(model, model)
    if is_clipcap_checkpoint(model_id):
        return ClipCapCaptioner.load(model_id, device)
    try:
        return _load(model_id, device, local_files_only=True)
    except (OSError, ValueError) as err:
        if Path(model_id).is_dir():
            raise _unavailable(model_id, err) from err
        if model_id.startswith(("/", ".", "~")):  # a path, not a hub id: nothing to download
            raise ModelUnavailableError(f"No such model folder: {model_id}. Pass a folder written by "
                                        "`save_pretrained`, a hub id, or try --synthetic or --tiny.") from err
    require_hub(f"The captioner '{model_id}'", download_fix(model_id))
    try:
        return _load(model_id, device, local_files_only=False)
    except (OSError, ValueError) as err:
        raise _unavailable(model_id, err) from err


def _load(model_id: str, device: torch.device, local_files_only: bool) -> Captioner:
    model_type = AutoConfig.from_pretrained(model_id, local_files_only=local_files_only).model_type
    if model_type not in CAPTIONER_CLASSES:
        raise ModelUnavailableError(
            f"'{model_id}' is a '{model_type}' model, which the playground cannot explain. Supported model types: "
            f"{', '.join(CAPTIONER_CLASSES)} (friendly names: {', '.join(KNOWN_CAPTIONERS)}).")
    return CAPTIONER_CLASSES[model_type].load(model_id, device, local_files_only=local_files_only)


def tiny_captioner(name: str, seed: int = 0, device: torch.device = torch.device("cpu")) -> Captioner:
    """The tiny random version of a friendly-named captioner (offline, in about a second)."""
    if name not in TINY_CAPTIONERS:
        raise ValueError(f"Unknown captioner '{name}'. Choose one of: {', '.join(TINY_CAPTIONERS)}.")
    return TINY_CAPTIONERS[name](seed, device)


def _unavailable(model_id: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Could not load the captioner '{model_id}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"Fix: {download_fix(model_id)}")


__all__ = ["BlipCaptioner", "CAPTIONER_CLASSES", "Captioner", "ClipCapCaptioner", "DecodeOptions", "DecoderPass",
           "KNOWN_CAPTIONERS", "Piece", "TINY_CAPTIONERS", "VitGpt2Captioner", "load_captioner", "tiny_captioner"]
