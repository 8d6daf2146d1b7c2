"""ViT-GPT2 (e.g. nlpconnect/vit-gpt2-image-captioning): a ViT encoder and a GPT-2 decoder with cross-attention,
joined by transformers' `VisionEncoderDecoderModel`.

Two things differ from BLIP:
- Attention implementation. transformers picks SDPA by default, which returns no attention probabilities
  (`cross_attentions` comes back empty); the model is loaded with eager attention, whose probabilities are
  part of the autograd graph, so cross-attention Grad-CAM works as for BLIP.
- Word boundaries: GPT-2's byte-level BPE (`ipag.captioners.gpt2`, shared with ClipCap).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    GPT2Config,
    PreTrainedTokenizerBase,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from ..errors import ModelUnavailableError
from .base import Attentions, Captioner, tracked_output
from .gpt2 import END_OF_TEXT, Gpt2Words, tiny_tokenizer

#: The encoder and decoder families this class knows how to hook (ViT blocks, GPT-2 cross-attention).
SUPPORTED = {"encoder": "vit", "decoder": "gpt2"}


class VitGpt2Captioner(Gpt2Words, Captioner):
    """ViT encoder + GPT-2 decoder. Captions start with GPT-2's bos token and end with its eos (the same id)."""

    name = "vit-gpt2"
    title = "ViT-GPT2"
    model_types = ("vision-encoder-decoder",)
    models = {"vit-gpt2": "nlpconnect/vit-gpt2-image-captioning"}

    def __init__(self, model: VisionEncoderDecoderModel, image_processor: ViTImageProcessor,
                 tokenizer: PreTrainedTokenizerBase, device: torch.device, model_id: str) -> None:
        if model.decoder.config._attn_implementation != "eager":
            raise ValueError("VitGpt2Captioner needs eager attention: other implementations return no "
                             "cross-attention probabilities. Load with attn_implementation='eager'.")
        super().__init__(model, image_processor, device, model_id)
        self.tokenizer = tokenizer
        self._start = model.config.decoder_start_token_id
        self._end = model.config.decoder.eos_token_id

    @classmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "VitGpt2Captioner":
        """Load from a hub id or a local folder (cached by huggingface_hub, with download progress)."""
        offline = {"local_files_only": local_files_only}
        config = VisionEncoderDecoderConfig.from_pretrained(model_id, **offline)  # checked before any weight
        found = {"encoder": config.encoder.model_type, "decoder": config.decoder.model_type}
        if found != SUPPORTED:
            raise ModelUnavailableError(
                f"'{model_id}' is a vision-encoder-decoder model with a {found['encoder']} encoder and a "
                f"{found['decoder']} decoder; the ViT-GPT2 captioner explains a vit encoder with a gpt2 decoder "
                "(e.g. nlpconnect/vit-gpt2-image-captioning).")
        model = VisionEncoderDecoderModel.from_pretrained(model_id, config=config, attn_implementation="eager",
                                                          **offline)
        image_processor = ViTImageProcessor.from_pretrained(model_id, **offline)
        tokenizer = AutoTokenizer.from_pretrained(model_id, **offline)
        return cls(model, image_processor, tokenizer, device, model_id)

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device = torch.device("cpu")) -> "VitGpt2Captioner":
        """A randomly initialised ViT-GPT2 with about 60 thousand weights and a ~180-token byte-level BPE vocabulary.

        `initializer_range=0.2` (not transformers' 0.02) makes the output really depend on the image, so
        gradient tests cannot pass vacuously (see DESIGN.md).
        """
        return cls.build(tiny_tokenizer(), image_size=64, hidden=32, intermediate=64, vision_layers=2, text_layers=2,
                         heads=4, patch=8, initializer_range=0.2, seed=seed, device=device,
                         model_id=f"tiny-vit-gpt2(seed={seed})")

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, image_size: int, hidden: int, intermediate: int,
              vision_layers: int, text_layers: int, heads: int, patch: int, initializer_range: float, seed: int,
              device: torch.device, model_id: str) -> "VitGpt2Captioner":
        """A randomly initialised ViT-GPT2 of the given size over `tokenizer` (GPT-2 style: one end-of-text token
        that starts, ends and pads), its pixels normalised to [−1, 1] as nlpconnect's are."""
        end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        encoder = ViTConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=vision_layers,
                            num_attention_heads=heads, image_size=image_size, patch_size=patch,
                            initializer_range=initializer_range)
        decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=hidden, n_inner=intermediate,
                             n_layer=text_layers, n_head=heads, add_cross_attention=True, is_decoder=True,
                             initializer_range=initializer_range, bos_token_id=end, eos_token_id=end, pad_token_id=end)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        # As in nlpconnect's config: generation starts from bos and pads with eos.
        config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
        # A random decoder often ranks the end token first at once; an empty caption has nothing to explain.
        # (Saved with the model, so a reloaded model captions the same; real models need no such floor.)
        model.generation_config.min_new_tokens = 1
        image_processor = ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)
        return cls(model, image_processor, tokenizer, device, model_id)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model, image processor and tokenizer so that `load(folder)` restores exactly this captioner."""
        self.model.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    @property
    def vision_layers(self) -> list[nn.Module]:
        return list(self.model.encoder.layers)

    @property
    def num_decoder_layers(self) -> int:
        return self.model.config.decoder.num_hidden_layers

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        # The start token is also the padding token; an explicit mask (generate extends it) tells GPT-2 that
        # it is not padding, and silences its warning.
        return {"pixel_values": pixel_values,
                "decoder_attention_mask": torch.ones((pixel_values.shape[0], 1), dtype=torch.long,
                                                     device=self.device)}

    def _caption_end(self, sequence: list[int]) -> int:
        """Start, end and padding are one id: the caption ends at its first occurrence after the start."""
        return sequence.index(self._end, 1) if self._end in sequence[1:] else len(sequence)

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        # The encoder runs on its own so that only the decoder's attentions are recorded: the encoder's
        # (layers × heads × patches²) would cost memory for every image of a perturbation batch.
        encoded = self.model.encoder(pixel_values=pixel_values)
        out = self.model(
            encoder_outputs=encoded,
            decoder_input_ids=token_ids,
            decoder_attention_mask=torch.ones_like(token_ids),  # the start token is not padding (see above)
            output_attentions=cross_attention_layer is not None,
            return_dict=True,
        )
        return out.logits, None if cross_attention_layer is None else out.cross_attentions[cross_attention_layer]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        encoded = self.model.encoder(pixel_values=pixel_values, output_attentions=True)
        if not encoded.attentions or encoded.attentions[0] is None:
            raise NotImplementedError("This ViT encoder returns no attention probabilities: load it with "
                                      "attn_implementation='eager'.")
        with tracked_output(self.model.decoder.transformer.drop):  # after GPT-2's token + position embeddings
            out = self.model(encoder_outputs=encoded, decoder_input_ids=token_ids,
                             decoder_attention_mask=torch.ones_like(token_ids), output_attentions=True,
                             return_dict=True)
        return out.logits, Attentions(list(encoded.attentions), list(out.decoder_attentions),
                                      list(out.cross_attentions))

    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        return [self._start]
