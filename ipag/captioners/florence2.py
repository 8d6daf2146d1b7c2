"""Florence-2: a DaViT vision tower (convolutional stages with window and channel attention), whose last stage's
feature grid becomes image tokens (their mean first, then the grid) before the task prompt in a BART encoder, and a
BART decoder that writes the answer cross-attending to the encoder's output.

The model is asked a task (`<CAPTION>` by default; the processor turns a task token into its text prompt, "What
does the image describe?"), so a caption's sequence is the encoder's input (image placeholders, <s>, the prompt,
</s>), then the decoder's start (</s>, then the <s> the model is made to write first), then the answer: the prompt
alone still determines every teacher-forced computation, and only the answer's words are clickable. The decoder
does not see the encoder's tokens, so its rows are the sequence's shifted by the encoder's length
(`DecoderPass.row_offset`); the positions of the encoder's input get no prediction (zero logits).

Maps: Grad-CAM on any DaViT block's feature map (each stage's grid); the decoder's cross-attention read on the
image tokens' keys only (the prompt's keys have no place on the image); relevancy with the encoder–decoder rules,
the BART encoder's self-attention serving as the image side's (the DaViT's attention is within windows or between
channels, not from patch to patch over the image, which is also why LeGrad is not offered).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from PIL import Image
from torch import nn

from ..layout import Layout
from .base import Attentions, Captioner, DecoderPass, tracked_output
from .vlm import VlmCaptioner


class Florence2Captioner(VlmCaptioner):
    """Florence-2: DaViT → image tokens and task prompt in a BART encoder → BART decoder."""

    name = "florence2"
    title = "Florence-2"
    model_types = ("florence2",)
    default_instruction = "<CAPTION>"
    tiny_kind = "florence2"

    @property
    def _decoder_start(self) -> list[int]:
        """What the decoder starts from: its start token, and the token generation forces next (if any)."""
        config = self.model.generation_config
        return [config.decoder_start_token_id] + ([] if config.forced_bos_token_id is None
                                                  else [config.forced_bos_token_id])

    # --- the model's parts ---------------------------------------------------------------------------------

    @property
    def vision_layers(self) -> list[nn.Module]:
        """Every DaViT block, first stage first: each returns its stage's feature map (B, C, h, w)."""
        return [block for stage in self.model.model.vision_tower.blocks for block in stage]

    @property
    def num_decoder_layers(self) -> int:
        return self.model.config.text_config.decoder_layers

    def attention_name(self, layer: int) -> str:
        return Captioner.attention_name(self, layer)

    def vision_grid(self, output: torch.Tensor) -> torch.Tensor:
        """A DaViT block's output is already a feature grid."""
        return output

    def attention_layout(self, token_ids: Sequence[int], keys: int, grid: tuple[int, int]) -> Layout:
        """The image tokens among the encoder's tokens: their mean (no place), then the last stage's square grid."""
        ids = list(token_ids)
        side = round((ids.count(self._image_token) - 1) ** 0.5)
        return Layout.of_grid(side, side, first=ids.index(self._image_token) + 1)

    def unavailable_map(self, key: str) -> str | None:
        if key == "legrad":
            return ("LeGrad reads the vision tower's attention from patch to patch; Florence-2's DaViT attends within "
                    "windows and between channels instead.")
        return None

    # --- prompts -------------------------------------------------------------------------------------------

    def _prompt_ids(self, instruction: str, size: tuple[int, int]) -> list[int]:
        """The encoder's input for the task or prompt `instruction`, then the decoder's start."""
        encoded = self.processor(images=Image.new("RGB", size[::-1]), text=instruction)
        return list(encoded["input_ids"][0]) + self._decoder_start

    def _encoder_length(self, token_ids: Sequence[int]) -> int:
        """Where the encoder's input ends in a caption's sequence (the decoder's start follows it)."""
        return self.answer_start(token_ids) - len(self._decoder_start)

    # --- passes --------------------------------------------------------------------------------------------

    def _inputs(self, token_ids: torch.Tensor) -> dict:
        """The encoder's ids and mask, and the decoder's ids, of (B, T) sequences."""
        split = self._encoder_length(token_ids[0].tolist())
        return {"input_ids": token_ids[:, :split], "attention_mask": torch.ones_like(token_ids[:, :split]),
                "decoder_input_ids": token_ids[:, split:]}

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        """`VlmCaptioner`'s, without forcing <s> after the decoder's start token: the start holds it already."""
        return super()._generate_inputs(pixel_values, start) | {"forced_bos_token_id": None}

    def _run(self, pixel_values: torch.Tensor, token_ids: torch.Tensor, attentions: bool) -> tuple:
        """(logits over the whole sequence, the model's output): the decoder's, after zeros for the encoder's input."""
        out = self.model(pixel_values=pixel_values, **self._inputs(token_ids), output_attentions=attentions,
                         use_cache=False, return_dict=True)
        prompt = out.logits.new_zeros(len(token_ids), token_ids.shape[1] - out.logits.shape[1], out.logits.shape[2])
        return torch.cat([prompt, out.logits], dim=1), out

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        logits, out = self._run(pixel_values, token_ids, cross_attention_layer is not None)
        return logits, None if cross_attention_layer is None else out.cross_attentions[cross_attention_layer]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        """The BART encoder's self-attention (over the image tokens and the prompt: the keys of the decoder's
        cross-attention) and the decoder's self- and cross-attention; none of the DaViT's (see the module
        docstring). The decoder's embeddings do not depend on the image: they are made part of the graph, so that
        its first self-attention gets the word's gradient too."""
        with tracked_output(self.model.model.language_model.decoder.layernorm_embedding):
            logits, out = self._run(pixel_values, token_ids, True)
        return logits, Attentions([], list(out.decoder_attentions), list(out.cross_attentions),
                                  list(out.encoder_attentions))

    def forward_for_attribution(self, pixel_values: torch.Tensor, token_ids: list[int], vision_layer: int,
                                cross_attention_layer: int | None, attentions: bool = False) -> DecoderPass:
        """The base's pass, with the decoder's rows shifted back by the encoder's input (`row_offset`)."""
        decoded = super().forward_for_attribution(pixel_values, token_ids, vision_layer, cross_attention_layer,
                                                  attentions)
        return replace(decoded, row_offset=-self._encoder_length(token_ids))
