"""Per-image memo tables, bounded in bytes: what was computed for an image is reused until it is evicted.

Everything the explainer caches (captions, segments and composite embeddings, region captions, finished
explanations) is keyed first by the image's content hash, so two users with different images can never
be served each other's results. Each value is measured when it is stored (`nbytes`), and the least recently
used entries are evicted to keep the whole cache within its budget and each image within its share of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import threading
from types import ModuleType
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")

#: The default budget, for a 16 GB machine running the real models. Those take ~4 GB (BLIP-base, CLIP ViT-B/32
#: and a segmenter: the benchmark's peak RSS with all of them at work is 3.8 GiB); the OS, Gradio and each
#: visitor's own state (their image and current explanation, outside this cache) want a few GB more. 2 GB keeps
#: the app within ~6 GB, well under half the machine, and holds dozens of photos with every word explained
#: (with maps at their computed resolution, an explanation is ≤ 1 MB and an image's segments a few MB).
DEFAULT_CACHE_MB = 2048
#: The largest fraction of the budget one image may hold, all its settings together. One visitor with a huge photo
#: trying every setting cannot push out everyone else: at least three other images' worth always stays, and one
#: image's share (512 MB by default) is far more than every word of one caption under a few settings needs.
IMAGE_SHARE = 0.25


def image_key(image: Image.Image) -> str:
    """A content hash of an RGB image: equal pixels, equal key."""
    digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=16)
    digest.update(repr(image.size).encode())
    return digest.hexdigest()


def nbytes(value: object) -> int:
    """Bytes held by `value` and everything it references, each object counted once.

    Arrays, tensors and images count their buffers, everything else `sys.getsizeof`; containers, dataclasses
    and objects' `__dict__` are walked. Callables (classes, functions, models) and modules are not: a value that
    refers to a model does not own it. An object shared with another cached value is counted for each: the total
    errs on the safe side.
    """
    seen: set[int] = set()
    stack = [value]
    total = 0
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
            total += item.nbytes
        elif isinstance(item, torch.Tensor):
            total += item.element_size() * item.nelement()
        elif isinstance(item, Image.Image):  # Pillow keeps 1 byte a pixel for 8-bit single-band modes, else 4
            total += item.width * item.height * (1 if item.mode in ("1", "L", "P") else 4)
        elif callable(item) or isinstance(item, ModuleType):
            continue
        else:
            total += sys.getsizeof(item)
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, (list, tuple, set, frozenset)):
                stack.extend(item)
            elif hasattr(item, "__dict__"):
                stack.extend(vars(item).values())
            elif dataclasses.is_dataclass(item):  # slotted dataclasses have no __dict__
                stack.extend(getattr(item, field.name) for field in dataclasses.fields(item))
    return total


class ImageCache:
    """Memo tables per image, within `budget_bytes` overall and `image_share` of it per image; thread-safe.

    Entries are (image, key) → value. Storing one evicts least recently used entries (not whole images): first
    the image's own until it fits its share, then anyone's until the cache fits its budget. A value larger than
    an image's share is returned by `get_or_compute` but not stored (it would evict everything and still not fit).
    """

    def __init__(self, budget_bytes: int = DEFAULT_CACHE_MB << 20, image_share: float = IMAGE_SHARE) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"The cache budget must be a positive number of bytes, got {budget_bytes}.")
        if not 0 < image_share <= 1:
            raise ValueError(f"An image's share of the cache must be in (0, 1], got {image_share}.")
        self.budget_bytes = budget_bytes
        self.image_bytes_limit = int(budget_bytes * image_share)
        self._entries: OrderedDict[tuple[str, Hashable], tuple[Any, int]] = OrderedDict()  # oldest first
        self._image_bytes: Counter[str] = Counter()
        self._pending: dict[tuple[str, Hashable], Future] = {}  # values being computed
        self._lock = threading.Lock()

    def get(self, image: str, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get((image, key))
            if entry is None:
                return None
            self._entries.move_to_end((image, key))
            return entry[0]

    def put(self, image: str, key: Hashable, value: Any) -> None:
        """Store `value` (unless it is larger than an image's share) and evict down to the budget."""
        size = nbytes(value)  # outside the lock: other threads go on meanwhile
        entry_key = (image, key)
        with self._lock:
            self._drop(entry_key)
            if size > self.image_bytes_limit:
                return
            self._entries[entry_key] = (value, size)
            self._image_bytes[image] += size
            while self._image_bytes[image] > self.image_bytes_limit:
                self._drop(next(k for k in self._entries if k[0] == image))
            while self._image_bytes.total() > self.budget_bytes:
                self._drop(next(iter(self._entries)))

    def get_or_compute(self, image: str, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value, or `compute()` stored. It runs outside the lock (other images go on) and once: a
        caller asking for a value that another thread is computing waits for it instead of computing it
        again — a click during the background precompute shares its segmentation, say, on a busy CPU."""
        entry_key = (image, key)
        with self._lock:
            entry = self._entries.get(entry_key)
            if entry is not None:
                self._entries.move_to_end(entry_key)
                return entry[0]
            pending = self._pending.get(entry_key)
            if pending is None:
                pending = self._pending[entry_key] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            value = compute()
        except BaseException as err:
            with self._lock:
                del self._pending[entry_key]
            pending.set_exception(err)
            raise
        self.put(image, key, value)
        with self._lock:
            del self._pending[entry_key]
        pending.set_result(value)
        return value

    def images(self) -> list[str]:
        """Keys of the images held, least recently used first."""
        with self._lock:
            return list(reversed(dict.fromkeys(image for image, _ in reversed(self._entries))))

    def used_bytes(self, image: str | None = None) -> int:
        """Bytes held by the values of `image`, or of every image."""
        with self._lock:
            return self._image_bytes[image] if image is not None else self._image_bytes.total()

    def clear(self) -> None:
        """Forget every value, as if no image had been seen; models stay loaded (values being computed are
        still delivered to their callers)."""
        with self._lock:
            self._entries.clear()
            self._image_bytes.clear()

    def _drop(self, entry_key: tuple[str, Hashable]) -> None:
        """Remove one entry if present (the caller holds the lock)."""
        entry = self._entries.pop(entry_key, None)
        if entry is not None:
            image = entry_key[0]
            self._image_bytes[image] -= entry[1]
            if not self._image_bytes[image]:
                del self._image_bytes[image]
