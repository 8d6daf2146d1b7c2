"""CLIP through open_clip: image and text embeddings for scoring regions, and CLIP's own relevance map.

Images always go through open_clip's own preprocessing transform, built with ``resize_mode="squash"``:
a plain resize of the whole image, no centre crop. A crop would hide the borders of non-square images from
CLIP (a region there could never win), and the relevance map could not be stretched back onto the image.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..device import resolve_device
from ..errors import ModelUnavailableError
from ..hub import cached_on_hub, download_fix, require_hub
from ..images import to_rgb
from ..precision import FLOAT32, Precision

#: open_clip's config file of a local model folder ({"model_cfg": …}), read for architectures it does not know.
LOCAL_CONFIG = "open_clip_config.json"
#: Name under which the tiny random CLIP is registered with open_clip.
TINY_MODEL = "ipag-tiny-clip"

#: A 2-layer ViT on 32 px images (a 4×4 patch grid, 4 heads) and a 2-layer text tower on 16 tokens: builds in
#: well under a second, yet its image embedding clearly depends on the image (cosines of 0.75–0.9 between
#: different images at open_clip's default initialisation, not ≈1).
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


class ClipModel:
    """A frozen open_clip model with its preprocessing and tokenizer; satisfies `ipag.grounding.Scorer`."""

    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: torch.device, name: str,
                 batch_size: int = 32) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.batch_size = batch_size
        #: Whether CLIP computes in bfloat16 (its stage "clip", `ipag.precision`): set by the explainer.
        self.precision: Precision = FLOAT32
        # Read once: `.item()` on every query would synchronise with the GPU for a constant.
        self.logit_scale = float(self.model.logit_scale.exp())

    @classmethod
    def from_pretrained(cls, model: str = "ViT-B-32", pretrained: str = "openai",
                        device: str | torch.device = "cpu") -> "ClipModel":
        """Load an open_clip architecture with weights from a pretrained tag or a local checkpoint file
        (`load_open_clip`). Tags are downloaded once and cached by open_clip (in the Hugging Face cache)."""
        network, preprocess = load_open_clip(model, pretrained)
        try:
            tokenizer = open_clip.get_tokenizer(model)
        except (RuntimeError, OSError, ValueError) as err:
            raise ModelUnavailableError(f"The tokenizer of CLIP model '{model}' could not be loaded ({err}). Fix: run "
                                        "once with network access so that it is cached.") from err
        return cls(network, preprocess, tokenizer, resolve_device(device), f"{model} ({pretrained})")

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu") -> "ClipModel":
        """A randomly initialised tiny ViT CLIP (see `TINY_CONFIG`), built offline, for tests and demos.

        The global torch random state is left untouched, so building one does not change other tests' draws.
        """
        register_tiny_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network, preprocess = load_open_clip(TINY_MODEL, None)
        tokenizer = open_clip.get_tokenizer(TINY_MODEL)
        return cls(network, preprocess, tokenizer, resolve_device(device), f"{TINY_MODEL}(seed={seed})")

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The (N, 3, S, S) tensor the vision tower receives: open_clip's transform of each RGB image."""
        return torch.stack([self.preprocess(to_rgb(image)) for image in images]).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings, (N, D) float32 on the CPU, computed `batch_size` images at a time."""
        with self._autocast(reused=self.model.visual.parameters()):  # the tower runs once per chunk
            chunks = [
                self.model.encode_image(self.pixels(images[start:start + self.batch_size]), normalize=True).float()
                for start in range(0, len(images), self.batch_size)
            ]
        return torch.cat(chunks).cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, (M, D) float32 on the CPU."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self._autocast():
            return self.model.encode_text(tokens, normalize=True).float().cpu()

    def _autocast(self, reused: Iterable[nn.Parameter] = ()) -> AbstractContextManager[None]:
        return self.precision.autocast(self.device, "clip", reused)

    def relevance(self, image: Image.Image, text: str) -> np.ndarray:
        """Where CLIP's image embedding matches `text`: Chefer et al.'s gradient-weighted attention rollout.

        For the cosine similarity s of the image and text embeddings and each vision block's attention
        probabilities A (heads × tokens × tokens): cam = mean over heads of ReLU(∂s/∂A ⊙ A), and the relevance
        R = I + cam·R accumulates block by block. Returns the CLS row of R over the patch tokens, on the patch
        grid (non-negative float32; stretch it to the image, which CLIP saw squashed, to draw it).
        ("Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
        Transformers", ICCV 2021; the map the original IPAG showed via CLIP_Explainability.)
        """
        image = to_rgb(image)
        text_embedding = self.encode_text([text])[0].to(self.device)
        pixels = self.pixels([image]).requires_grad_(True)  # parameters are frozen: the graph starts here
        with torch.enable_grad(), self._autocast(), recorded_attention(self.model.visual) as probabilities:
            embedding = self.model.encode_image(pixels, normalize=True)[0]
            gradients = torch.autograd.grad(embedding.float() @ text_embedding, probabilities)
        tokens = probabilities[0].shape[-1]
        relevance = torch.eye(tokens, device=self.device)
        for attention, gradient in zip(probabilities, gradients):  # accumulated in float32, whatever CLIP ran in
            cam = (gradient.float() * attention.float()).clamp(min=0).mean(dim=1)[0]
            relevance = relevance + cam @ relevance
        grid = self.model.visual.grid_size
        return relevance[0, 1:].reshape(grid).detach().cpu().numpy()


def load_open_clip(model: str, pretrained: str | None,
                   local_files_only: bool = False) -> tuple[nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """An open_clip model (on the CPU) and its preprocessing transform (squashing, see the module docstring),
    with weights from a pretrained tag or a local checkpoint file (None: random weights, architecture only).

    A tag whose weights are not cached is refused at once when the hub is out of reach (`require_hub`) or
    `local_files_only`. Tags trained with QuickGELU (OpenAI's, among others) get it switched on: open_clip only
    warns about the mismatch, and the embeddings would silently degrade. Raises `ModelUnavailableError` with
    the fix.
    """
    register_local_config(model, pretrained)
    tag = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if tag and not _weights_cached(tag):
        what, fix = f"The CLIP weights '{model}/{pretrained}'", download_fix(tag.get("hf_hub", pretrained))
        if local_files_only:
            raise ModelUnavailableError(f"{what} are not on this machine. Fix: {fix}")
        require_hub(what, fix)
    try:
        network, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=pretrained, force_quick_gelu=bool(tag.get("quick_gelu", False)),
            image_resize_mode="squash")
    except (RuntimeError, OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"CLIP model '{model}' with weights '{pretrained}' could not be loaded ({err}). Fix: run once "
            "with network access so open_clip caches the weights, or pass a local checkpoint file as "
            "`pretrained`; `open_clip.list_pretrained()` lists the known model/tag pairs."
        ) from err
    return network, preprocess


def _weights_cached(tag: dict) -> bool:
    """Whether an open_clip pretrained tag's weights need no download: a URL download is quick to fail and is
    left to open_clip; a hub file counts as cached in its .bin or .safetensors form (open_clip takes either)."""
    if "hf_hub" not in tag:
        return True
    repo_id, filename = os.path.split(tag["hf_hub"])
    filename = filename or "open_clip_pytorch_model.bin"
    return cached_on_hub(repo_id, filename, filename.rsplit(".", 1)[0] + ".safetensors",
                         "open_clip_model.safetensors")


def register_local_config(model: str, pretrained: str | None) -> None:
    """An architecture open_clip does not know, read from the `LOCAL_CONFIG` next to a local checkpoint (the
    layout of open_clip's own `local-dir:` folders), so that "arch/path/open_clip_model.safetensors" loads."""
    if not pretrained or model in open_clip.list_models():
        return
    config = Path(pretrained).parent / LOCAL_CONFIG
    if Path(pretrained).is_file() and config.is_file():
        loaded = json.loads(config.read_text())
        register_config(model, loaded.get("model_cfg", loaded))


def register_tiny_config() -> None:
    """Make `TINY_MODEL` known to open_clip (idempotent)."""
    register_config(TINY_MODEL, TINY_CONFIG)


def register_config(name: str, config: dict) -> None:
    """Make the architecture `config` known to open_clip as `name` (idempotent): it only reads JSON files."""
    if name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory(prefix="ipag-clip-config-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)


@contextmanager
def recorded_attention(vision: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record every vision block's attention probabilities (N, heads, L, L) as tensors in the autograd graph.

    `nn.MultiheadAttention` can return its weights (`need_weights=True`), but only as a view that lies off
    the path to its output, so no gradient ever reaches it. Instead a forward hook recomputes each block's
    attention explicitly from the module's own weights, keeps the probabilities, and returns that output in
    place of the module's (numerically the same). The hooks are removed however the block exits, and only
    this thread's passes are recorded: another thread encoding images meanwhile (a background `prepare`)
    goes through the modules untouched.
    """
    blocks = list(vision.transformer.resblocks)
    recorded: list[torch.Tensor] = []
    owner = threading.get_ident()
    handles = []
    try:
        for block in blocks:
            attention = getattr(block, "attn", None)
            if not _plain_self_attention(attention):
                raise NotImplementedError(
                    f"CLIP relevance needs nn.MultiheadAttention vision blocks; {type(block).__name__} has "
                    f"{type(attention).__name__}. Use a standard ViT CLIP (ViT-B-32, ViT-B-16, ViT-L-14).")
            handles.append(attention.register_forward_hook(_explicit_attention(recorded, owner), with_kwargs=True))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _plain_self_attention(module: nn.Module | None) -> bool:
    """True for an `nn.MultiheadAttention` whose maths `_explicit_attention` reproduces exactly."""
    return (isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim
            and module.bias_k is None and not module.add_zero_attn)


def _explicit_attention(recorded: list[torch.Tensor], owner: int):
    """A forward hook for `nn.MultiheadAttention` self-attention that appends its probabilities to `recorded`
    when called from thread `owner` (other threads keep the module's own output)."""

    def hook(module: nn.MultiheadAttention, args: tuple, *rest):
        # torch registers a hook before flagging it `with_kwargs`: a forward in another thread at that moment
        # calls it as (module, args, output). Such calls are other threads' anyway, and are left alone.
        if threading.get_ident() != owner:
            return None
        kwargs, _output = rest
        query, key, value = args[:3]  # open_clip passes them positionally
        if key is not query or value is not query:
            raise NotImplementedError("CLIP relevance expects self-attention (query, key and value the same).")
        tokens = query if module.batch_first else query.transpose(0, 1)
        batch, length, width = tokens.shape
        q, k, v = F.linear(tokens, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, length, module.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        mask = kwargs.get("attn_mask")
        if mask is not None:
            logits = logits + mask
        probabilities = logits.softmax(dim=-1)
        recorded.append(probabilities)
        mixed = (probabilities @ v).transpose(1, 2).reshape(batch, length, width)
        result = module.out_proj(mixed)
        return (result if module.batch_first else result.transpose(0, 1)), None

    return hook
