"""A small CNN that learns the scenes' shapes from image-level labels, and distilling its features into a ViT.

Why: a vision transformer trained from scratch on the scenes learns colours at once but shapes only after far more
steps than a 2-core CPU gives it (models/README.md has the measurements): its patches are embedded linearly and
nothing makes it look at neighbouring patches first. A 3-layer CNN has that locality built in and learns which
shapes a scene holds within a few minutes. Its feature grid (stride 8, the ViT's patch grid) then serves as a
second target for the ViT's patch tokens while it learns to caption: a linear projection of each patch token is
regressed onto the CNN's standardised features at the same place (Romero et al.'s "hints", 2015).

No evidence enters: the CNN sees images and image-level labels only (which colours and shapes a scene holds and
how many objects, `Example.labels`); the distillation target is the CNN's response to the image, not a mask, box
or position of any object.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import LABELS, Example, label_batch, training_examples, unit_pixels
from .fit import TrainingLog, fit, seeded

#: The teacher's channels per conv block (each followed by 2×2 max-pooling: stride 8 after three).
CHANNELS = (32, 64, 96)
#: Teacher training schedule (measured here: shape sets right for 95% of held-out scenes after 2,000 steps).
TEACHER_STEPS = 2000


class Teacher(nn.Module):
    """Three conv + ReLU + 2×2 max-pool blocks (a stride-8 feature grid), a max-pooled linear head over `LABELS`."""

    def __init__(self) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = 3
        for channels in CHANNELS:
            blocks += [nn.Conv2d(previous, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(previous, len(LABELS))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits of every image-level label (max over the grid: a label holds if it holds anywhere)."""
        return self.head(self.features(pixels).amax(dim=(2, 3)))


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the labels (colours present, shapes present, object count one-hot)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def train_teacher(steps: int = TEACHER_STEPS, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                  progress: bool = True) -> tuple[Teacher, TrainingLog]:
    """Train a `Teacher` on image-level labels of freshly generated training scenes (AdamW, constant rate)."""
    with seeded(seed):
        teacher = Teacher()

    def step_loss(step: int) -> torch.Tensor:
        examples = training_examples("teacher", step, batch)
        return label_loss(teacher(unit_pixels([e.image for e in examples])), label_batch(examples))

    log = fit("Teacher CNN", list(teacher.parameters()), step_loss, steps, batch, lr, progress=progress,
              one_cycle=False)
    teacher.eval().requires_grad_(False)
    return teacher, log


def label_accuracy(teacher: Teacher, examples: list[Example]) -> dict[str, float]:
    """Share of scenes whose whole colour set / shape set the teacher gets right (threshold 0)."""
    with torch.no_grad():
        predicted = teacher(unit_pixels([e.image for e in examples])) > 0
    truth = label_batch(examples) > 0.5
    groups = {"colours": slice(0, 6), "shapes": slice(6, 11)}
    return {name: float((predicted[:, part] == truth[:, part]).all(dim=1).float().mean())
            for name, part in groups.items()}


class Distiller(nn.Module):
    """The hint loss: MSE between a linear projection of a ViT's patch-token grid and the teacher's standardised
    feature grid at the same places (the teacher's grid is pooled to the ViT's when they differ)."""

    def __init__(self, teacher: Teacher, width: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.projection = nn.Linear(width, CHANNELS[-1])

    def forward(self, grid: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """`grid`: the student's (B, D, h, w) patch tokens; `pixels`: the same images as `unit_pixels` gives."""
        with torch.no_grad():
            target = self.teacher.features(pixels)
            if target.shape[-2:] != grid.shape[-2:]:
                target = F.adaptive_avg_pool2d(target, grid.shape[-2:])
            target = target.flatten(2).transpose(1, 2)
            target = (target - target.mean(dim=(0, 1))) / (target.std(dim=(0, 1)) + 1e-5)
        return F.mse_loss(self.projection(grid.flatten(2).transpose(1, 2)), target)
