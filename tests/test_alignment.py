"""Word ↔ token alignment on hand-made token sequences and through the real (tiny) tokenizer."""

import pytest

from ipag.align import align, find_phrase
from ipag.captioners import Piece


def pieces(*tokens):
    """Build pieces the way BLIP's WordPiece tokenizer marks them."""
    out = []
    for token in tokens:
        if token.startswith("["):
            out.append(Piece(token, "special"))
        elif token.startswith("##"):
            out.append(Piece(token[2:], "continue"))
        elif token in ",.'-":
            out.append(Piece(token, "punct"))
        else:
            out.append(Piece(token, "start"))
    return out


def run(*tokens):
    ps = pieces(*tokens)
    ids = list(range(100, 100 + len(ps)))
    logprobs = [0.0] + [-0.5 * (i + 1) for i in range(len(ps) - 1)]
    text, words = align(ps, ids, logprobs)
    for word in words:  # spans are exact by construction
        assert text[word.span[0]:word.span[1]] == word.text
    return text, words, ids, logprobs


def test_sub_words_merge_into_one_word_with_summed_logprob():
    text, words, ids, logprobs = run("[DEC]", "a", "skate", "##board", "##s", "park")
    assert text == "a skateboards park"
    assert [w.text for w in words] == ["a", "skateboards", "park"]
    board = words[1]
    assert board.token_positions == (2, 3, 4)
    assert board.token_ids == (ids[2], ids[3], ids[4])
    assert board.logprob == pytest.approx(logprobs[2] + logprobs[3] + logprobs[4])


def test_punctuation_and_special_tokens_are_not_words():
    text, words, *_ = run("[DEC]", "a", "dog", ",", "a", "cat", ".", "[SEP]")
    assert text == "a dog, a cat."
    assert [w.text for w in words] == ["a", "dog", "a", "cat"]
    assert [w.index for w in words] == [0, 1, 2, 3]


def test_repeated_words_are_distinct_by_position():
    _, words, *_ = run("[DEC]", "dog", "and", "dog")
    first, second = words[0], words[2]
    assert first.text == second.text == "dog"
    assert first.index != second.index and first.token_positions != second.token_positions
    assert first.span == (0, 3) and second.span == (8, 11)


def test_single_word_caption():
    text, words, *_ = run("[DEC]", "dog")
    assert text == "dog" and len(words) == 1 and words[0].span == (0, 3)


def test_empty_and_punctuation_only_captions_have_no_words():
    assert run("[DEC]")[:2] == ("", ())
    assert run("[DEC]", ".", ",")[1] == ()


def test_a_leading_continuation_piece_starts_a_word():
    _, words, *_ = run("[DEC]", "##s", "dog")
    assert [w.text for w in words] == ["s", "dog"]


def test_find_phrase_matches_whole_words_only():
    _, words, ids, _ = run("[DEC]", "hot", "dog", "on", "skate", "##board")
    assert find_phrase(words, ids, [ids[1], ids[2]]) == (words[0], words[1])
    assert find_phrase(words, ids, [ids[4]]) == ()  # "skate" alone is only part of "skateboard"
    assert find_phrase(words, ids, [ids[4], ids[5]]) == (words[3],)
    assert find_phrase(words, ids, []) == ()


def test_real_tokenizer_alignment(explainer):
    captioner = explainer.captioner
    ids = captioner.start_ids() + captioner.tokenize("A man, riding skateboards.")
    pixels = captioner.preprocess(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8)))
    caption = explainer.caption_from_ids(pixels, ids)
    assert caption.text == "a man, riding skateboards."
    assert [w.text for w in caption.words] == ["a", "man", "riding", "skateboards"]
    assert len(caption.words[3].token_positions) == 3  # skate ##board ##s
    assert all(w.logprob < 0 for w in caption.words)
