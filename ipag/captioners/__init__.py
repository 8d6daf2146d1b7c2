"""Captioners behind one interface (`base.Captioner`); adding one is one small file plus a registry line."""

from __future__ import annotations

import torch

from ..errors import ModelUnavailableError
from .base import Captioner, DecodeOptions, DecoderPass, Piece
from .blip import BlipCaptioner

#: Friendly names for the captioners the playground offers; any hub id or local folder works too.
KNOWN_CAPTIONERS = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
}


def load_captioner(model: str, device: torch.device) -> Captioner:
    """Load a captioner by friendly name, hub id or local folder, with a clear error when that fails."""
    model_id = KNOWN_CAPTIONERS.get(model, model)
    try:
        return BlipCaptioner.load(model_id, device)
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"Could not load the captioner '{model_id}': it is not a local model folder, not in the Hugging "
            f"Face cache, and could not be downloaded ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Fix: connect to the internet once so it is cached (~/.cache/huggingface), or download it on "
            "another machine (`huggingface-cli download "
            f"{model_id}`) and pass the folder path; or run with --tiny to try the app on tiny random models."
        ) from err


__all__ = ["BlipCaptioner", "Captioner", "DecodeOptions", "DecoderPass", "KNOWN_CAPTIONERS", "Piece",
           "load_captioner"]
