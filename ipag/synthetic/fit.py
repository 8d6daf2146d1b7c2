"""The training loop every synthetic model shares: AdamW on a loss per step, with a progress bar and a log."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


@dataclass
class TrainingLog:
    """What a training run did, for the summary (`models/training.json`) and the models' README."""

    steps: int
    batch: int
    seconds: float
    losses: list[float]

    def final_loss(self, window: int = 50) -> float:
        return float(np.mean(self.losses[-window:]))

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch": self.batch, "seconds": round(self.seconds, 1),
                "seconds_per_step": round(self.seconds / self.steps, 3), "final_loss": round(self.final_loss(), 4)}


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside the block, torch's global generator starts from `seed` (and is restored after): everything a
    training run draws — initial weights, dropout — is then the same in every run, whatever ran before it in the
    process (torch seeds its global generator differently in every process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fit(name: str, parameters: Sequence[nn.Parameter], step_loss: Callable[[int], torch.Tensor], steps: int,
        batch: int, lr: float, weight_decay: float = 0.01, one_cycle: bool = True, progress: bool = True,
        after_step: Callable[[], None] | None = None) -> TrainingLog:
    """Minimise `step_loss(step)` for `steps` AdamW steps (a one-cycle learning rate peaking at `lr`, or a constant
    one); `after_step` runs after each update (e.g. to clamp a temperature)."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
                if one_cycle else None)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=name, unit="step", disable=not progress)
    for step in bar:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if after_step is not None:
            after_step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return TrainingLog(steps, batch, time.perf_counter() - start, losses)
