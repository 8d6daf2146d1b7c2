"""ClipCap (Mokady, Hertz & Bermano 2021, github.com/rmokady/CLIP_prefix_caption): CLIP's image embedding,
turned by a small mapping network into a prefix of GPT-2 input embeddings, after which GPT-2 writes the caption.

What differs from BLIP and ViT-GPT2 is handled here; everything else is the shared `Captioner` plumbing.
- No cross-attention: GPT-2 sees the image only through its prefix, so there is no cross-attention map
  (`no_cross_attention` says so in its place); Grad-CAM, saliency and occlusion work as for the others.
- Two kinds of image encoder, open_clip's image towers: a ViT (Grad-CAM on a block's patch tokens) or the
  ModifiedResNet of the RN50x4 CLIP (Grad-CAM on a residual stage's feature maps — classic convolutional
  Grad-CAM — by default the last stage, the one the attention pool reads). A ViT's last block is not offered:
  CLIP's embedding is that block's CLS token alone, so its patch tokens never reach the caption and their
  gradient is exactly zero; the default is the block before, whose patch tokens the last block attends to.
- The sequence: position 0 of a caption's token ids stands for the image prefix (GPT-2's <|endoftext|> as a
  placeholder, never fed to GPT-2), so that, as for every captioner, logits row t−1 predicts token t — row 0
  is the output at the prefix's last embedding. A caption ends after its first full stop, as ClipCap's own
  decoding does (it was trained on captions ending in "."), or at <|endoftext|>.
- Preprocessing: CLIP's mean, std and interpolation, but the image is squashed to the input size instead of
  centre-cropped, so that the maps cover the whole image (as for the other captioners and CLIP grounding).
- Checkpoints: the original repository's state dict — `clip_project.*`, the mapping network (its MLP or its
  transformer), and `gpt.*`, GPT-2's weights — in a .pt (as it saves them) or .safetensors file. What the
  file does not say (the CLIP model, GPT-2's config and tokenizer, the mapping's shape) comes from a JSON file
  next to it, `ClipCapConfig`; without one, the original repository's released MLP models are assumed.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.image_utils import PILImageResampling

from ..errors import ModelUnavailableError
from ..grounding.clip import load_open_clip, register_config
from ..hub import download_fix, require_hub
from .base import Captioner
from .gpt2 import END_OF_TEXT, Gpt2Words, tiny_tokenizer

#: What `load` accepts as a checkpoint file; a folder holding `CHECKPOINT` (what `save_pretrained` writes) works too.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")
CHECKPOINT = "clipcap.pt"
#: The friendly name "clipcap": the original COCO model (MLP mapping, ViT-B/32 CLIP), which its README links
#: as `coco_weights.pt`, in the project's models folder.
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "clipcap" / "coco_weights.pt"
#: The full stop that ends a ClipCap caption.
FULL_STOP = "."
#: Causal-mask buffers that GPT-2 kept in its state dict in the transformers versions ClipCap was trained
#: with; today's GPT-2 computes the mask instead, so they are skipped when loading.
LEGACY_GPT2_BUFFERS = re.compile(r"gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)")
#: The heads of ClipCap's transformer mapping network (fixed in the original, so not in the JSON).
MAPPER_HEADS = 8

#: Tiny open_clip image towers for tests and --tiny, registered with open_clip under these names: a ViT with
#: an 8×8 patch grid like the other tiny captioners (3 blocks, so Grad-CAM has two), and a ResNet whose last
#: stage has 4×4 feature maps. The text towers are as small as open_clip allows: they are built and dropped.
TINY_TEXT = {"context_length": 8, "vocab_size": 64, "width": 8, "heads": 2, "layers": 1}
TINY_CLIPS = {
    "vit": ("ipag-tiny-clipcap-vit", {"embed_dim": 32, "text_cfg": TINY_TEXT, "vision_cfg": {
        "image_size": 64, "layers": 3, "width": 32, "head_width": 8, "patch_size": 8}}),
    "resnet": ("ipag-tiny-clipcap-rn", {"embed_dim": 32, "text_cfg": TINY_TEXT, "vision_cfg": {
        "image_size": 128, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}}),
}


@dataclass(frozen=True)
class ClipCapConfig:
    """What a ClipCap checkpoint does not say about itself, read from `NAME.json` next to `NAME.pt` (every field
    is optional). The defaults describe the original repository's released MLP models (COCO, Conceptual
    Captions); its transformer COCO model is {"clip": "RN50x4/openai", "mapping": "transformer",
    "prefix_length": 40, "clip_length": 40, "normalize_prefix": true}. Field names follow its train.py options."""

    #: open_clip "architecture/pretrained": a pretrained tag, or a checkpoint file (relative to the JSON file).
    clip: str = "ViT-B-32/openai"
    #: GPT-2's config and tokenizer (its weights are in the checkpoint): a hub id, or a folder (relative to the
    #: JSON file).
    gpt2: str = "gpt2"
    mapping: Literal["mlp", "transformer"] = "mlp"
    prefix_length: int = 10  #: GPT-2 embeddings the image becomes
    clip_length: int = 10  #: transformer mapping: tokens the CLIP embedding is split into (--prefix_length_clip)
    num_layers: int = 8  #: transformer mapping: its layers
    normalize_prefix: bool = False  #: divide the CLIP embedding by its norm first (trained with --normalize_prefix)

    def __post_init__(self) -> None:
        if self.mapping not in ("mlp", "transformer"):
            raise ValueError(f"mapping must be 'mlp' or 'transformer', got {self.mapping!r}.")
        for name in ("prefix_length", "clip_length", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}.")

    @property
    def architecture(self) -> str:
        """The open_clip architecture name, e.g. ViT-B-32."""
        return self.clip.partition("/")[0]

    @classmethod
    def read(cls, path: Path) -> "ClipCapConfig":
        """The config a JSON file describes; a malformed one is refused with the file named."""
        known = {field.name for field in fields(cls)}
        try:
            values = json.loads(path.read_text())
            if not isinstance(values, dict):
                raise ValueError("it is not a JSON object")
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
            return cls(**values)
        except (OSError, ValueError, TypeError) as err:
            raise ModelUnavailableError(f"The ClipCap config {path} cannot be used: {err}. "
                                        f"Example: {json.dumps(asdict(cls()))}") from err

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


class MlpMapper(nn.Module):
    """ClipCap's MLP mapping network: Linear → tanh → Linear from the CLIP embedding to `prefix_length` GPT-2
    embeddings, its hidden width half the output's (parameters `model.0.*` and `model.2.*`, as the original's)."""

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        out = embed_dim * prefix_length
        self.model = nn.Sequential(nn.Linear(clip_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.model(embedding).view(embedding.shape[0], self.prefix_length, -1)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapping network: the CLIP embedding, linearly made into `clip_length` tokens, followed
    by `prefix_length` learnt constants (`prefix_const`), through a transformer; the constants' outputs are the
    prefix. Parameter names and maths are the original's."""

    def __init__(self, clip_dim: int, embed_dim: int, prefix_length: int, clip_length: int, num_layers: int) -> None:
        super().__init__()
        self.clip_length = clip_length
        self.linear = nn.Linear(clip_dim, clip_length * embed_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, embed_dim))
        self.transformer = _MapperLayers(embed_dim, num_layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(embedding).view(embedding.shape[0], self.clip_length, -1)
        constants = self.prefix_const.expand(embedding.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat([tokens, constants], dim=1))[:, self.clip_length:]


class _MapperLayers(nn.Module):
    """The mapping transformer's stack of pre-norm blocks (`layers.N.*`)."""

    def __init__(self, width: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_MapperBlock(width) for _ in range(num_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens)
        return tokens


class _MapperBlock(nn.Module):
    """x + attention(norm1(x)), then + MLP(norm2(x)) with a ReLU MLP twice as wide (the original's mlp_ratio 2)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _MapperAttention(width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _MapperMlp(width, 2 * width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class _MapperAttention(nn.Module):
    """Self-attention with `MAPPER_HEADS` heads; queries and keys/values (one projection, keys first) without
    bias, the output projection with bias — the original's parameter layout."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.to_queries = nn.Linear(width, width, bias=False)
        self.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.project = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, width = tokens.shape
        heads = (batch, length, MAPPER_HEADS, width // MAPPER_HEADS)
        queries = self.to_queries(tokens).view(heads)
        keys, values = self.to_keys_values(tokens).view(batch, length, 2, *heads[2:]).unbind(dim=2)
        mixed = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (queries, keys, values)))
        return self.project(mixed.transpose(1, 2).reshape(batch, length, width))


class _MapperMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(tokens)))


