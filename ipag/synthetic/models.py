"""The small captioners and CLIP trained on generated scenes: their architectures, and where the shipped ones live.

All are the project's ordinary model classes (`BlipCaptioner` over transformers' `BlipForConditionalGeneration`,
`VitGpt2Captioner` over its `VisionEncoderDecoderModel`, `VlmCaptioner` over its `LlavaForConditionalGeneration`,
`ClipModel` over open_clip's `CLIP`), only small and with
a vocabulary for the scene grammar, so every code path the real models take is exercised by them. Scenes are
`scenes.SIZE` pixels square and every model takes exactly that input size, so their processors never resample.

Every vision tower starts from a *mimetic* initialisation (`locality_init`): its attention starts out attending to
nearby patches, as a convolution would, which is what lets a small ViT learn the shapes within a CPU budget
(measurements in models/README.md).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                          BlipProcessor, CLIPImageProcessor, CLIPVisionConfig, GPT2Tokenizer, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from ..captioners.base import Captioner
from ..captioners.blip import TINY_SPECIALS, BlipCaptioner
from ..captioners.gpt2 import END_OF_TEXT, bpe_tokenizer
from ..captioners.vit_gpt2 import VitGpt2Captioner
from ..captioners.vlm import VlmCaptioner
from ..errors import ModelUnavailableError
from ..grounding.clip import LOCAL_CONFIG, ClipModel, register_config
from .scenes import COLOURS, FUNCTION_WORDS, SHAPES, SIZE, caption_of, generate_scene

#: The shipped models, at the repository root (next to the `ipag` package).
MODELS = Path(__file__).resolve().parents[2] / "models"
CLIP_FOLDER = MODELS / "synthetic-clip"
#: The CNN the others were distilled from (`teacher.py`): kept so that retraining one model reuses it; the
#: playground never loads it.
TEACHER_FOLDER = "synthetic-teacher"
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

#: Initial weight scale (transformers' BlipVisionConfig defaults to 1e-10, for loading pretrained weights); the
#: attention and position embeddings of the vision towers are then set by `locality_init`.
INIT = 0.02

#: The BLIP captioner: ViT of 3 blocks, width 96, 8 px patches; BERT-style decoder of 2 blocks (~0.5 M weights).
BLIP_SIZE = {"hidden": 96, "intermediate": 192, "vision_layers": 3, "text_layers": 2, "heads": 4, "patch": 8}
#: The ViT-GPT2 captioner, built differently on purpose (a second opinion for the benchmark's rankings): HF's ViT
#: with 4 blocks of width 96 and GPT-2 blocks with cross-attention, a byte-level BPE vocabulary, pixels in [−1, 1].
VIT_GPT2_SIZE = {"hidden": 96, "intermediate": 192, "vision_layers": 4, "text_layers": 2, "heads": 4, "patch": 8}
#: The LLaVA-style captioner, a decoder-only vision-language model (the benchmark's third opinion): a CLIP vision
#: tower of 3 blocks whose last block's patch tokens an MLP projects into the sequence of a Llama language model of
#: 2 blocks, before the caption; the grammar's byte-level BPE (~0.55 M weights).
LLAVA_SIZE = {"hidden": 96, "intermediate": 192, "vision_layers": 3, "text_layers": 2, "heads": 4, "patch": 8}
#: The synthetic LLaVA's prompt: the image's tokens, then the start of text. It is a captioner, not an assistant:
#: there is no instruction to follow (the page's instruction box does not change its prompt).
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
                  + LLAVA_IMAGE_TOKEN + "{% endif %}{% endfor %}{% endfor %}" + END_OF_TEXT)

#: The synthetic CLIP (open_clip's JSON config format): a ViT like the BLIP captioner's (8 px patches) and a text
#: tower of width 64, which keeps the table of open_clip's 49408 BPE tokens (the tokenizer it ships) at 3.2 M
#: weights; context 24 tokens fits every prompt of the grammar.
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 96, "head_width": 24, "mlp_ratio": 2.0, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@dataclass(frozen=True)
class Family:
    """A synthetic captioner: its folder name in `models/` and how to build it untrained."""

    name: str  #: as `--synthetic --captioner NAME` and `Explainer.synthetic(captioner=NAME)` take it
    folder: str
    build: Callable[[int], Captioner]


def new_blip(seed: int = 0, device: torch.device = torch.device("cpu")) -> BlipCaptioner:
    """A randomly initialised BLIP captioner of `BLIP_SIZE` with the grammar's WordPiece vocabulary."""
    vocab = {token: index for index, token in enumerate([*TINY_SPECIALS, *WORDS])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": SIZE, "width": SIZE}),
                              tokenizer=tokenizer)
    size = BLIP_SIZE
    common = dict(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                  num_attention_heads=size["heads"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = dict(common, vocab_size=len(vocab), encoder_hidden_size=size["hidden"], initializer_range=INIT,
                num_hidden_layers=size["text_layers"], max_position_embeddings=32, bos_token_id=vocab["[DEC]"],
                sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])
    vision = dict(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                  num_attention_heads=size["heads"], num_hidden_layers=size["vision_layers"], image_size=SIZE,
                  patch_size=size["patch"], initializer_range=INIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
        locality_init(blip_attention(model.vision_model), torch.Generator().manual_seed(seed))
    return BlipCaptioner(model, processor, device, f"synthetic-blip(untrained, seed={seed})")


def new_vit_gpt2(seed: int = 0, device: torch.device = torch.device("cpu")) -> VitGpt2Captioner:
    """A randomly initialised ViT-GPT2 captioner of `VIT_GPT2_SIZE` with a byte-level BPE over the grammar."""
    size = VIT_GPT2_SIZE
    captioner = VitGpt2Captioner.build(
        grammar_bpe(), image_size=SIZE, hidden=size["hidden"], intermediate=size["intermediate"],
        vision_layers=size["vision_layers"], text_layers=size["text_layers"], heads=size["heads"],
        patch=size["patch"], initializer_range=INIT, seed=seed, device=device,
        model_id=f"synthetic-vit-gpt2(untrained, seed={seed})")
    locality_init(vit_attention(captioner.model.encoder), torch.Generator().manual_seed(seed))
    return captioner


def new_llava(seed: int = 0, device: torch.device = torch.device("cpu")) -> VlmCaptioner:
    """A randomly initialised LLaVA-style captioner of `LLAVA_SIZE` with the grammar's byte-level BPE, whose
    vision tower starts local like the others' (`locality_init`)."""
    size = LLAVA_SIZE
    tokenizer = grammar_bpe()
    tokenizer.model_max_length = 256  # the prompt holds the image's tokens
    tokenizer.add_special_tokens({"extra_special_tokens": [LLAVA_IMAGE_TOKEN]})
    end, image = tokenizer.convert_tokens_to_ids([END_OF_TEXT, LLAVA_IMAGE_TOKEN])
    common = dict(hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                  num_attention_heads=size["heads"], initializer_range=INIT)
    vision = CLIPVisionConfig(**common, num_hidden_layers=size["vision_layers"], image_size=SIZE,
                              patch_size=size["patch"])
    text = LlamaConfig(**common, vocab_size=len(tokenizer), num_hidden_layers=size["text_layers"],
                       max_position_embeddings=256, bos_token_id=end, eos_token_id=end, pad_token_id=end)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", initializer_range=INIT)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
        locality_init(clip_vision_attention(model.model.vision_tower), torch.Generator().manual_seed(seed))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = end
    images = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=size["patch"],
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=LLAVA_IMAGE_TOKEN, chat_template=LLAVA_TEMPLATE)
    return VlmCaptioner(model, processor, device, f"synthetic-llava(untrained, seed={seed})")


#: The synthetic captioners, by the name `--captioner` takes in synthetic mode (the first is the default).
FAMILIES = {family.name: family for family in (Family("blip", "synthetic-blip", new_blip),
                                                Family("vit-gpt2", "synthetic-vit-gpt2", new_vit_gpt2),
                                                Family("llava", "synthetic-llava", new_llava))}
DEFAULT_FAMILY = "blip"


def grammar_bpe() -> GPT2Tokenizer:
    """A GPT-2 tokenizer whose byte-level BPE knows every word of the grammar as one token, with GPT-2's leading
    space ("Ġred") and without it (a caption's first word, "a")."""
    corpus = [caption_of(generate_scene(seed).objects) for seed in range(200)] + [" ".join(WORDS)] * 2
    corpus += [word for word in WORDS]  # each word also without the space before it
    return bpe_tokenizer(corpus, vocab_size=400, max_length=32)


def model_names(folder: str | Path | None = None, captioner: str = DEFAULT_FAMILY) -> tuple[str, str]:
    """The synthetic `captioner` (a `FAMILIES` name) and CLIP in `folder` (default: the shipped ones in `MODELS`) as
    `Explainer.from_pretrained` names them."""
    if captioner not in FAMILIES:
        raise ModelUnavailableError(f"Unknown synthetic captioner {captioner!r}; choose one of {', '.join(FAMILIES)}.")
    folder = Path(folder) if folder is not None else MODELS
    return (str(folder / FAMILIES[captioner].folder),
            f"{CLIP_ARCHITECTURE}/{folder / CLIP_FOLDER.name / CLIP_WEIGHTS_FILE}")


def new_clip(seed: int = 0, device: torch.device = torch.device("cpu")) -> ClipModel:
    """A randomly initialised CLIP of `CLIP_CONFIG` with open_clip's own BPE tokenizer."""
    register_config(CLIP_ARCHITECTURE, CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network, _, preprocess = open_clip.create_model_and_transforms(CLIP_ARCHITECTURE, image_resize_mode="squash")
    locality_init(clip_attention(network.visual), torch.Generator().manual_seed(seed))
    return ClipModel(network, preprocess, open_clip.get_tokenizer(CLIP_ARCHITECTURE), device,
                     f"{CLIP_ARCHITECTURE}(untrained, seed={seed})")


def write_clip_config(folder: Path, config: dict[str, Any] = CLIP_CONFIG) -> None:
    """open_clip's local-folder config (`{"model_cfg": …}`), read back by `ClipModel.from_pretrained`."""
    (folder / LOCAL_CONFIG).write_text(json.dumps({"model_cfg": config}, indent=2))


# --- mimetic initialisation ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VisionAttention:
    """Where a ViT keeps what `locality_init` sets: per block the query, key, value and output weights (views of
    (out, in) matrices, fused or not), the number of heads, and the patches' position embeddings (N, D)."""

    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    heads: int
    positions: torch.Tensor


#: Mimetic initialisation's constants (Trockman & Kolter 2023): W_q W_kᵀ ≈ α₁Z + β₁I, W_v W_o ≈ α₂Z − β₂I.
QUERY_KEY = (0.7, 0.7)
VALUE_OUTPUT = (0.4, 0.4)
#: Highest frequency of the 2-D sine–cosine position embeddings, in radians per patch.
POSITION_FREQUENCY = 3.0


def locality_init(attention: VisionAttention, generator: torch.Generator) -> None:
    """Make a ViT's attention start local, like a convolution (mimetic initialisation, Trockman & Kolter 2023).

    Each head's W_q W_kᵀ is set close to the identity and the patches' position embeddings to 2-D sines and
    cosines, so a patch first attends to patches near it (their position embeddings are alike); W_v W_o is set
    close to minus the identity, as trained ViTs have it. Only the starting point changes: every weight is then
    trained as usual. Measured here, it is what lets the small ViTs learn the shapes (models/README.md).
    """
    with torch.no_grad():
        for query, key, value, output in attention.blocks:
            width = query.shape[1]
            head = width // attention.heads
            for h in range(attention.heads):
                left, right = _factor(_mimetic(width, *QUERY_KEY, generator), head)
                query[h * head:(h + 1) * head] = left.T
                key[h * head:(h + 1) * head] = right.T
            left, right = _factor(_mimetic(width, VALUE_OUTPUT[0], -VALUE_OUTPUT[1], generator), width)
            value.copy_(left.T)
            output.copy_(right)
        attention.positions.copy_(sincos_positions(attention.positions.shape))


def _mimetic(width: int, alpha: float, beta: float, generator: torch.Generator) -> torch.Tensor:
    return alpha * torch.randn(width, width, generator=generator) / math.sqrt(width) + beta * torch.eye(width)


def _factor(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B (width × rank) with A Bᵀ the best rank-`rank` approximation of `matrix` (split SVD)."""
    u, s, vh = torch.linalg.svd(matrix)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def sincos_positions(shape: torch.Size) -> torch.Tensor:
    """(N, D) 2-D sine–cosine embeddings of a square grid of N patches, a quarter of D for each of sin x, cos x,
    sin y, cos y, at frequencies falling geometrically from `POSITION_FREQUENCY`."""
    count, width = shape
    side = math.isqrt(count)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    quarter = width // 4
    frequencies = POSITION_FREQUENCY / 10000 ** (torch.arange(quarter) / quarter)
    x, y = cols.flatten()[:, None] * frequencies, rows.flatten()[:, None] * frequencies
    embedding = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return torch.nn.functional.pad(embedding, (0, width - embedding.shape[1]))


def blip_attention(vision: nn.Module) -> VisionAttention:
    """BLIP's vision tower: fused qkv Linear and a `projection` per block; CLS position first."""
    blocks = []
    for layer in vision.encoder.layers:
        qkv = layer.self_attn.qkv.weight
        width = qkv.shape[1]
        blocks.append((qkv[:width], qkv[width:2 * width], qkv[2 * width:], layer.self_attn.projection.weight))
    return VisionAttention(blocks, vision.config.num_attention_heads, vision.embeddings.position_embedding[0, 1:])


def vit_attention(vision: nn.Module) -> VisionAttention:
    """transformers' ViT: q/k/v/o projections per block; CLS position first."""
    blocks = [(layer.attention.q_proj.weight, layer.attention.k_proj.weight, layer.attention.v_proj.weight,
               layer.attention.o_proj.weight) for layer in vision.layers]
    return VisionAttention(blocks, vision.config.num_attention_heads, vision.embeddings.position_embeddings[0, 1:])


def clip_vision_attention(tower: nn.Module) -> VisionAttention:
    """transformers' CLIP vision tower: q/k/v/out projections per block; CLS position first."""
    blocks = [(layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight,
               layer.self_attn.out_proj.weight) for layer in tower.get_submodule("encoder.layers")]
    return VisionAttention(blocks, tower.config.num_attention_heads,
                           tower.get_submodule("embeddings.position_embedding").weight[1:])


def clip_attention(visual: nn.Module) -> VisionAttention:
    """open_clip's VisionTransformer: `nn.MultiheadAttention` (fused in_proj) per block; CLS position first."""
    blocks = []
    for block in visual.transformer.resblocks:
        fused = block.attn.in_proj_weight
        width = fused.shape[1]
        blocks.append((fused[:width], fused[width:2 * width], fused[2 * width:], block.attn.out_proj.weight))
    return VisionAttention(blocks, visual.transformer.resblocks[0].attn.num_heads, visual.positional_embedding[1:])
