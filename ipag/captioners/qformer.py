"""BLIP-2 and InstructBLIP: a ViT, a Q-Former whose learnt queries alone look at the image, and a language model
that reads the queries' outputs as image tokens (transformers 5 writes `num_query_tokens` image placeholders before
the prompt; the model puts the queries' projected outputs in their place).

The Q-Former's queries cross-attend to the ViT's tokens (its CLS token, then the square patch grid) and the
language model attends to the queries, so a word's "attention to the image" is that cross-attention reached
through the language model's attention from the word to the query tokens:
- cross-attention Grad-CAM takes a Q-Former cross-attention layer over every query, A ⊙ ReLU(∂target/∂A): the
  word's gradient, which flows back through the language model, makes it the word's (`DecoderPass.query_rows`);
- raw attention weighs each query's row of that layer by how much the word's rows of the language model attend to
  its image token (mean over heads and layers; `DecoderPass.query_weights`);
- Grad-CAM on the ViT's blocks (the Q-Former reads the last one's normalised output); LeGrad on their attention.
Transformer relevancy is not offered: Chefer et al.'s rules carry relevance through one transformer, or a decoder
and the encoder it cross-attends to; here it would have to go from the language model's query tokens back into the
Q-Former that made them (through a projection, and into a Q-Former that cross-attends only every few layers), which
the rules do not cover (`unavailable_map` says so in the map's place).

BLIP-2 captions with no text (as it was trained: the image tokens, then the start token); an instruction, when
asked, is its text prompt. InstructBLIP is asked `DEFAULT_INSTRUCTION`, which its Q-Former reads too, through its
own BERT tokenizer. Their language models here are decoder-only (OPT, Llama / Vicuna); the Flan-T5 checkpoints'
encoder–decoder language model is refused at loading.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from functools import cached_property

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, ProcessorMixin

from ..errors import ModelUnavailableError
from ..layout import Layout
from .base import Attentions, DecoderPass, capture_output
from .vlm import DEFAULT_INSTRUCTION, VlmCaptioner


class QFormerCaptioner(VlmCaptioner):
    """BLIP-2 or InstructBLIP with a decoder-only language model: ViT → Q-Former → language model."""

    name = "qformer"
    model_types = ("blip-2", "instructblip")
    tiny_kind = "blip2"

    def __init__(self, model: nn.Module, processor: ProcessorMixin, device: torch.device, model_id: str) -> None:
        super().__init__(model, processor, device, model_id)
        # BLIP-2's `generate` hands over to the language model's, whose defaults (its end token, its minimum length)
        # are its own config's, not the model's: it generates with the model's, which `_caption_end` ends captions by.
        self.model.language_model.generation_config = self.model.generation_config
        #: InstructBLIP's Q-Former ids of each instruction, by the language model's prompt for it.
        self._qformer_prompts: dict[tuple[int, ...], list[int]] = {}

    @classmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "QFormerCaptioner":
        """`VlmCaptioner.load`, after refusing an encoder–decoder language model (Flan-T5) from its config."""
        config = AutoConfig.from_pretrained(model_id, local_files_only=local_files_only)
        if config.model_type in cls.model_types and not config.use_decoder_only_language_model:
            raise ModelUnavailableError(
                f"'{model_id}' reads its queries with an encoder–decoder language model "
                f"({config.text_config.model_type}); the playground explains BLIP-2 and InstructBLIP with a "
                "decoder-only one (OPT, Llama, Vicuna).")
        return super().load(model_id, device, local_files_only)

    @property
    def default_instruction(self) -> str:
        """InstructBLIP is asked to describe the image; BLIP-2 captions from no text at all."""
        return DEFAULT_INSTRUCTION if self._reads_instruction else ""

    @property
    def _reads_instruction(self) -> bool:
        return self.model.config.model_type == "instructblip"

    @property
    def short_name(self) -> str:
        return "InstructBLIP" if self._reads_instruction else "BLIP-2"

    # --- the model's parts ---------------------------------------------------------------------------------

    @property
    def vision_layers(self) -> list[nn.Module]:
        """The ViT's blocks: the Q-Former reads the last one's output (after a layer norm)."""
        return list(self.model.vision_model.encoder.layers)

    @cached_property
    def _qformer_layers(self) -> list[int]:
        """Which Q-Former layers cross-attend to the image (every `cross_attention_frequency`-th)."""
        return [index for index, layer in enumerate(self.model.qformer.encoder.layer) if layer.has_cross_attention]

    @property
    def num_decoder_layers(self) -> int:
        return len(self._qformer_layers)

    def attention_name(self, layer: int) -> str:
        return f"Q-Former layer {self._qformer_layers[layer]} cross-attention"

    def _cross_attention(self, layer: int) -> nn.Module:
        return self.model.qformer.encoder.layer[self._qformer_layers[layer]].crossattention.attention

    def attention_layout(self, token_ids: Sequence[int], keys: int, grid: tuple[int, int]) -> Layout:
        """The cross-attention's keys are the ViT's tokens: its CLS token, then the square patch grid."""
        side = round((keys - 1) ** 0.5)
        return Layout.of_grid(side, side, first=keys - side * side)

    def unavailable_map(self, key: str) -> str | None:
        if key == "relevancy":
            return ("Transformer relevancy is not offered for BLIP-2: Chefer et al.'s rules carry relevance through "
                    "one transformer, or a decoder and the encoder it cross-attends to, not from a language model's "
                    "query tokens back into the Q-Former that made them. Cross-attention Grad-CAM, whose gradient "
                    "flows through both, is the nearest map.")
        return None

    # --- prompts -------------------------------------------------------------------------------------------

    def _prompt_ids(self, instruction: str, size: tuple[int, int]) -> list[int]:
        """The processor's prompt: the image placeholders, then the tokenized instruction; InstructBLIP's Q-Former
        reads the instruction too, so its ids are kept for every sequence that starts with this prompt."""
        encoded = self.processor(images=Image.new("RGB", size[::-1]), text=instruction)
        ids = list(encoded["input_ids"][0])
        if self._reads_instruction:
            self._qformer_prompts[tuple(ids)] = list(encoded["qformer_input_ids"][0])
        return ids

    # --- passes --------------------------------------------------------------------------------------------

    def _inputs(self, token_ids: torch.Tensor) -> dict:
        """The language model's ids and mask, and InstructBLIP's Q-Former ids of the instruction the sequence asks."""
        inputs = super()._inputs(token_ids)
        if self._reads_instruction:
            ids = token_ids[0].tolist()
            prompt = tuple(ids[:self.answer_start(ids)]) or tuple(self.start_ids())
            qformer = torch.tensor([self._qformer_prompts[prompt]], device=token_ids.device).expand(len(token_ids), -1)
            inputs |= {"qformer_input_ids": qformer, "qformer_attention_mask": torch.ones_like(qformer)}
        return inputs

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        with ExitStack() as stack:
            if cross_attention_layer is not None:
                captured = stack.enter_context(capture_output(self._cross_attention(cross_attention_layer), index=1))
            out = self.model(pixel_values=pixel_values, **self._inputs(token_ids), use_cache=False, return_dict=True)
        return out.logits, None if cross_attention_layer is None else captured[0]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """The ViT's self-attention per block (LeGrad's) and the Q-Former's cross-attention per cross-attending layer
        (as the decoder's), caught as their modules return them; no map here needs the others."""
        with ExitStack() as stack:
            vision = [stack.enter_context(capture_output(block.self_attn, index=1)) for block in self.vision_layers]
            cross = [stack.enter_context(capture_output(self._cross_attention(layer), index=1))
                     for layer in range(self.num_decoder_layers)]
            out = self.model(pixel_values=pixel_values, **self._inputs(token_ids), use_cache=False, return_dict=True)
        return out.logits, Attentions([captured[0] for captured in vision], [], [captured[0] for captured in cross])

    def forward_for_attribution(self, pixel_values: torch.Tensor, token_ids: list[int], vision_layer: int,
                                cross_attention_layer: int | None, attentions: bool = False) -> DecoderPass:
        """The base's pass, its attention rows being every query's (`query_rows`), and how much each row of the
        sequence attends to each query's image token in the language model (`query_weights`, mean over heads and
        layers, off the graph), by which the raw attention map weighs the queries for a word."""
        with ExitStack() as stack:
            language = [stack.enter_context(capture_output(layer.self_attn, index=1))
                        for layer in self.model.language_model.get_decoder().layers]
            decoded = super().forward_for_attribution(pixel_values, token_ids, vision_layer, cross_attention_layer,
                                                      attentions)
        images = [position for position, token in enumerate(token_ids) if token == self._image_token]
        looks = torch.stack([captured[0].detach().float() for captured in language]).mean(dim=(0, 2))
        return replace(decoded, query_rows=tuple(range(len(images))), query_weights=looks[..., images])
