"""ViT-GPT2 (e.g. nlpconnect/vit-gpt2-image-captioning): a ViT encoder and a GPT-2 decoder with cross-attention,
joined by transformers' `VisionEncoderDecoderModel`.

Two things differ from BLIP and are handled here, not in the shared code:
- Attention implementation. transformers picks SDPA by default, which returns no attention probabilities
  (`cross_attentions` comes back empty); the model is loaded with eager attention, whose probabilities are
  part of the autograd graph, so cross-attention Grad-CAM works as for BLIP.
- Word boundaries. GPT-2's byte-level BPE marks a word start by a leading space ("Ġdog"); a piece without
  one continues the previous word ("Ġskateboard" "s"), except the caption's first word, which the model
  writes without a space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    GPT2Config,
    GPT2Tokenizer,
    PreTrainedTokenizerBase,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

from ..errors import ModelUnavailableError
from .base import Captioner, Piece, is_punctuation

#: Sentences the tiny model's byte-level BPE is trained on (in memory, in milliseconds, deterministically).
#: Words seen here become whole "Ġword" tokens; other words split into pieces ("skateboards" → "Ġskateboard"
#: "s"), so random captions exercise word starts, continuations and punctuation like the real model's.
TINY_CORPUS = (
    "a man riding a skateboard down the street.",
    "two dogs sitting next to a cat's bowl, on the grass.",
    "a woman holding a red kite in a field",
    "a group of people standing in front of a bus",
    "a black and white picture of a train at the station",
    "a small bird on top of a blue car",
    "a young person surfing in the water",
    "a large pizza and a cake on a table",
)
#: GPT-2's only special token: it starts a caption (bos), ends it (eos) and pads.
END_OF_TEXT = "<|endoftext|>"
#: The encoder and decoder families this class knows how to hook (ViT blocks, GPT-2 cross-attention).
SUPPORTED = {"encoder": "vit", "decoder": "gpt2"}


class VitGpt2Captioner(Captioner):
    """ViT encoder + GPT-2 decoder. Captions start with GPT-2's bos token and end with its eos (the same id)."""

    name = "vit-gpt2"

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
        tokenizer = _tiny_tokenizer()
        end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        encoder = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=64, patch_size=8, initializer_range=0.2)
        decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                             add_cross_attention=True, is_decoder=True, initializer_range=0.2,
                             bos_token_id=end, eos_token_id=end, pad_token_id=end)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        # As in nlpconnect's config: generation starts from bos and pads with eos.
        config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end
        torch.manual_seed(seed)
        model = VisionEncoderDecoderModel._from_config(config, attn_implementation="eager")
        # A random decoder often ranks the end token first at once; an empty caption has nothing to explain.
        # (Saved with the model, so a reloaded tiny model captions the same; real models need no such floor.)
        model.generation_config.min_new_tokens = 1
        image_processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)
        return cls(model, image_processor, tokenizer, device, f"tiny-vit-gpt2(seed={seed})")

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

    def _generate_options(self, pixel_values: torch.Tensor) -> dict:
        # The start token is also the padding token; an explicit mask (generate extends it) tells GPT-2 that
        # it is not padding, and silences its warning.
        return {"decoder_attention_mask": torch.ones((pixel_values.shape[0], 1), dtype=torch.long,
                                                     device=self.device)}

    def _caption_end(self, sequence: list[int]) -> int:
        """Start, end and padding are one id: the caption ends at its first occurrence after the start."""
        return sequence.index(self._end, 1) if self._end in sequence[1:] else len(sequence)

    def _forward(self, pixel_values: torch.Tensor, token_ids: torch.Tensor, cross_attention_layer: int) -> tuple:
        # The encoder runs on its own so that only the decoder's attentions are recorded: the encoder's
        # (layers × heads × patches²) would cost memory for every image of a perturbation batch.
        encoded = self.model.encoder(pixel_values=pixel_values)
        out = self.model(
            encoder_outputs=encoded,
            decoder_input_ids=token_ids,
            decoder_attention_mask=torch.ones_like(token_ids),  # the start token is not padding (see above)
            output_attentions=True,
            return_dict=True,
        )
        return out.logits, out.cross_attentions[cross_attention_layer]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as it reads after a previous word (with GPT-2's leading space).

        A typed word must match its occurrences inside a caption ("Ġdog"), and a free query continues the
        neutral prompt ("a picture of" + "Ġdog"); only a caption's first word is written without the space.
        """
        text = text.strip()
        return self.tokenizer(" " + text, add_special_tokens=False).input_ids if text else []

    def start_ids(self) -> list[int]:
        return [self._start]

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    def pieces(self, token_ids: list[int]) -> list[Piece]:
        special = set(self.tokenizer.all_special_ids)
        pieces: list[Piece] = []
        for token_id, token in zip(token_ids, self.token_strings(token_ids)):
            if token_id in special:
                pieces.append(Piece(token, "special"))
                continue
            text = self.tokenizer.convert_tokens_to_string([token])  # byte-level → text: "Ġdog" → " dog"
            word = text.strip()
            if is_punctuation(word):
                pieces.append(Piece(word, "punct"))
            elif text[:1].isspace() or not pieces or pieces[-1].kind == "special":
                pieces.append(Piece(word, "start"))
            else:
                pieces.append(Piece(word, "continue"))
        return pieces


def _tiny_tokenizer() -> GPT2Tokenizer:
    """A GPT-2 tokenizer whose byte-level BPE vocabulary and merges are trained on `TINY_CORPUS`."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(TINY_CORPUS, trainers.BpeTrainer(vocab_size=1000, special_tokens=[END_OF_TEXT],
                                                             show_progress=False))
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return GPT2Tokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=64)

