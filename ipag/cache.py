"""Per-image memo tables: what was computed for an image is reused until the image falls out of the LRU.

Everything the explainer caches (captions, segments and composite embeddings, region captions, finished
explanations) is keyed first by the image's content hash, so two users with different images can never
be served each other's results, and memory is bounded by the number of images kept.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")


def image_key(image: Image.Image) -> str:
    """A content hash of an RGB image: equal pixels, equal key."""
    digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=16)
    digest.update(repr(image.size).encode())
    return digest.hexdigest()


class ImageCache:
    """Memo tables for the `capacity` most recently used images; thread-safe."""

    def __init__(self, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"The cache must hold at least one image, got capacity={capacity}.")
        self.capacity = capacity
        self._tables: OrderedDict[str, dict[Hashable, Any]] = OrderedDict()
        self._pending: dict[tuple[str, Hashable], Future] = {}  # values being computed, by (image, key)
        self._lock = threading.Lock()

    def get(self, image: str, key: Hashable) -> Any | None:
        with self._lock:
            table = self._tables.get(image)
            if table is None:
                return None
            self._tables.move_to_end(image)
            return table.get(key)

    def put(self, image: str, key: Hashable, value: Any) -> None:
        with self._lock:
            self._tables.setdefault(image, {})[key] = value
            self._tables.move_to_end(image)
            while len(self._tables) > self.capacity:
                self._tables.popitem(last=False)

    def get_or_compute(self, image: str, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value, or `compute()` stored. It runs outside the lock (other images go on) and once: a
        caller asking for a value that another thread is computing waits for it instead of computing it
        again — a click during the background precompute shares its segmentation, say, on a busy CPU."""
        with self._lock:
            table = self._tables.get(image)
            if table is not None and key in table:
                self._tables.move_to_end(image)
                return table[key]
            pending = self._pending.get((image, key))
            if pending is None:
                pending = self._pending[(image, key)] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            value = compute()
        except BaseException as err:
            with self._lock:
                del self._pending[(image, key)]
            pending.set_exception(err)
            raise
        self.put(image, key, value)
        with self._lock:
            del self._pending[(image, key)]
        pending.set_result(value)
        return value

    def clear(self) -> None:
        """Forget every image's values (values being computed are still delivered to their callers)."""
        with self._lock:
            self._tables.clear()

    def images(self) -> list[str]:
        """Keys of the images held, least recently used first."""
        with self._lock:
            return list(self._tables)
