"""Vision-language models (transformers' image-text-to-text models) through one adapter, chosen by `model_type`.

A vision-language model captions by answering an instruction about the image: its processor writes the prompt
(the chat template around the instruction, with the image's placeholder tokens expanded to one per image token)
and the model continues it. Here the prompt is a caption's `start_ids`, so every teacher-forced computation sees
exactly what generation saw, and only the answer's words are clickable (the prompt's tokens are "special" pieces).

The families explained are the decoder-only ones whose image tokens form one fixed grid over one squashed or
centre-cropped input (`FAMILIES`): the vision tower's patches (Grad-CAM at the block the projector reads), the
language model's self-attention from the word's rows to the image tokens (its "attention to the image", every
layer available) and relevancy with Chefer et al.'s self-attention rules. Families whose input is cut into tiles
or resized per photo (LLaVA-NeXT / OneVision, Qwen2-VL, Idefics3 / SmolVLM) need per-image inputs besides the
pixels, which the captioner interface does not carry yet; they are refused with the list of what is supported.
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
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from ..errors import ModelUnavailableError
from ..layout import Layout
from .base import Attentions, Captioner, Piece, capture_output, is_punctuation

#: What a vision-language model is asked when the user asks nothing else.
DEFAULT_INSTRUCTION = "Describe this image in one sentence."
#: Memory a CPU run needs per weight beyond the weight itself (activations, the backward pass's graph).
MEMORY_OVERHEAD = 1.3


@dataclass(frozen=True)
class Family:
    """How one decoder-only family is run. `token_types`: what the model's `token_type_ids` mark — nothing,
    the image tokens (Gemma 3 attends to them bidirectionally) or the answer (PaliGemma: the prompt is its
    bidirectional prefix, the answer its causal suffix)."""

    token_types: Literal["none", "image", "answer"] = "none"


#: The families this adapter runs, by `config.model_type`.
FAMILIES = {"llava": Family(), "paligemma": Family("answer"), "gemma3": Family("image")}


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
        # Classes built on this one for other families (`model_types`) run theirs without token types.
        self.family = FAMILIES.get(model.config.model_type, Family())
        self._image_token = model.config.image_token_id
        self._end = _ids(model.generation_config.eos_token_id)
        #: The prompts made so far, by instruction: a caption's answer starts after the one it begins with.
        self._prompts: dict[str | None, list[int]] = {}
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
        if device.type == "cpu":
            refuse_if_too_big(model_id, weight_count(model_id, local_files_only))
        # bfloat16 weights on GPUs (half the memory; the forward's autocast is then a no-op), float32 on CPU.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForImageTextToText.from_pretrained(model_id, attn_implementation="eager", dtype=dtype,
                                                            **offline)
        return cls(model, AutoProcessor.from_pretrained(model_id, **offline), device, model_id)

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
        layers = list(self.model.model.vision_tower.get_submodule("encoder.layers"))
        read = getattr(self.model.config, "vision_feature_layer", -1)
        read = max(read) if isinstance(read, Sequence) else read
        # `read` indexes the tower's hidden states, whose first is the embeddings' output.
        return layers[: read % (len(layers) + 1)] if read != -1 else layers

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
        """ViT tokens as a grid, with or without a CLS token first (CLIP has one, SigLIP none)."""
        side = round(output.shape[1] ** 0.5)
        return output.transpose(1, 2).reshape(output.shape[0], -1, side, side) if side * side == output.shape[1] \
            else super().vision_grid(output)

    def attention_layout(self, token_ids: Sequence[int], keys: int, grid: tuple[int, int]) -> Layout:
        """The image tokens: one square grid over the input, from the first image placeholder on."""
        count = list(token_ids).count(self._image_token)
        side = round(count ** 0.5)
        return Layout.of_grid(side, side, first=list(token_ids).index(self._image_token))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The processor's input for the photo squashed to the model's input size first: the model sees the whole
        photo (LLaVA's processor would crop its sides off, so a word about them could not be explained), and
        every map goes back onto the photo by stretching (`images.resize_map`), the exact inverse."""
        return super().preprocess(image.convert("RGB").resize(self._input_size[::-1], Image.BICUBIC))

    @cached_property
    def _input_size(self) -> tuple[int, int]:
        """(height, width) of the processor's pixel input (the same for every photo in these families)."""
        pixels = self.image_processor(images=Image.new("RGB", (64, 64)), return_tensors="pt").pixel_values
        return tuple(pixels.shape[-2:])

    # --- prompts and answers -------------------------------------------------------------------------------

    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        """The prompt asking `instruction` (None or empty: `default_instruction`). These families' image token count
        does not depend on the photo, so one prompt serves every image."""
        if instruction not in self._prompts:
            self._prompts[instruction] = self._prompt_ids(instruction or self.default_instruction)
        return list(self._prompts[instruction])

    def _prompt_ids(self, instruction: str) -> list[int]:
        """The prompt's token ids, made once per instruction (`start_ids` keeps them)."""
        text = instruction
        if self.processor.chat_template:
            text = self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}],
                add_generation_prompt=True)
        else:  # PaliGemma: the processor writes image tokens, <bos>, the instruction and a newline
            text = self.processor.image_token + text
        return list(self.processor(images=Image.new("RGB", (64, 64)), text=text)["input_ids"][0])

    def answer_start(self, token_ids: Sequence[int]) -> int:
        """After the longest prompt made here that `token_ids` begins with; 0 for text without a prompt."""
        ids = list(token_ids)
        return max((len(p) for p in self._prompts.values() if ids[:len(p)] == p), default=0)

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
        if self.family.token_types == "image":
            inputs["token_type_ids"] = (token_ids == self._image_token).long()
        elif self.family.token_types == "answer":
            start = self.answer_start(token_ids[0].tolist())
            inputs["token_type_ids"] = (torch.arange(token_ids.shape[1], device=token_ids.device) >= start
                                        ).long().expand_as(token_ids)
        return inputs

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        return {"pixel_values": pixel_values, "suppress_tokens": self._suppressed,
                **self._inputs(torch.tensor([start], device=self.device))}

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        out = self.model(pixel_values=pixel_values, **self._inputs(token_ids),
                         output_attentions=cross_attention_layer is not None, return_dict=True)
        return out.logits, None if cross_attention_layer is None else out.attentions[cross_attention_layer]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """Every language-model layer's self-attention (it holds the attention to the image), and the vision
        tower's blocks' up to the one the projector reads, caught as their attention modules return them."""
        with ExitStack() as stack:
            vision = [stack.enter_context(capture_output(block.self_attn, index=1)) for block in self.vision_layers]
            out = self.model(pixel_values=pixel_values, **self._inputs(token_ids), output_attentions=True,
                             return_dict=True)
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
