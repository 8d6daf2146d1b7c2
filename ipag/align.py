"""Word ↔ token alignment: which tokens make up each clickable caption word, and where it sits in the text.

The caption text is built here from the tokens (rather than taken from the tokenizer's decode) so that
every word's character span is exact by construction: sub-word pieces join their word, punctuation
attaches to the text but is never a word, special tokens are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

from .captioners.base import Piece
from .results import Word

#: Punctuation written without a space before it ("a dog, running." rather than "a dog , running .").
_CLOSING = set(".,!?;:)]}%'\"")


def align(pieces: Sequence[Piece], token_ids: Sequence[int], logprobs: Sequence[float]) -> tuple[str, tuple[Word, ...]]:
    """Return the caption text and its words.

    `pieces[i]`, `token_ids[i]` and `logprobs[i]` describe sequence position i (position 0 is usually
    the start token, a "special" piece). A continuation piece with no word before it starts a word.
    """
    if not len(pieces) == len(token_ids) == len(logprobs):
        raise ValueError("pieces, token_ids and logprobs must have the same length.")
    text = ""
    groups: list[list[int]] = []  # token positions of each word
    starts: list[int] = []
    for position, piece in enumerate(pieces):
        if piece.kind == "special" or not piece.text:
            continue
        if piece.kind == "continue" and groups and groups[-1][-1] == position - 1:
            groups[-1].append(position)
            text += piece.text
            continue
        if text and not (piece.kind == "punct" and piece.text[0] in _CLOSING):
            text += " "
        if piece.kind != "punct":
            groups.append([position])
            starts.append(len(text))
        text += piece.text
    words = []
    for index, (positions, start) in enumerate(zip(groups, starts)):
        word_text = "".join(pieces[p].text for p in positions)
        words.append(
            Word(
                index=index,
                text=word_text,
                span=(start, start + len(word_text)),
                token_positions=tuple(positions),
                token_ids=tuple(token_ids[p] for p in positions),
                logprob=float(sum(logprobs[p] for p in positions)),
            )
        )
    return text, tuple(words)


def find_phrase(words: Sequence[Word], token_ids: Sequence[int], query_ids: Sequence[int]) -> tuple[Word, ...]:
    """The first run of whole caption words whose tokens are exactly `query_ids`, or () if none.

    Matching on token ids (not strings) means "Skateboard", "skateboard" and "skate board" variants resolve
    the way the tokenizer sees them, and multi-word phrases ("hot dog") are explained as one target.
    """
    query = tuple(query_ids)
    if not query:
        return ()
    for first in range(len(words)):
        for last in range(first, len(words)):
            run = words[first : last + 1]
            ids = tuple(token_ids[p] for word in run for p in word.token_positions)
            if ids == query:
                return tuple(run)
            if len(ids) >= len(query):
                break
    return ()
