"""Shared fixtures. Everything runs offline on tiny random models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network; loading errors must be immediate

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

from ipag import Explainer

# The same fuzzing examples on every run, so that a run's verdict is about the change, not the draw; explore
# new ones with `pytest --hypothesis-profile=explore` (and keep any failure it finds as a test).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=200)
settings.load_profile("repeatable")


@pytest.fixture(scope="session")
def explainer() -> Explainer:
    return Explainer.tiny(seed=0)


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A textured, odd-sized RGB image (47×61) so resizing bugs show up."""
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((47, 61, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def caption(explainer, photo):
    return explainer.caption(photo)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models are all overhead: one intra-op thread is several times faster than two on 2 cores,
    especially while a background precompute runs beside the test."""
    import torch

    torch.set_num_threads(1)

