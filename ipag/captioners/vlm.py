"""Vision-language models (transformers' image-text-to-text models) through one adapter, chosen by `model_type`.

A vision-language model captions by answering an instruction about the image: its processor writes the prompt
(the chat template around the instruction, with the image's placeholder tokens expanded to one per image token)
and the model continues it. Here the prompt is a caption's `start_ids`, so every teacher-forced computation sees
exactly what generation saw, and only the answer's words are clickable (the prompt's tokens are "special" pieces).

The families explained are the decoder-only ones (`FAMILIES`): LLaVA 1.5, PaliGemma and Gemma 3, whose image tokens
are one grid over one squashed input; LLaVA-NeXT and LLaVA-OneVision (a thumbnail and any-resolution tiles), Idefics3
and SmolVLM (whole tiles and a thumbnail, pixel-shuffled), Qwen2-VL and Qwen2.5-VL (merged patches at a resolution
chosen per photo, 3-D rotary positions from `image_grid_thw`). The captioner's pixel input is always one normalised
canvas, the photo squashed to the size its processor would choose; `ipag.captioners.canvas` turns it into each
family's inputs differentiably and says where each token lies on it. Every family has the vision tower's tokens
(Grad-CAM at the block the projector reads), the language model's self-attention from the word's rows to the image
tokens (its "attention to the image", every layer available) and relevancy with Chefer et al.'s self-attention
rules; LeGrad needs one input's vision attention, which the tiled families and Qwen's windowed tower do not give.
Because the image-token count depends on the canvas, so does the prompt: prompts are made per instruction and canvas
size, and a caption's canvas is read back from the prompt it begins with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Literal

import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from ..errors import ModelUnavailableError
from ..layout import Layout
from .base import Attentions, Captioner, Piece, capture_output, is_punctuation
from .canvas import AnyResolution, Canvas, Patches, Tiles

#: What a vision-language model is asked when the user asks nothing else.
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
#: What a prompt is made for: an instruction (None: the default) and a canvas size (height, width).
PromptKey = tuple[str | None, tuple[int, int]]
#: The photo size whose canvas `start_ids` asks about when it is given no canvas: a square.
SQUARE = (64, 64)
#: Memory a CPU run needs per weight beyond the weight itself (activations, the backward pass's graph).
MEMORY_OVERHEAD = 1.3
#: Models of at least this many weights recompute their language model's activations in the backward pass
#: (`Captioner.gradient_checkpointing`): their activations, not their weights, would otherwise bound what fits.
CHECKPOINT_FROM = 1_000_000_000


@dataclass(frozen=True)
class Family:
    """How one decoder-only family is run. `canvas`: how it sees the photo (`ipag.captioners.canvas`).
    `vision_blocks`: its vision tower's blocks, under the model's `model`. `token_types`: what the model's token
    types mark — nothing, the image tokens (Gemma 3 attends to them bidirectionally; Qwen gives them 3-D rotary
    positions) or the answer (PaliGemma: the prompt is its bidirectional prefix, the answer its causal suffix) —
    and `types_argument` the keyword it takes them by."""

    canvas: type[Canvas] = Canvas
    vision_blocks: str = "vision_tower.encoder.layers"
    token_types: Literal["none", "image", "answer"] = "none"
    types_argument: str = "token_type_ids"


_QWEN = Family(Patches, "visual.blocks", "image", "mm_token_type_ids")
_IDEFICS = Family(Tiles, "vision_model.encoder.layers")
#: The families this adapter runs, by `config.model_type`.
FAMILIES = {"llava": Family(), "paligemma": Family(token_types="answer"), "gemma3": Family(token_types="image"),
            "llava_next": Family(AnyResolution), "llava_onevision": Family(AnyResolution), "qwen2_vl": _QWEN,
            "qwen2_5_vl": _QWEN, "idefics3": _IDEFICS, "smolvlm": _IDEFICS}


class VlmCaptioner(Captioner):
    """A decoder-only vision-language model: vision tower → projector → image tokens among the prompt's text."""

    name = "vlm"
    model_types = tuple(FAMILIES)
    neutral_prompt = "a picture of"
    #: What the model is asked when the user asks nothing else (`start_ids`).
    default_instruction: ClassVar[str] = DEFAULT_INSTRUCTION
    #: Which of `tiny_vlms.TINY_KINDS` `tiny` builds.
    tiny_kind: ClassVar[str] = "llava"

    def __init__(self, model: nn.Module, processor: ProcessorMixin, device: torch.device, model_id: str) -> None:
        if model.config.text_config._attn_implementation != "eager":
            raise ValueError("VlmCaptioner needs eager attention: other implementations return no attention "
                             "probabilities. Load with attn_implementation='eager'.")
        super().__init__(model, processor.image_processor, device, model_id)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Classes built on this one for other families (`model_types`) run theirs as one squashed input, without
        # token types.
        self.family = FAMILIES.get(model.config.model_type, Family())
        self.canvas = self.family.canvas(model, processor.image_processor)
        self._image_token = model.config.image_token_id
        self._end = _ids(model.generation_config.eos_token_id)
        #: The prompts made so far, by instruction and canvas size: a caption's answer starts after the one it
        #: begins with, and its image tokens lie on that canvas.
        self._prompts: dict[PromptKey, list[int]] = {}
        self._anchor = self.tokenizer("a", add_special_tokens=False).input_ids
        #: Tokens a caption never holds: the tokenizer's added markers (image placeholders, which would ask for a
        #: second image's features; PaliGemma's location tokens; chat markers), its end aside. Random models write them.
        self._suppressed = sorted(set(self.tokenizer.added_tokens_decoder) - self._end)

    @classmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "VlmCaptioner":
        """Load a model and its processor; on CPU a model that would not fit in memory is refused first."""
        offline = {"local_files_only": local_files_only}
        config = AutoConfig.from_pretrained(model_id, **offline)
        if config.model_type not in cls.model_types:
            raise ModelUnavailableError(f"'{model_id}' is a '{config.model_type}' model; the {cls.__name__} "
                                        f"adapter explains these model types: {', '.join(cls.model_types)}.")
        weights = weight_count(model_id, local_files_only)
        if device.type == "cpu":
            refuse_if_too_big(model_id, weights)
        # On GPUs: bfloat16 weights (half the memory; the forward's autocast is then a no-op), spread over every GPU
        # (and the CPU) by accelerate's `device_map` when one does not hold them. float32 on CPU.
        on_gpu = device.type == "cuda"
        placement = {"dtype": torch.bfloat16, "device_map": "auto"} if on_gpu else {"dtype": torch.float32}
        # Every map reads the language model's attention probabilities (eager attention returns them); of the vision
        # tower's, only LeGrad, which the families without it (`Canvas.no_vision_attention`) do not have: their tower
        # keeps the faster attention that returns none.
        attention = ({"": "eager", "text_config": "eager", "vision_config": "sdpa"}
                     if FAMILIES.get(config.model_type, Family()).canvas.no_vision_attention else "eager")
        model = AutoModelForImageTextToText.from_pretrained(model_id, attn_implementation=attention, **placement,
                                                            **offline)
        captioner = cls(model, AutoProcessor.from_pretrained(model_id, **offline), device, model_id)
        captioner.gradient_checkpointing = weights is not None and weights >= CHECKPOINT_FROM
        return captioner

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device = torch.device("cpu")) -> "VlmCaptioner":
        """A tiny random model of the family `tiny_kind`, written and loaded back as a download would be."""
        import tempfile

        from .tiny_vlms import save_tiny

        with tempfile.TemporaryDirectory() as folder:
            return cls.load(str(save_tiny(cls.tiny_kind, folder, seed)), device, local_files_only=True)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model and processor so that `load(folder)` restores exactly this captioner."""
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    # --- the model's parts ---------------------------------------------------------------------------------

    @property
    def vision_layers(self) -> list[nn.Module]:
        """The vision tower's blocks up to the one whose output the projector reads (later ones get no gradient)."""
        layers = list(self.model.model.get_submodule(self.family.vision_blocks))
        read = getattr(self.model.config, "vision_feature_layer", -1)
        read = max(read) if isinstance(read, Sequence) else read
        # `read` indexes the tower's hidden states, whose first is the embeddings' output.
        return layers[: read % (len(layers) + 1)] if read != -1 else layers

    @property
    def checkpointed_layers(self) -> list[nn.Module]:
        """The language model's decoder layers: most of a vision-language model's weights and activations."""
        return list(self.model.get_decoder().layers)

    @property
    def num_decoder_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def attention_name(self, layer: int) -> str:
        return f"language model layer {layer} attention to the image tokens"

    @property
    def short_name(self) -> str:
        """Its `title`, else the family as transformers names its model class ("Llava", "PaliGemma", "Gemma3"): the
        page's sentences say “Llava is 15% sure of …”, not the adapter's registry name."""
        return self.title or type(self.model).__name__.removesuffix("ForConditionalGeneration")

    def vision_grid(self, output: torch.Tensor) -> torch.Tensor:
        return self.canvas.vision_grid(output)

    def vision_layout(self, pixel_values: torch.Tensor, index: int, grid: tuple[int, int]) -> Layout:
        return self.canvas.vision_layout(tuple(pixel_values.shape[-2:]), grid)

    def attention_layout(self, token_ids: Sequence[int], keys: int, grid: tuple[int, int]) -> Layout:
        """The image tokens of the prompt `token_ids` begins with, on the canvas that prompt was made for."""
        ids = list(token_ids)
        made = self._prompt_of(ids)
        if made is None:
            raise ValueError("These tokens do not begin with a prompt this captioner made, so where their image tokens "
                             "lie is unknown: make it with `start_ids(pixel_values, instruction)` first.")
        (_, size), _ = made
        return self.canvas.image_layout(ids, size)

    def unavailable_map(self, key: str) -> str | None:
        return self.canvas.no_vision_attention if key == "legrad" else None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The canvas: the photo squashed (bicubic) to the size the family's processor would choose for it, then
        normalised by the processor. The model sees the whole photo (LLaVA's processor would crop its sides off, and
        the any-resolution ones pad it, so a word about them could not be explained), and every map goes back onto
        the photo by stretching (`images.resize_map`), the exact inverse."""
        rgb = image.convert("RGB")
        height, width = self.canvas.size(rgb.height, rgb.width)
        squashed = pil_to_tensor(rgb.resize((width, height), Image.BICUBIC))[None]
        return self.canvas.normalise(squashed).to(self.device, dtype=self.model.dtype)

    # --- prompts and answers -------------------------------------------------------------------------------

    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        """The prompt asking `instruction` (None or empty: `default_instruction`) about the canvas `pixel_values`,
        whose size sets the image-token count of the any-resolution families (None: the canvas of a square photo)."""
        size = self.canvas.size(*SQUARE) if pixel_values is None else tuple(pixel_values.shape[-2:])
        key = (instruction, size)
        if key not in self._prompts:
            self._prompts[key] = self._prompt_ids(instruction or self.default_instruction, size)
        return list(self._prompts[key])

    @cached_property
    def takes_instruction(self) -> bool:
        """Whether the prompt carries an instruction at all: a chat template may leave the text out (the synthetic
        LLaVA, trained on captions alone, is prompted with its image tokens only), and then none is offered."""
        if self.default_instruction is None or not self.processor.chat_template:
            return self.default_instruction is not None
        size = self.canvas.size(*SQUARE)
        return self._prompt_ids("a", size) != self._prompt_ids("b", size)

    def _prompt_ids(self, instruction: str, size: tuple[int, int]) -> list[int]:
        """The prompt's token ids for a canvas of `size`, made once per instruction and size (`start_ids` keeps them):
        the processor expands the image placeholder for a blank canvas of that size."""
        text = instruction
        if self.processor.chat_template:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True)
        else:  # PaliGemma: the processor writes image tokens, <bos>, the instruction and a newline
            text = self.processor.image_token + text
        return list(self.processor(images=Image.new("RGB", size[::-1]), text=text)["input_ids"][0])

    def answer_start(self, token_ids: Sequence[int]) -> int:
        """After the longest prompt made here that `token_ids` begins with; 0 for text without a prompt."""
        made = self._prompt_of(list(token_ids))
        return 0 if made is None else len(made[1])

    def _prompt_of(self, ids: list[int]) -> tuple[PromptKey, list[int]] | None:
        """The longest prompt made here that `ids` begins with, and what it was made for; None: none."""
        return max(((key, prompt) for key, prompt in self._prompts.items() if ids[:len(prompt)] == prompt),
                   key=lambda made: len(made[1]), default=None)

    def _caption_end(self, sequence: list[int]) -> int:
        start = self.answer_start(sequence)
        return next((i for i in range(start, len(sequence)) if sequence[i] in self._end), len(sequence))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as it reads after a previous word: tokenized after an anchor word, which is then
        dropped, so that SentencePiece's "▁word" and byte-level BPE's "Ġword" come out as inside a caption."""
        text = text.strip()
        if not text:
            return []
        ids = self.tokenizer(f"a {text}", add_special_tokens=False).input_ids
        return ids[len(self._anchor):] if ids[:len(self._anchor)] == self._anchor else \
            self.tokenizer(text, add_special_tokens=False).input_ids

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    def pieces(self, token_ids: list[int]) -> list[Piece]:
        """The prompt's tokens are special; each answer token's text is what it adds to the decoded answer, so
        any tokenizer's word starts (a leading space once decoded) are found the same way."""
        start = self.answer_start(token_ids)
        strings = self.token_strings(token_ids)
        pieces = [Piece(token, "special") for token in strings[:start]]
        special = set(self.tokenizer.all_special_ids)
        decoded = ""
        for index in range(start, len(token_ids)):
            if token_ids[index] in special:
                pieces.append(Piece(strings[index], "special"))
                continue
            text = self.tokenizer.decode(token_ids[start:index + 1])
            added, decoded = text[len(decoded):], text
            word = added.strip()
            if is_punctuation(word):
                pieces.append(Piece(word, "punct"))
            elif added[:1].isspace() or index == start or pieces[-1].kind in ("special", "punct"):
                pieces.append(Piece(word, "start"))
            else:
                pieces.append(Piece(word, "continue"))
        return pieces

    # --- passes --------------------------------------------------------------------------------------------

    def _inputs(self, token_ids: torch.Tensor) -> dict:
        """The language model's inputs besides the image for (B, T) ids: mask, and token types where it takes them."""
        inputs = {"input_ids": token_ids, "attention_mask": torch.ones_like(token_ids)}
        types = self.family.types_argument
        if self.family.token_types == "image":
            inputs[types] = (token_ids == self._image_token).long()
        elif self.family.token_types == "answer":
            start = self.answer_start(token_ids[0].tolist())
            positions = torch.arange(token_ids.shape[1], device=token_ids.device)
            inputs[types] = (positions >= start).long().expand_as(token_ids)
        return inputs

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        return {**self.canvas.pixel_inputs(pixel_values), "suppress_tokens": self._suppressed,
                **self._inputs(torch.tensor([start], device=self.device))}

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        out = self.model(**self.canvas.pixel_inputs(pixel_values), **self._inputs(token_ids), use_cache=False,
                         output_attentions=cross_attention_layer is not None, return_dict=True)
        return out.logits, None if cross_attention_layer is None else out.attentions[cross_attention_layer]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """Every language-model layer's self-attention (it holds the attention to the image), and the vision
        tower's blocks' up to the one the projector reads, caught as their attention modules return them (for
        families whose vision attention LeGrad can use, `Canvas.no_vision_attention`)."""
        blocks = [] if self.canvas.no_vision_attention else self.vision_layers
        with ExitStack() as stack:
            vision = [stack.enter_context(capture_output(block.self_attn, index=1)) for block in blocks]
            out = self.model(**self.canvas.pixel_inputs(pixel_values), **self._inputs(token_ids),
                             output_attentions=True, use_cache=False, return_dict=True)
        return out.logits, Attentions([captured[0] for captured in vision], list(out.attentions), [])


