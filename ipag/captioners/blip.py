"""BLIP (Salesforce) through Hugging Face transformers: ViT encoder + BERT decoder with cross-attention."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
)

from .base import Attentions, Captioner, Piece, is_punctuation, tracked_output

#: Words for the tiny model's vocabulary: caption-like words, WordPiece continuations and punctuation, so
#: that random captions exercise sub-word merging and punctuation handling like the real model's would.
TINY_WORDS = (
    "a an the of on in with and at to is are two man woman dog cat person people sitting standing riding "
    "holding next top street table room field water grass sky car bus train bird horse red blue green white "
    "black picture photo large small young group front skate surf kite snow pizza cake ##board ##s ##ing "
    "##er ##ed , . ' -"
).split()
TINY_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


class BlipCaptioner(Captioner):
    """BLIP image captioning (base or large). Its decoder starts every caption with [DEC] and ends with [SEP]."""

    name = "blip"
    title = "BLIP"
    model_types = ("blip",)
    models = {"blip-base": "Salesforce/blip-image-captioning-base", "blip-large": "Salesforce/blip-image-captioning-large"}

    def __init__(self, model: BlipForConditionalGeneration, processor: BlipProcessor, device: torch.device,
                 model_id: str) -> None:
        super().__init__(model, processor.image_processor, device, model_id)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        text_config = model.config.text_config
        self._bos, self._sep = text_config.bos_token_id, text_config.sep_token_id
        # Tokens a caption never contains; suppressing them keeps random tiny models' captions readable too.
        self._suppressed = sorted({i for i in self.tokenizer.all_special_ids if i != self._sep} | {self._bos})

    @classmethod
    def load(cls, model_id: str, device: torch.device, local_files_only: bool = False) -> "BlipCaptioner":
        """Load from a hub id or a local folder (cached by huggingface_hub, with download progress)."""
        model = BlipForConditionalGeneration.from_pretrained(model_id, local_files_only=local_files_only)
        processor = BlipProcessor.from_pretrained(model_id, local_files_only=local_files_only)
        return cls(model, processor, device, model_id)

    @classmethod
    def tiny(cls, seed: int = 0, device: torch.device = torch.device("cpu")) -> "BlipCaptioner":
        """A randomly initialised BLIP with a few hundred thousand weights and a 64-word vocabulary.

        `initializer_range=0.2` (not transformers' 0.02) makes the output really depend on the image, so
        gradient tests cannot pass vacuously (see DESIGN.md).
        """
        vocab = {token: index for index, token in enumerate(TINY_SPECIALS + list(TINY_WORDS))}
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=64)
        image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
        processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        text = dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                    initializer_range=0.2, bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"],
                    eos_token_id=vocab["[SEP]"], pad_token_id=vocab["[PAD]"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=8, initializer_range=0.2)
        config = BlipConfig(text_config=text, vision_config=vision, initializer_range=0.2)
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
        return cls(model, processor, device, f"tiny-blip(seed={seed})")

    def save_pretrained(self, folder: str | Path) -> None:
        """Write model and processor so that `load(folder)` restores exactly this captioner."""
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    @property
    def vision_layers(self) -> list[nn.Module]:
        return list(self.model.vision_model.encoder.layers)

    @property
    def num_decoder_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def _generate_inputs(self, pixel_values: torch.Tensor, start: list[int]) -> dict:
        return {"pixel_values": pixel_values, "suppress_tokens": self._suppressed}

    def _caption_end(self, sequence: list[int]) -> int:
        """At the first [SEP] (end) or [PAD] (a finished beam's filler)."""
        ends = [index for index, token in enumerate(sequence) if token in (self._sep, self.tokenizer.pad_token_id)]
        return ends[0] if ends else len(sequence)

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor,
                 cross_attention_layer: int | None) -> tuple:
        image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        out = self.model.text_decoder(
            input_ids=token_ids,
            attention_mask=torch.ones_like(token_ids),
            encoder_hidden_states=image_embeds,
            output_attentions=cross_attention_layer is not None,
            return_dict=True,
        )
        return out.logits, None if cross_attention_layer is None else out.cross_attentions[cross_attention_layer]

    def _forward_with_attentions(self, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> tuple:
        vision = self.model.vision_model(pixel_values=pixel_values, output_attentions=True)
        with tracked_output(self.model.text_decoder.bert.embeddings):
            out = self.model.text_decoder(input_ids=token_ids, attention_mask=torch.ones_like(token_ids),
                                          encoder_hidden_states=vision.last_hidden_state, output_attentions=True,
                                          return_dict=True)
        return out.logits, Attentions(list(vision.attentions), list(out.attentions), list(out.cross_attentions))

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def start_ids(self, pixel_values: torch.Tensor | None = None, instruction: str | None = None) -> list[int]:
        return [self._bos]

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    def pieces(self, token_ids: list[int]) -> list[Piece]:
        special = set(self.tokenizer.all_special_ids) | {self._bos}
        pieces = []
        for token_id, token in zip(token_ids, self.token_strings(token_ids)):
            if token_id in special:
                pieces.append(Piece(token, "special"))
            elif token.startswith("##"):
                pieces.append(Piece(token[2:], "continue"))
            elif is_punctuation(token):
                pieces.append(Piece(token, "punct"))
            else:
                pieces.append(Piece(token, "start"))
        return pieces

