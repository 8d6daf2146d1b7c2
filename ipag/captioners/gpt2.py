"""GPT-2's byte-level BPE as the word aligner needs it, for every captioner whose decoder is GPT-2.

GPT-2 marks a word start by a leading space ("Ġdog"); a piece without one continues the previous word
("Ġskateboard" "s"), except the caption's first word, which captioning models write without a space.
`Gpt2Words` gives a captioner that holds a GPT-2 `tokenizer` its tokenization and word pieces;
`tiny_tokenizer` is the small byte-level BPE the tiny models use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer, PreTrainedTokenizerBase

from .base import Piece, is_punctuation

#: GPT-2's only special token: it starts a caption (bos), ends it (eos) and pads.
END_OF_TEXT = "<|endoftext|>"
#: Sentences the tiny byte-level BPE is trained on (in memory, in milliseconds, deterministically).
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


class Gpt2Words:
    """Tokenization and word pieces of a captioner whose decoder is GPT-2 (mixed in before `Captioner`)."""

    tokenizer: PreTrainedTokenizerBase

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as it reads after a previous word (with GPT-2's leading space).

        A typed word must match its occurrences inside a caption ("Ġdog"), and a free query continues the
        neutral prompt ("a picture of" + "Ġdog"); only a caption's first word is written without the space.
        """
        text = text.strip()
        return self.tokenizer(" " + text, add_special_tokens=False).input_ids if text else []

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


def tiny_tokenizer() -> GPT2Tokenizer:
    """A GPT-2 tokenizer whose byte-level BPE vocabulary and merges are trained on `TINY_CORPUS`."""
    return bpe_tokenizer(TINY_CORPUS, vocab_size=1000, max_length=64)


def bpe_tokenizer(corpus: Sequence[str], vocab_size: int, max_length: int) -> GPT2Tokenizer:
    """A GPT-2 tokenizer whose byte-level BPE is trained on `corpus` (in memory, deterministically), with GPT-2's
    one special token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                                        show_progress=False))
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    return GPT2Tokenizer(vocab=bpe.get_vocab(), merges=merges, model_max_length=max_length)
