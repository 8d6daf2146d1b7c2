"""Choosing where models run, and the CPU settings that keep backward passes fast and memory low."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import torch

from .errors import ModelUnavailableError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map "auto" to the best available accelerator (CUDA, then MPS, then CPU) and check explicit requests.

    On CPU, denormal floats are flushed to zero: a BLIP backward pass was measured 17× slower without it.
    """
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    resolved = torch.device(name)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError(
            f"Device '{name}' was requested but no CUDA GPU is available here. "
            "Fix: use --device cpu (or auto), or install a CUDA build of torch on a machine with a GPU."
        )
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelUnavailableError(f"Device '{name}' was requested but Apple MPS is not available. Use --device cpu.")
    if resolved.type == "cpu":
        torch.set_flush_denormal(True)
    return resolved


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere nothing). glibc keeps what
    tensors free for reuse, but in pieces that the next large tensors often cannot use: after a precompute the
    process held 4.56 GiB, 2.75 GiB after a trim, and later peaks stacked on the difference. Called only where a
    large graph was just freed (`ipag.word`): the next task pays for it by faulting its memory in again, which
    made a precompute ~25% slower when done after every task, and the caption 0.15 s slower when done whenever
    the worker idled."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    library = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