def _ids(value: int | Sequence[int] | None) -> set[int]:
    return set() if value is None else {value} if isinstance(value, int) else set(value)


# --- memory, before loading ------------------------------------------------------------------------------------

def weight_count(model_id: str, local_files_only: bool) -> int | None:
    """How many weights `model_id` has, from its safetensors headers (no weight is read); None when unknown."""
    from huggingface_hub import get_safetensors_metadata, snapshot_download
    from safetensors import safe_open

    folder = Path(model_id)
    if not folder.is_dir():
        try:
            folder = Path(snapshot_download(model_id, local_files_only=True, allow_patterns=["*.safetensors"]))
        except (OSError, ValueError):
            if local_files_only:
                return None
            try:
                metadata = get_safetensors_metadata(model_id)
            except (OSError, ValueError):
                return None
            return sum(metadata.parameter_count.values())
    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    count = 0
    for file in files:
        with safe_open(file, "pt") as weights:
            count += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return count


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (Linux's MemAvailable; else free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def refuse_if_too_big(model_id: str, weights: int | None, available: int | None = None) -> None:
    """Refuse, before loading, a model whose float32 weights and passes would not fit in the memory available (an
    out-of-memory kill would take the whole app down), saying what it needs and how to run it."""
    if weights is None:
        return
    needed = weights * 4 * MEMORY_OVERHEAD
    available = available_memory() if available is None else available
    if needed > available:
        raise ModelUnavailableError(
            f"'{model_id}' has {weights / 1e9:.1f} B weights: explaining it on the CPU needs about "
            f"{needed / 2**30:.1f} GiB of memory, and {available / 2**30:.1f} GiB is available. Fix: run on a GPU "
            "(--device cuda, where it loads in bfloat16), or choose a smaller model (e.g. one of under 1 B weights).")
