"""Training the synthetic captioner and CLIP on freshly generated scenes (`python -m ipag train-synthetic`).

Every step draws new scenes (seeds from `scenes.TRAINING_SEEDS_START` on, never the held-out ones), so the
models cannot memorise a training set, and the run is deterministic given its seed and thread count.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from ..captioners.blip import BlipCaptioner
from ..evaluation.groundtruth import quick_check
from ..explainer import Explainer
from ..grounding.clip import ClipModel
from ..grounding.composite import backdrop, paste
from .models import CAPTIONER_FOLDER, CLIP_FOLDER, CLIP_WEIGHTS_FILE, new_captioner, new_clip, write_clip_config
from .scenes import TRAINING_SEEDS_START, Scene, generate_scene


@dataclass
class TrainingLog:
    """What a training run did, for the summary and the models' README."""

    steps: int
    batch: int
    seconds: float
    losses: list[float]

    def final_loss(self, window: int = 50) -> float:
        return float(np.mean(self.losses[-window:]))

    def describe(self) -> dict[str, Any]:
        return {"steps": self.steps, "batch": self.batch, "seconds": round(self.seconds, 1),
                "seconds_per_step": round(self.seconds / self.steps, 3), "final_loss": round(self.final_loss(), 4)}


def training_scenes(stream: int, step: int, batch: int) -> list[Scene]:
    """The scenes of one training step; `stream` keeps the captioner's and CLIP's draws apart."""
    first = TRAINING_SEEDS_START + stream * 100_000_000 + step * batch
    return [generate_scene(seed) for seed in range(first, first + batch)]


def pixel_batch(captioner: BlipCaptioner, images: Sequence[Image.Image]) -> torch.Tensor:
    """The captioner's input for a batch of scenes: its processor's rescale and normalisation done in torch.

    Scenes are already at the model's input size, where the processor's resize is the identity; its
    per-image Python loop would cost as much as a training step (a test checks both agree).
    """
    processor = captioner.image_processor
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    mean = torch.tensor(processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_std)[:, None, None]
    return (pixels.float() * processor.rescale_factor - mean) / std


def caption_ids(captioner: BlipCaptioner, captions: Sequence[str]) -> torch.Tensor:
    """[DEC] caption [SEP], padded with [PAD]: exactly the sequences `BlipCaptioner.generate` produces."""
    sequences = [[*captioner.start_ids(), *captioner.tokenize(text), captioner.tokenizer.sep_token_id]
                 for text in captions]
    length = max(map(len, sequences))
    pad = captioner.tokenizer.pad_token_id
    return torch.tensor([sequence + [pad] * (length - len(sequence)) for sequence in sequences])