class ClipCapModel(nn.Module):
    """The whole captioner as one module: `visual` (an open_clip image tower) → `clip_project` (the mapping
    network) → `gpt` (GPT-2). Its state dict is ClipCap's layout plus `visual.*`."""

    def __init__(self, visual: nn.Module, gpt: GPT2LMHeadModel, config: ClipCapConfig) -> None:
        super().__init__()
        self.visual = visual
        embed_dim = gpt.config.n_embd
        self.clip_project = (
            MlpMapper(visual.output_dim, embed_dim, config.prefix_length) if config.mapping == "mlp" else
            TransformerMapper(visual.output_dim, embed_dim, config.prefix_length, config.clip_length,
                              config.num_layers))
        self.gpt = gpt
        self.normalize_prefix = config.normalize_prefix

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt.dtype

    def prefix(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The GPT-2 input embeddings (B, prefix_length, E) that stand for the images."""
        embedding = self.visual(pixel_values)
        if self.normalize_prefix:
            embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return self.clip_project(embedding)

    def forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T) whose position 0 is the prefix's placeholder: row t−1 predicts
        token t, row 0 being GPT-2's output at the prefix's last embedding."""
        prefix = self.prefix(pixel_values)
        text = self.gpt.transformer.wte(token_ids[:, 1:])
        logits = self.gpt(inputs_embeds=torch.cat([prefix, text], dim=1)).logits
        return logits[:, prefix.shape[1] - 1:]

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The state dict in ClipCap's layout (`clip_project.*` and `gpt.*`), as its training script saves it."""
        return {key: value for key, value in self.state_dict().items() if key.startswith(("clip_project.", "gpt."))}

    def load_checkpoint(self, state: dict[str, torch.Tensor], file: Path, config: ClipCapConfig,
                        config_file: Path) -> None:
        """Load ClipCap's weights from `state` (read from `file`), or say exactly how they do not fit."""
        problems = self._layout_problems(state)
        if problems:
            source = f"as {config_file} describes it" if config_file.is_file() else f"without {config_file}"
            raise ModelUnavailableError(
                f"{file} does not match the ClipCap checkpoint layout expected {source} — {self.describe(config)}. "
                f"Its keys: {'; '.join(problems)}. A ClipCap checkpoint is the state dict of the original "
                "repository (github.com/rmokady/CLIP_prefix_caption): clip_project.* (the mapping network) and "
                f"gpt.* (GPT-2). Fix: describe how it was trained in {config_file} (assumed here: "
                f"{json.dumps(asdict(config))}).")
        self.load_state_dict({key: value for key, value in state.items() if key in self.checkpoint()}, strict=False)

    def _layout_problems(self, state: dict[str, torch.Tensor]) -> list[str]:
        """How `state` differs from `checkpoint()`'s keys and shapes: missing, unexpected, wrongly shaped keys."""
        expected = self.checkpoint()
        tied = {"gpt.lm_head.weight"} if self.gpt.config.tie_word_embeddings else set()  # the same tensor as wte
        found = {
            "missing": sorted(set(expected) - set(state) - tied),
            "unexpected": sorted(key for key in set(state) - set(expected) if not LEGACY_GPT2_BUFFERS.fullmatch(key)),
            "with the wrong shape": [f"{key} {tuple(state[key].shape)} instead of {tuple(value.shape)}"
                                     for key, value in expected.items()
                                     if key in state and state[key].shape != value.shape],
        }
        return [f"{len(keys)} {what}: {', '.join(keys[:4])}{', …' if len(keys) > 4 else ''}"
                for what, keys in found.items() if keys]

    def describe(self, config: ClipCapConfig) -> str:
        """The architecture in words, for error messages."""
        gpt = self.gpt.config
        mapping = ("an MLP" if config.mapping == "mlp"
                   else f"a {config.num_layers}-layer transformer (clip_length {config.clip_length})")
        return (f"{mapping} mapping from CLIP {config.clip}'s {self.visual.output_dim}-d embedding to "
                f"{config.prefix_length} GPT-2 embeddings of {gpt.n_embd} ({config.gpt2}: {gpt.n_layer} layers, "
                f"vocabulary {gpt.vocab_size})")


class ClipCapCaptioner(Gpt2Words, Captioner):
    """ClipCap: an open_clip image tower, ClipCap's mapping network and GPT-2 (see the module docstring)."""

    name = "clipcap"
    title = "ClipCap"
    models = {"clipcap": str(DEFAULT_CHECKPOINT)}
    no_cross_attention = "ClipCap feeds the image to GPT-2 as a prefix"

    def __init__(self, model: ClipCapModel, image_processor: CLIPImageProcessor, tokenizer: PreTrainedTokenizerBase,
                 config: ClipCapConfig, device: torch.device, model_id: str) -> None:
        super().__init__(model, image_processor, device, model_id)
        self.tokenizer = tokenizer
        self.config = config
        self._end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        self._stop = tokenizer.convert_tokens_to_ids(FULL_STOP)
        generation = model.gpt.generation_config
        generation.eos_token_id, generation.pad_token_id = [self._stop, self._end], self._end
        # A caption has a word before its full stop: an empty caption has nothing to explain.
        generation.min_new_tokens = 1

    @classmethod
    def handles(cls, model_id: str) -> bool:
        return is_clipcap_checkpoint(model_id)

    @classmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "ClipCapCaptioner":
        """Load a checkpoint file in ClipCap's layout (or a folder `save_pretrained` wrote), with `ClipCapConfig`
        from the JSON file of the same name next to it. GPT-2's config and tokenizer and the CLIP weights are
        found locally or in the caches, else downloaded (unless `local_files_only`)."""
        file = Path(model_id).expanduser()
        file = file / CHECKPOINT if file.is_dir() else file
        if not file.is_file():
            raise ModelUnavailableError(
                f"No ClipCap checkpoint at {file}. Fix: download a checkpoint of the original repository (its README "
                f"links the COCO model, coco_weights.pt, which --captioner clipcap expects at {DEFAULT_CHECKPOINT}) "
                "and pass its path, with a JSON file of the same name next to it when it is not that MLP model "
                "(see the README); or try the app offline with --tiny.")
        config_file = file.with_suffix(".json")
        config = ClipCapConfig.read(config_file) if config_file.is_file() else ClipCapConfig()
        state = _state_dict(file)
        visual = _image_tower(config.clip, file.parent, local_files_only)
        gpt_config, tokenizer = _decoder(config.gpt2, file.parent, local_files_only)
        model = ClipCapModel(visual, GPT2LMHeadModel(gpt_config), config)
        model.load_checkpoint(state, file, config, config_file)
        return cls(model, _image_processor(visual), tokenizer, config, device, str(model_id))

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device = torch.device("cpu"),
             encoder: Literal["vit", "resnet"] = "vit",
             mapping: Literal["mlp", "transformer"] = "mlp") -> "ClipCapCaptioner":
        """A randomly initialised ClipCap with a tiny open_clip ViT or ResNet (`TINY_CLIPS`), either mapping
        network (a 4-embedding prefix) and a tiny GPT-2 with the ~180-token byte-level BPE of the tiny ViT-GPT2.

        GPT-2's `initializer_range=0.2` (not transformers' 0.02) and He init of the ResNet (`_he_init`) make the
        caption really depend on the image, so gradient tests cannot pass vacuously (see DESIGN.md). The global
        random state is left untouched.
        """
        architecture, clip_config = TINY_CLIPS[encoder]
        register_config(architecture, clip_config)
        tokenizer = tiny_tokenizer()
        end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        gpt_config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                initializer_range=0.2, bos_token_id=end, eos_token_id=end, pad_token_id=end)
        config = ClipCapConfig(clip=architecture, gpt2="tiny", mapping=mapping, prefix_length=4, clip_length=4,
                               num_layers=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            visual = load_open_clip(architecture, None)[0].visual
            if isinstance(visual, ModifiedResNet):
                _he_init(visual)
            model = ClipCapModel(visual, GPT2LMHeadModel(gpt_config), config)
        return cls(model, _image_processor(visual), tokenizer, config, device,
                   f"tiny-clipcap-{encoder}-{mapping}(seed={seed})")

    def save_pretrained(self, folder: str | Path) -> None:
        """Write what `load(folder)` needs to restore exactly this captioner offline: the checkpoint in ClipCap's
        layout (`clipcap.pt`), the image tower's weights, GPT-2's config and tokenizer, and `clipcap.json`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.checkpoint(), folder / CHECKPOINT)
        weights = {f"visual.{key}": value.contiguous() for key, value in self.model.visual.state_dict().items()}
        save_file(weights, folder / "clip_visual.safetensors")
        self.model.gpt.config.save_pretrained(folder / "decoder")
        self.tokenizer.save_pretrained(folder / "decoder")
        config = replace(self.config, clip=f"{self.config.architecture}/clip_visual.safetensors", gpt2="decoder")
        config.write((folder / CHECKPOINT).with_suffix(".json"))

    @property
    def generator(self) -> nn.Module:
        return self.model.gpt

    @property
    def vision_layers(self) -> list[nn.Module]:
        visual = self.model.visual
        if isinstance(visual, ModifiedResNet):
            return [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        blocks = list(visual.transformer.resblocks)
        # With CLIP's CLS-token pooling the last block's patch tokens are unused (see the module docstring).
        return blocks[:-1] if visual.pool_type == "tok" and visual.attn_pool is None else blocks

    @property
    def num_decoder_layers(self) -> int:
        return 0

    def vision_grid(self, output: torch.Tensor) -> torch.Tensor:
        """A ResNet stage's feature maps (B, C, h, w) are a grid already; ViT tokens are (L, B, D) when open_clip
        runs its transformer sequence-first, else (B, L, D) as the shared ViT case expects."""
        if isinstance(self.model.visual, ModifiedResNet):
            return output
        return super().vision_grid(output if self.model.visual.transformer.batch_first else output.transpose(0, 1))

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        prefix = self.model.prefix(pixel_values)
        return {"inputs_embeds": prefix,
                "attention_mask": torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)}

    def _caption_end(self, sequence: list[int]) -> int:
        """After the first full stop (part of the caption, as ClipCap writes it), or at <|endoftext|> (the end
        token, or a finished beam's padding)."""
        for index, token in enumerate(sequence[1:], start=1):
            if token == self._stop:
                return index + 1
            if token == self._end:
                return index
        return len(sequence)

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        return self.model(pixel_values, token_ids), None

    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        return [self._end]


def is_clipcap_checkpoint(model_id: str) -> bool:
    """Whether `load_captioner` should hand `model_id` to ClipCap: a checkpoint file by its suffix, or a folder
    that `ClipCapCaptioner.save_pretrained` wrote."""
    path = Path(model_id).expanduser()
    return path.suffix in CHECKPOINT_SUFFIXES or (path / CHECKPOINT).is_file()


def _state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or of a state dict saved with `torch.save` (read without unpickling
    anything but tensors)."""
    what = "A checkpoint is a dict of tensors, saved with torch.save(model.state_dict()) or as .safetensors."
    try:
        state = (load_file(file) if file.suffix == ".safetensors"
                 else torch.load(file, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise ModelUnavailableError(f"{file} could not be read ({type(err).__name__}: {err}). {what}") from err
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ModelUnavailableError(f"{file} holds a {type(state).__name__}, not a state dict. {what}")
    return state


def _image_tower(spec: str, base: Path, local_files_only: bool) -> nn.Module:
    """The image tower of the open_clip model `spec` ("architecture/pretrained tag or file")."""
    architecture, _, pretrained = spec.partition("/")
    if not pretrained:
        raise ModelUnavailableError(f"The ClipCap config names the CLIP model '{spec}' without weights: write "
                                    "'architecture/pretrained', e.g. 'ViT-B-32/openai' or 'RN50x4/openai'.")
    for name, clip_config in TINY_CLIPS.values():  # a saved tiny captioner names its tiny architecture
        register_config(name, clip_config)
    file = base / pretrained
    if file.is_file():
        visual = load_open_clip(architecture, None)[0].visual
        weights = {key.removeprefix("visual."): value for key, value in _state_dict(file).items()
                   if key.startswith("visual.")}
        try:
            visual.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelUnavailableError(f"{file} holds no weights for the image tower of open_clip's "
                                        f"'{architecture}' ({str(err).splitlines()[0]}).") from err
    else:
        visual = load_open_clip(architecture, pretrained, local_files_only)[0].visual
    if not isinstance(visual, (VisionTransformer, ModifiedResNet)):
        raise ModelUnavailableError(f"ClipCap is explained with open_clip's ViT or ModifiedResNet image towers "
                                    f"(ViT-B-32, RN50x4, …); '{architecture}' has a {type(visual).__name__}.")
    return visual


def _decoder(name: str, base: Path, local_files_only: bool) -> tuple[GPT2Config, PreTrainedTokenizerBase]:
    """GPT-2's config and tokenizer from a folder (relative to `base`) or the hub (cached, else downloaded)."""
    folder = base / name
    source = str(folder) if folder.is_dir() else name
    what = f"GPT-2's config and tokenizer '{name}' (for ClipCap)"
    try:
        return _gpt2(source, local_files_only=True)
    except (OSError, ValueError) as err:
        if local_files_only or folder.is_dir():
            raise ModelUnavailableError(f"{what} could not be loaded ({err}). Fix: {download_fix(name)}") from err
    require_hub(what, download_fix(name))
    try:
        return _gpt2(source, local_files_only=False)
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(f"{what} could not be loaded ({err}). Fix: {download_fix(name)}") from err


def _gpt2(source: str, local_files_only: bool) -> tuple[GPT2Config, PreTrainedTokenizerBase]:
    return (GPT2Config.from_pretrained(source, local_files_only=local_files_only),
            AutoTokenizer.from_pretrained(source, local_files_only=local_files_only))


def _he_init(resnet: ModifiedResNet) -> None:
    """Re-initialise a random ResNet tower so that its embedding depends on the image. open_clip's init (PyTorch's
    default for convolutions, every block's last BatchNorm scale zeroed, as for training from scratch) shrinks
    activations ~2.5× per layer, leaving a random tower's embedding almost constant (cosine ≈ 1 between
    different images); He init with unit BatchNorm scales keeps them of order one, as a trained tower's are."""
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)


def _image_processor(visual: nn.Module) -> CLIPImageProcessor:
    """CLIP's preprocessing for this image tower (mean, std, interpolation), squashing instead of cropping."""
    config = visual.preprocess_cfg
    size = config["size"]
    height, width = (size, size) if isinstance(size, int) else size
    return CLIPImageProcessor(size={"height": height, "width": width}, do_center_crop=False,
                              resample=PILImageResampling[config["interpolation"].upper()],
                              image_mean=list(config["mean"]), image_std=list(config["std"]))
