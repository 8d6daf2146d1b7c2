"""The small captioner and CLIP trained on generated scenes: their architectures, and where the shipped ones live.

Both are the project's ordinary model classes (`BlipCaptioner` over transformers' `BlipForConditionalGeneration`,
`ClipModel` over open_clip's `CLIP`), only small and with a vocabulary for the scene grammar, so every code
path the real models take is exercised by them. Scenes are `scenes.SIZE` pixels square and both models take
exactly that input size, so their processors never resample a scene.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from ..captioners.blip import TINY_SPECIALS, BlipCaptioner
from ..grounding.clip import LOCAL_CONFIG, ClipModel, register_config
from .scenes import COLOURS, FUNCTION_WORDS, SHAPES, SIZE

#: The shipped models, at the repository root (next to the `ipag` package).
MODELS = Path(__file__).resolve().parents[2] / "models"
CAPTIONER_FOLDER = MODELS / "synthetic-blip"
CLIP_FOLDER = MODELS / "synthetic-clip"
#: open_clip's own file name for a local model's weights (`local-dir:` folders use it too).
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
#: The architecture name the synthetic CLIP is registered under with open_clip.
CLIP_ARCHITECTURE = "ipag-synthetic-clip"
#: Superpixels for flat-colour scenes (`Superpixels` options): felzenszwalb without pre-smoothing follows the
#: objects' sharp edges exactly, and its large scale and minimum size merge the noisy background into a few
#: pieces. On held-out scenes the best segment's IoU with every object is 1 (a test checks it).
SCENE_SUPERPIXELS = {"method": "felzenszwalb", "n_segments": 16, "scale": 1000, "sigma": 0.0, "min_size": 100}

#: The caption grammar's words; "picture" and "of" only make the captioner's neutral prompt for free queries
#: ("a picture of …") tokenizable, they never occur in a caption.
WORDS = (*FUNCTION_WORDS, ",", *COLOURS, *SHAPES, "picture", "of")

#: Initial weight scale of both vision towers (transformers' BlipVisionConfig defaults to 1e-10, for loading
#: pretrained weights). Measured here over 1500 steps at lr 1e-3: 0.02 and 1e-10 learn colours and their order
#: alike (colour words 99% right by step 750); shapes come much more slowly (see models/README.md).
VISION_INIT = 0.02
TEXT_INIT = 0.02

#: Captioner size: about 1 M parameters, ~4 MB as float32.
CAPTIONER_SIZE = {"hidden": 96, "intermediate": 192, "vision_layers": 3, "text_layers": 2, "heads": 4, "patch": 8}

#: The synthetic CLIP (open_clip's JSON config format): a ViT like the captioner's (8 px patches, initialised
#: at `VISION_INIT`) and a text tower of width 64, which keeps the table of open_clip's 49408 BPE tokens (the
#: tokenizer it ships) at 3.2 M weights; context 24 tokens fits every prompt of the grammar.
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 96, "head_width": 24, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def model_names(folder: str | Path | None = None) -> tuple[str, str]:
    """The captioner and CLIP in `folder` (default: the shipped ones in `MODELS`) as `Explainer.from_pretrained`
    names them."""
    folder = Path(folder) if folder is not None else MODELS
    return (str(folder / CAPTIONER_FOLDER.name),
            f"{CLIP_ARCHITECTURE}/{folder / CLIP_FOLDER.name / CLIP_WEIGHTS_FILE}")


def new_captioner(seed: int = 0, device: torch.device = torch.device("cpu"), vision_init: float = VISION_INIT,
                  text_init: float = TEXT_INIT) -> BlipCaptioner:
    """A randomly initialised captioner of `CAPTIONER_SIZE` with the grammar's WordPiece vocabulary."""
    vocab = {token: index for index, token in enumerate([*TINY_SPECIALS, *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": SIZE, "width": SIZE}),
                              tokenizer=tokenizer)
    size = CAPTIONER_SIZE
    common = dict(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                  num_attention_heads=size["heads"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = dict(common, vocab_size=len(vocab), encoder_hidden_size=size["hidden"], initializer_range=text_init,
                num_hidden_layers=size["text_layers"], max_position_embeddings=32, bos_token_id=vocab["[DEC]"],
                sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])
    vision = dict(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                  num_attention_heads=size["heads"], num_hidden_layers=size["vision_layers"], image_size=SIZE,
                  patch_size=size["patch"], initializer_range=vision_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    return BlipCaptioner(model, processor, device, f"synthetic-blip(untrained, seed={seed})")


def new_clip(seed: int = 0, device: torch.device = torch.device("cpu")) -> ClipModel:
    """A randomly initialised CLIP of `CLIP_CONFIG` with open_clip's own BPE tokenizer."""
    register_config(CLIP_ARCHITECTURE, CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network, _, preprocess = open_clip.create_model_and_transforms(CLIP_ARCHITECTURE, image_resize_mode="squash")
    _normal_init(network.visual, torch.Generator().manual_seed(seed), VISION_INIT)
    return ClipModel(network, preprocess, open_clip.get_tokenizer(CLIP_ARCHITECTURE), device,
                     f"{CLIP_ARCHITECTURE}(untrained, seed={seed})")


def write_clip_config(folder: Path, config: dict[str, Any] = CLIP_CONFIG) -> None:
    """open_clip's local-folder config (`{"model_cfg": …}`), read back by `ClipModel.from_pretrained`."""
    (folder / LOCAL_CONFIG).write_text(json.dumps({"model_cfg": config}, indent=2))




def _normal_init(module: torch.nn.Module, generator: torch.Generator, std: float) -> None:
    """Biases 0, norm scales 1, every other weight ~ N(0, std²): `VISION_INIT` for CLIP's ViT as for BLIP's."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.ndim == 1 and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, std, generator=generator)