def captioner_loss(captioner: BlipCaptioner, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of every caption token after [DEC] (padding ignored)."""
    pad = captioner.tokenizer.pad_token_id
    logits, _ = captioner._forward(pixels, ids, captioner.num_decoder_layers - 1)
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_captioner(steps: int, batch: int = 32, lr: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> tuple[BlipCaptioner, TrainingLog]:
    """Train `models.new_captioner(seed)` for `steps` AdamW steps on a one-cycle schedule."""
    captioner = new_captioner(seed)
    model = captioner.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="Captioner", unit="step", disable=not progress)
    for step in bar:
        scenes = training_scenes(0, step, batch)
        loss = captioner_loss(captioner, pixel_batch(captioner, [s.image for s in scenes]),
                              caption_ids(captioner, [s.caption for s in scenes]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval().requires_grad_(False)
    return captioner, TrainingLog(steps, batch, time.perf_counter() - start, losses)


# --- CLIP ------------------------------------------------------------------------------------------------------

#: What a view shows: ("scene", caption) for the whole image, ("object", colour, shape) for one object alone
#: in focus, None for a region the grounder must never choose for any word (it holds no single whole object).
ViewLabel = tuple[str, ...] | None


def grounding_views(scene: Scene, rng: np.random.Generator) -> list[tuple[np.ndarray, ViewLabel]]:
    """The regions CLIP learns to tell apart on one scene: the proposals the grounder will compare.

    The grounder's softmax runs over the whole image, each segment (objects and pieces of background) and
    unions of pairs, so an object alone must beat the whole image, an object plus some background and two
    objects together for its own words; a piece of background must win for none.
    """
    masks = scene.masks
    whole = np.ones_like(masks[0])
    background = ~np.logical_or.reduce(masks)
    rows, cols = np.indices(whole.shape)
    cut = rng.uniform(0.25, 0.75) * whole.shape[0]
    piece = background & [rows < cut, rows >= cut, cols < cut, cols >= cut][int(rng.integers(4))]
    views: list[tuple[np.ndarray, ViewLabel]] = [(whole, ("scene", scene.caption)), (piece, None)]
    views += [(mask, ("object", obj.colour, obj.shape)) for obj, mask in zip(scene.objects, masks)]
    views += [(mask | piece, None) for mask in masks]
    if len(masks) > 1:
        first, second = rng.choice(len(masks), size=2, replace=False)
        views.append((masks[first] | masks[second], None))
    return views


def grounding_texts(scene: Scene) -> list[tuple[str, tuple[str, ...]]]:
    """The queries of one scene, each with what it asks for: every content word, each object's phrase, and
    the caption (which only the whole image matches)."""
    texts = [(scene.caption, ("scene", scene.caption))]
    for obj in scene.objects:
        texts += [(obj.colour, ("colour", obj.colour)), (obj.shape, ("shape", obj.shape)),
                  (f"{obj.colour} {obj.shape}", ("phrase", obj.colour, obj.shape))]
    return texts


def matches(query: tuple[str, ...], view: ViewLabel) -> bool:
    """Whether a view is a right answer to a query (across scenes too: any red object alone is "red")."""
    if view is None:
        return False
    if query[0] == "scene" or view[0] == "scene":
        return query == view
    _, colour, shape = view
    return {"colour": query[1:] == (colour,), "shape": query[1:] == (shape,),
            "phrase": query[1:] == (colour, shape)}[query[0]]


def clip_pixels(clip: ClipModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP's input for a batch of scene-sized images: its transform's normalisation done in torch (its resize
    is the identity at the model's input size; a test checks both agree)."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
    mean = torch.tensor(clip.model.visual.image_mean)[:, None, None]
    std = torch.tensor(clip.model.visual.image_std)[:, None, None]
    return (pixels.float() / 255 - mean) / std


def clip_batch(scenes: Sequence[Scene], rng: np.random.Generator,
               template: str) -> tuple[list[Image.Image], list[str], torch.Tensor]:
    """Composites (region sharp, the rest blurred, as the grounder makes them), prompts, and which match."""
    images, labels, prompts = [], [], {}
    for scene in scenes:
        pixels = np.asarray(scene.image)
        blurred = backdrop(scene.image)
        for mask, label in grounding_views(scene, rng):
            images.append(paste(pixels, blurred, mask))
            labels.append(label)
        for text, query in grounding_texts(scene):
            prompts.setdefault(template.format(text), query)
    positive = torch.tensor([[matches(query, label) for label in labels] for query in prompts.values()])
    return images, list(prompts), positive


def clip_loss(clip: ClipModel, images: Sequence[Image.Image], prompts: Sequence[str],
              positive: torch.Tensor) -> torch.Tensor:
    """Contrastive loss with several right answers per row: −log of the probability mass on them, for each
    prompt over all images (the grounder's direction) and for each matching image over all prompts."""
    model = clip.model
    images_embedded = model.encode_image(clip_pixels(clip, images), normalize=True)
    texts_embedded = model.encode_text(clip.tokenizer(list(prompts)), normalize=True)
    logits = model.logit_scale.exp() * texts_embedded @ images_embedded.T
    by_text = _multi_positive(logits, positive)
    has_text = positive.any(dim=0)
    by_image = _multi_positive(logits.T[has_text], positive.T[has_text])
    return (by_text + by_image) / 2


def _multi_positive(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −log Σ_positives softmax(row)."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def train_clip(steps: int, batch: int = 16, lr: float = 1e-3, seed: int = 0, template: str = "a photo of {}",
               progress: bool = True) -> tuple[ClipModel, TrainingLog]:
    """Train `models.new_clip(seed)` for `steps` AdamW steps on a one-cycle schedule."""
    clip = new_clip(seed)
    model = clip.model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="CLIP", unit="step", disable=not progress)
    for step in bar:
        loss = clip_loss(clip, *clip_batch(training_scenes(1, step, batch), rng, template))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP does: a larger scale makes training unstable
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval().requires_grad_(False)
    clip.logit_scale = float(model.logit_scale.exp())
    return clip, TrainingLog(steps, batch, time.perf_counter() - start, losses)


# --- both, as `python -m ipag train-synthetic` -------------------------------------------------------------------

#: The shipped models' schedule (see models/README.md for what it reached and how long it took).
CAPTIONER_STEPS = 3000
CLIP_STEPS = 400
#: Held-out scenes the summary checks the saved models on.
CHECK_SCENES = 200


def train_synthetic(out: Path, captioner_steps: int = CAPTIONER_STEPS, clip_steps: int = CLIP_STEPS,
                    seed: int = 0) -> dict[str, Any]:
    """Train both models, save them into `out` (synthetic-blip/, synthetic-clip/), reload them as
    `Explainer.synthetic` would and check them on held-out scenes; the summary also goes to out/training.json."""
    threads = torch.get_num_threads()
    print(f"Training the synthetic captioner and CLIP on {threads} CPU thread(s)", file=sys.stderr)
    captioner, captioner_log = train_captioner(captioner_steps, seed=seed)
    captioner.save_pretrained(out / CAPTIONER_FOLDER.name)
    clip, clip_log = train_clip(clip_steps, seed=seed)
    save_clip(clip, out / CLIP_FOLDER.name)
    explainer = Explainer.synthetic("cpu", folder=out)
    check = quick_check(explainer, range(CHECK_SCENES))
    summary = {"threads": threads, "seed": seed, "captioner": captioner_log.describe(),
               "clip": clip_log.describe(), "held_out": check, "sizes_mb": folder_sizes(out)}
    (out / "training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def save_clip(clip: ClipModel, folder: Path) -> None:
    """open_clip's local-folder layout: weights as float16 safetensors (half the size; the checks above run on
    the saved weights) and `open_clip_config.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.half().contiguous() for name, tensor in clip.model.state_dict().items()},
              folder / CLIP_WEIGHTS_FILE)
    write_clip_config(folder)


def folder_sizes(out: Path) -> dict[str, float]:
    return {folder.name: round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 2)
            for folder in (out / CAPTIONER_FOLDER.name, out / CLIP_FOLDER.name)}
