"""Is a model we are about to download reachable? Answered in seconds, before any download is attempted.

Without this, a machine without network spends ~40 s in huggingface_hub's retries before the loading error
arrives. Models that are local folders or already cached never ask.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

from huggingface_hub import try_to_load_from_cache

from .errors import ModelUnavailableError

#: How long to wait for the hub's address to answer.
TIMEOUT_S = 3.0


def require_hub(what: str, fix: str) -> None:
    """Raise `ModelUnavailableError` at once if the Hugging Face Hub cannot be reached (or is switched off with
    HF_HUB_OFFLINE), naming `what` is missing and `fix`."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    elif not _reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        reason = "the Hugging Face Hub cannot be reached from this machine"
    else:
        return
    raise ModelUnavailableError(f"{what} is not on this machine, and {reason}. Fix: {fix}")


def download_fix(model_id: str) -> str:
    """What to do about a missing hub model, in the commands the project's environment has."""
    return (f"run once with network access so it is cached (~/.cache/huggingface); or on a machine with network "
            f"run `.venv/bin/hf download {model_id}` and copy its cache folder here, or pass a local model folder; "
            "or try the app offline with --synthetic (models trained here, shipped in models/) or --tiny.")


def cached_on_hub(repo_id: str, *filenames: str) -> bool:
    """Whether one of `filenames` of the hub repository `repo_id` is in the local Hugging Face cache."""
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


@lru_cache(maxsize=None)
def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the endpoint's host opens within `TIMEOUT_S` (DNS included); asked once."""
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False
