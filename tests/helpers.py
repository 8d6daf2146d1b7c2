"""Helpers shared by several test modules."""

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def registered(registry, cls) -> Iterator[None]:
    """`cls` in `registry` (a map type, captioner or segmenter) during the block only."""
    registry.register(cls)
    try:
        yield
    finally:
        registry.unregister(cls)


def expected_maps(captioner, settings=None, clip: bool = True) -> set[str]:
    """The map keys an explanation has for `captioner` with `settings`: the registry's, minus those the settings
    switch off, those the captioner cannot have, and CLIP's without a CLIP model."""
    from ipag import Settings
    from ipag.maps import MAP_TYPES

    chosen = [map_type.from_settings(settings or Settings()) for map_type in MAP_TYPES]
    return {map_type.key for map_type in chosen if map_type is not None and map_type.unavailable(captioner) is None
            and (clip or not map_type.needs_clip)}


def assert_only_the_answer_is_clickable(captioner, caption, prompt: list[int]) -> None:
    """A vision-language caption continues its `prompt`, and every clickable word lies in the answer."""
    assert list(caption.token_ids[:len(prompt)]) == prompt and captioner.answer_start(caption.token_ids) == len(prompt)
    assert caption.words, "a random tiny model writes a few words"
    answer = captioner.tokenizer.decode(caption.token_ids[len(prompt):])
    for word in caption.words:
        assert caption.text[word.span[0]:word.span[1]] == word.text and word.text in answer.lower()
        assert all(position >= len(prompt) for position in word.token_positions)
