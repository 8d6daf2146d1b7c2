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
