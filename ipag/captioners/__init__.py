"""Captioners behind one interface (`base.Captioner`). `CAPTIONERS` is the registry: the built-in classes below,
then those installed as plugins (entry point group "ipag.captioners", loaded by `ipag/__init__.py`), then those registered at run time with
`register` (docs/plugins.md). A class says which models it runs and which friendly names it offers."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from ..errors import ModelUnavailableError
from ..hub import download_fix, require_hub
from ..plugins import Registry
from .base import Captioner, DecodeOptions, DecoderPass, Piece
from .blip import BlipCaptioner
from .clipcap import ClipCapCaptioner
from .florence2 import Florence2Captioner
from .qformer import QFormerCaptioner
from .vit_gpt2 import VitGpt2Captioner
from .vlm import VlmCaptioner

CAPTIONERS: Registry[type[Captioner]] = Registry("ipag.captioners", Captioner, lambda captioner: captioner.name)
register = CAPTIONERS.register
unregister = CAPTIONERS.unregister

for _builtin in (BlipCaptioner, VitGpt2Captioner, ClipCapCaptioner, VlmCaptioner, QFormerCaptioner,
                 Florence2Captioner):
    register(_builtin)


def known_captioners() -> dict[str, str]:
    """The friendly names the playground offers, and the model each stands for; any hub id, local folder or
    file a registered class `handles` works too."""
    return {name: model for captioner in CAPTIONERS for name, model in captioner.models.items()}


def load_captioner(model: str, device: torch.device) -> Captioner:
    """Load a captioner by friendly name, hub id, local folder or checkpoint file, with a clear error when that
    fails.

    A local folder or a model already in the Hugging Face cache loads without touching the network; anything
    else is downloaded (with progress) if the hub can be reached, and refused at once if it cannot. A file that
    a class `handles` (a ClipCap checkpoint: no transformers config to dispatch on) goes to that class, which
    finds its parts the same way.
    """
    model_id = known_captioners().get(model, model)
    for captioner in CAPTIONERS:
        if captioner.handles(model_id):
            return captioner.load(model_id, device)
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
    captioner = next((captioner for captioner in CAPTIONERS if model_type in captioner.model_types), None)
    if captioner is None:
        supported = [model_type for captioner in CAPTIONERS for model_type in captioner.model_types]
        raise ModelUnavailableError(
            f"'{model_id}' is a '{model_type}' model, which the playground cannot explain. Supported model types: "
            f"{', '.join(supported)} (friendly names: {', '.join(known_captioners())}).")
    return captioner.load(model_id, device, local_files_only=local_files_only)


def tiny_captioner(name: str, seed: int = 0, device: torch.device = torch.device("cpu")) -> Captioner:
    """The tiny random version of a friendly-named captioner (offline, in about a second)."""
    captioner = next((captioner for captioner in CAPTIONERS if name in captioner.models), None)
    if captioner is None:
        raise ValueError(f"Unknown captioner '{name}'. Choose one of: {', '.join(known_captioners())}.")
    return captioner.tiny(seed, device)


def _unavailable(model_id: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"Could not load the captioner '{model_id}' ({type(err).__name__}: {str(err).splitlines()[0]}). "
        f"Fix: {download_fix(model_id)}")


__all__ = ["BlipCaptioner", "CAPTIONERS", "Captioner", "ClipCapCaptioner", "DecodeOptions", "DecoderPass",
           "Florence2Captioner", "Piece", "QFormerCaptioner", "VitGpt2Captioner", "VlmCaptioner", "known_captioners",
           "load_captioner", "register", "tiny_captioner", "unregister"]
