"""What the synthetic models are trained on: pictures, captions and image-level labels, nothing else.

A training step sees `Example`s only. An example carries no mask, box, position or pixel of any object, so no
model is ever trained to point at the evidence the benchmark scores it on (a test checks the fields). Examples
come from training seeds (`scenes.TRAINING_SEEDS_START` on), one disjoint stream of seeds per model, drawn fresh
at every step: no model sees a scene twice, and the held-out seeds stay held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .scenes import COLOURS, SHAPES, TRAINING_SEEDS_START, generate_scene

#: The image-level labels, in the order of `Example.labels`: each colour present, each shape present, and the
#: number of objects (one-hot over 1, 2, 3).
LABELS = (*COLOURS, *SHAPES, "1 object", "2 objects", "3 objects")
#: Each model's stream of training seeds (disjoint ranges, so models trained together never share scenes).
STREAMS = ("blip", "clip", "teacher", "vit-gpt2", "llava")
STREAM_LENGTH = 100_000_000


@dataclass(frozen=True)
class Example:
    """One training scene as a model may see it."""

    image: Image.Image
    caption: str
    colours: frozenset[str]
    shapes: frozenset[str]
    count: int

    @property
    def labels(self) -> list[float]:
        """The example's image-level labels as a 0/1 vector over `LABELS`."""
        present = self.colours | self.shapes | {f"{self.count} object" + ("s" if self.count > 1 else "")}
        return [float(label in present) for label in LABELS]


def example(seed: int) -> Example:
    """The training example of scene `seed`."""
    scene = generate_scene(seed)
    return Example(scene.image, scene.caption, frozenset(o.colour for o in scene.objects),
                   frozenset(o.shape for o in scene.objects), len(scene.objects))


def held_out_examples(count: int) -> list[Example]:
    """The examples of the first `count` held-out scenes (seeds 0, 1, …), for checks after training."""
    return [example(seed) for seed in range(count)]


def training_examples(stream: str, step: int, batch: int) -> list[Example]:
    """The examples of one training step of `stream` (one of `STREAMS`)."""
    first = TRAINING_SEEDS_START + STREAMS.index(stream) * STREAM_LENGTH + step * batch
    return [example(seed) for seed in range(first, first + batch)]


def label_batch(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([e.labels for e in examples])


def uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) uint8 pixels of same-sized images."""
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)


def normalized(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float],
               scale: float = 1 / 255) -> torch.Tensor:
    """Same-sized images rescaled and normalised as an image processor does (scenes are at every model's input size,
    where a processor's resize is the identity and its per-image Python loop would cost as much as a step)."""
    mean_, std_ = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    return (uint8_batch(images).float() * scale - mean_) / std_


def unit_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """The teacher CNN's input: pixels scaled to [−1, 1]."""
    return normalized(images, [0.5] * 3, [0.5] * 3)
