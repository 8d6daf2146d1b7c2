"""Training the synthetic captioners and CLIP on freshly generated scenes (`python -m ipag train-synthetic`).

The recipe (models/README.md has what it reached, what it cost and what did not work):

1. a small CNN, the *teacher*, learns which colours and shapes a scene holds and how many objects
   (image-level labels only; `teacher.py`);
2. each captioner learns to caption (teacher-forced cross-entropy on the true caption) while a linear projection
   of its vision tower's last patch tokens is regressed onto the teacher's feature grid (`teacher.Distiller`);
   its vision tower starts from a mimetic initialisation (`models.locality_init`);
3. CLIP learns which texts describe which scenes (a contrastive loss with several right answers and near-miss
   captions as hard negatives) and, through a small decoder discarded afterwards, to caption them (CoCa), with
   the same distillation and initialisation.

Every step sees `data.Example`s only (pictures, captions, image-level labels: never a mask, box or position), drawn
fresh from training seeds, so the runs are deterministic given the seed and the thread count.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from safetensors.torch import load_file, save_file

from ..captioners.base import Captioner, capture_output
from ..grounding.clip import ClipModel
from .check import caption_check
from .data import Example, held_out_examples, normalized, training_examples, unit_pixels
from .fit import TrainingLog, fit, seeded
from .models import CLIP_FOLDER, CLIP_WEIGHTS_FILE, FAMILIES, TEACHER_FOLDER, new_blip, new_clip, write_clip_config
from .scenes import COLOURS, SHAPES, SIZE, describe, pairs_of
from .teacher import TEACHER_STEPS, Distiller, Teacher, label_accuracy, train_teacher

#: The shipped models' schedules (see models/README.md for what they reached and how long they took).
CAPTIONER_STEPS = 4000
CLIP_STEPS = 5000
#: Weights of the distillation loss and of CLIP's captioning loss next to each model's own loss.
DISTILL_WEIGHT = 1.0
CAPTIONING_WEIGHT = 1.0
#: Held-out scenes the summary checks the saved models on.
CHECK_SCENES = 200


# --- captioners --------------------------------------------------------------------------------------------------

def pixel_batch(captioner: Captioner, images: Sequence[Image.Image]) -> torch.Tensor:
    """The captioner's input for a batch of scenes: its processor's rescale and normalisation done in torch (a test
    checks both agree)."""
    processor = captioner.image_processor
    return normalized(images, processor.image_mean, processor.image_std, processor.rescale_factor)


def caption_ids(captioner: Captioner, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """start + caption + end, padded (with the end token): exactly the sequences `Captioner.generate` produces,
    and which positions the captioner writes (the caption and its end; not the start — a vision-language model's
    whole prompt, image tokens included — and not the padding: GPT-2 pads with its end token, so padding is told
    apart by length)."""
    end = captioner.model.generation_config.eos_token_id
    start = captioner.start_ids()
    sequences = [[*start, *captioner.tokenize(text), end] for text in captions]
    length = max(map(len, sequences))
    ids = torch.tensor([sequence + [end] * (length - len(sequence)) for sequence in sequences])
    written = torch.tensor([[len(start) <= index < len(sequence) for index in range(length)] for sequence in sequences])
    return ids, written


def captioner_loss(captioner: Captioner, examples: Sequence[Example],
                   distiller: Distiller | None = None) -> torch.Tensor:
    """Teacher-forced cross-entropy of every caption token after the start (padding ignored), plus
    `DISTILL_WEIGHT` × the distillation loss of the last vision block's patch tokens when a distiller is given."""
    images = [e.image for e in examples]
    ids, written = caption_ids(captioner, [e.caption for e in examples])
    with capture_output(captioner.vision_layers[-1]) as captured:
        logits, _ = captioner._forward(pixel_batch(captioner, images), ids, None)
    loss = caption_cross_entropy(logits, ids, written)
    if distiller is not None:
        loss = loss + DISTILL_WEIGHT * distiller(captioner.vision_grid(captured[0]), unit_pixels(images))
    return loss


def caption_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every written token, predicted by the logits one position earlier."""
    targets = ids[:, 1:].masked_fill(~written[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_captioner(name: str, steps: int, teacher: Teacher | None, batch: int = 32, lr: float = 1e-3,
                    seed: int = 0, progress: bool = True) -> tuple[Captioner, TrainingLog]:
    """Train the synthetic captioner `name` (a `models.FAMILIES` key) for `steps` AdamW steps on a one-cycle
    schedule, distilling `teacher` into its vision tower (None: no distillation)."""
    with seeded(seed):
        captioner = FAMILIES[name].build(seed)
        model = captioner.model.train().requires_grad_(True)
        distiller = None if teacher is None else Distiller(teacher, vision_width(captioner))
        parameters = list(model.parameters()) + ([] if distiller is None else list(distiller.projection.parameters()))
        log = fit(f"Captioner {name}", parameters,
                  lambda step: captioner_loss(captioner, training_examples(name, step, batch), distiller),
                  steps, batch, lr, progress=progress)
    model.eval().requires_grad_(False)
    return captioner, log


def vision_width(captioner: Captioner) -> int:
    """Channels of the captioner's last vision block as a patch grid (one forward of a blank scene)."""
    with torch.no_grad(), capture_output(captioner.vision_layers[-1]) as captured:
        captioner._forward(pixel_batch(captioner, [Image.new("RGB", (SIZE, SIZE))]), caption_ids(captioner, [""])[0],
                           None)
    return captioner.vision_grid(captured[0]).shape[1]


# --- CLIP ----------------------------------------------------------------------------------------------------------

#: What CLIP learns to match: a scene's caption describes that scene; a colour, a shape or a colour-and-shape
#: phrase describes a scene that holds exactly one object, of that colour and/or shape. A scene with more objects
#: is described only by its caption, so CLIP prefers, for "red circle", a picture that shows a red circle and
#: nothing else: the grounder's composite of the right region (image-level texts only; no region is ever shown).
PROMPT = "a photo of {}"


def descriptions(example: Example) -> list[str]:
    """The texts that describe `example` exactly (see `PROMPT`'s comment), without the prompt."""
    texts = [example.caption]
    if example.count == 1:
        (colour,), (shape,) = example.colours, example.shapes
        texts += [colour, shape, f"{colour} {shape}"]
    return texts


def near_misses(example: Example, rng: np.random.Generator) -> list[str]:
    """Captions that differ from `example`'s in one word (one object's shape, one object's colour, each to one the
    scene lacks) and, for a single object, its colour with every other shape. In a batch of random scenes texts
    rarely differ by a shape alone, so without these CLIP can match captions by their colours and never learn the
    shapes (measured: shapes at chance after 2,000 steps)."""
    pairs = pairs_of(example.caption)
    texts = []
    for part, vocabulary, used in ((1, SHAPES, example.shapes), (0, COLOURS, example.colours)):
        changed = [list(pair) for pair in pairs]
        changed[int(rng.integers(len(pairs)))][part] = str(rng.choice(sorted(set(vocabulary) - used)))
        texts.append(describe([(colour, shape) for colour, shape in changed]))
    if example.count == 1:
        (colour,), (shape,) = example.colours, example.shapes
        texts += [f"{colour} {other}" for other in SHAPES if other != shape]
    return texts


def clip_pixels(clip: ClipModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """CLIP's input for a batch of scenes: its transform's normalisation done in torch (a test checks both agree)."""
    visual = clip.model.visual
    return normalized(images, visual.image_mean, visual.image_std)


class CaptioningHead(nn.Module):
    """CoCa's captioning loss for CLIP (Yu et al. 2022, "Contrastive Captioners"): a small text decoder that
    cross-attends to CLIP's patch tokens learns to caption the scene, so the tokens must say which shape is where.

    Measured here: with the contrastive loss alone (and distillation, near misses, even an image-level label loss)
    CLIP's shapes stayed at chance for 2,000 steps; the captioning loss is what the captioners learn shapes from,
    and with it CLIP learns them too. The decoder (that of an untrained synthetic BLIP) is discarded after training.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.captioner = new_blip(seed)  # for its tokenizer and sequence layout; only the decoder is trained
        self.decoder = self.captioner.model.text_decoder

    def forward(self, tokens: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """The captions' cross-entropy given CLIP's (B, N, D) patch tokens."""
        ids, written = caption_ids(self.captioner, captions)
        logits = self.decoder(input_ids=ids, attention_mask=torch.ones_like(ids), encoder_hidden_states=tokens,
                              return_dict=True).logits
        return caption_cross_entropy(logits, ids, written)


def clip_loss(clip: ClipModel, examples: Sequence[Example], distiller: Distiller | None = None,
              captioning: CaptioningHead | None = None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Contrastive loss with several right answers per row (−log of the probability mass on them), for each text
    that describes a scene of the batch over the scenes, and for each scene over all texts (its descriptions and
    everyone's `near_misses`); plus the distillation loss of CLIP's patch tokens and the captioning loss."""
    model = clip.model
    rng = rng or np.random.default_rng(0)
    described = [set(descriptions(e)) for e in examples]
    texts = list(dict.fromkeys([text for found in described for text in sorted(found)]
                               + [text for e in examples for text in near_misses(e, rng)]))
    positive = torch.tensor([[text in found for found in described] for text in texts])
    images = [e.image for e in examples]
    model.visual.output_tokens = True
    try:
        pooled, tokens = model.visual(clip_pixels(clip, images))
    finally:
        model.visual.output_tokens = False
    images_embedded = F.normalize(pooled, dim=-1)
    texts_embedded = model.encode_text(clip.tokenizer([PROMPT.format(text) for text in texts]), normalize=True)
    logits = model.logit_scale.exp() * texts_embedded @ images_embedded.T
    described_texts = positive.any(dim=1)
    loss = (_multi_positive(logits[described_texts], positive[described_texts]) + _multi_positive(logits.T, positive.T)) / 2
    if distiller is not None:
        side = math.isqrt(tokens.shape[1])
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        loss = loss + DISTILL_WEIGHT * distiller(grid, unit_pixels(images))
    if captioning is not None:
        loss = loss + CAPTIONING_WEIGHT * captioning(tokens, [e.caption for e in examples])
    return loss


def _multi_positive(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −log Σ_positives softmax(row)."""
    return (logits.logsumexp(dim=1) - logits.masked_fill(~positive, float("-inf")).logsumexp(dim=1)).mean()


def train_clip(steps: int, teacher: Teacher | None, batch: int = 32, lr: float = 1e-3, seed: int = 0,
               progress: bool = True) -> tuple[ClipModel, TrainingLog]:
    """Train `models.new_clip(seed)` for `steps` AdamW steps on a one-cycle schedule, its temperature learned (and
    clamped at 100, as CLIP does), with a `CaptioningHead` and (given a teacher) distillation."""
    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    with seeded(seed):
        clip = new_clip(seed)
        model = clip.model.train().requires_grad_(True)
        distiller = None if teacher is None else Distiller(teacher, model.visual.transformer.width)
        captioning = CaptioningHead(seed).train()
        parameters = [*model.parameters(), *captioning.parameters(),
                      *([] if distiller is None else distiller.projection.parameters())]
        log = fit("CLIP", parameters, lambda step: clip_loss(clip, training_examples("clip", step, batch), distiller,
                                                            captioning, np.random.default_rng([seed, step])),
                  steps, batch, lr, progress=progress, after_step=clamp)
    model.eval().requires_grad_(False)
    clip.logit_scale = float(model.logit_scale.exp())
    return clip, log


def zero_shot(clip: ClipModel, examples: Sequence[Example]) -> dict[str, float]:
    """On single-object scenes: top-1 accuracy of "a photo of {colour} {shape}" among all 30 pairs and of
    "a photo of {shape}" among the 5 shapes."""
    pairs = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    with torch.no_grad():
        images = clip.model.encode_image(clip_pixels(clip, [e.image for e in examples]), normalize=True)

        def top1(choices: list[str], truth: list[str]) -> float:
            texts = clip.model.encode_text(clip.tokenizer([PROMPT.format(c) for c in choices]), normalize=True)
            picked = (images @ texts.T).argmax(dim=1).tolist()
            return float(np.mean([choices[i] == t for i, t in zip(picked, truth)]))

        return {"colour_shape_among_30": top1(pairs, [f"{min(e.colours)} {min(e.shapes)}" for e in examples]),
                "shape_among_5": top1(list(SHAPES), [min(e.shapes) for e in examples])}


# --- everything, as `python -m ipag train-synthetic` -----------------------------------------------------------------

def train_synthetic(out: Path, captioners: Sequence[str] = tuple(FAMILIES), clip: bool = True,
                    captioner_steps: int = CAPTIONER_STEPS, clip_steps: int = CLIP_STEPS,
                    teacher_steps: int = TEACHER_STEPS, seed: int = 0, check_scenes: int = CHECK_SCENES) -> dict[str, Any]:
    """Train each captioner of `captioners` and (with `clip`) CLIP, distilling the teacher (trained first, or read
    from out/synthetic-teacher/ when a run with the same seed and steps saved it there), save them into `out`
    (`models.FAMILIES` folders, synthetic-clip/), reload them as `Explainer.synthetic` does and check them on
    held-out scenes. Each model's summary is merged into out/training.json, so models can be trained one run at a
    time (or side by side) and keep their entries."""
    threads = torch.get_num_threads()
    print(f"Training on {threads} CPU thread(s): {', '.join(captioners)}{', CLIP' if clip else ''}", file=sys.stderr)
    teacher, summary = cached_teacher(out, teacher_steps, seed, check_scenes)
    for name in captioners:
        captioner, log = train_captioner(name, captioner_steps, teacher, seed=seed)
        captioner.save_pretrained(out / FAMILIES[name].folder)
        summary[name] = log.describe() | {"threads": threads, "seed": seed,
                                          "held_out": caption_check(out / FAMILIES[name].folder, range(check_scenes))}
        summary = _merge_summary(out, name, summary[name])
    if clip:
        model, log = train_clip(clip_steps, teacher, seed=seed)
        save_clip(model, out / CLIP_FOLDER.name)
        single = [e for e in held_out_examples(3 * check_scenes) if e.count == 1]
        summary = _merge_summary(out, "clip", log.describe() | {
            "threads": threads, "seed": seed, "logit_scale": round(model.logit_scale, 2),
            "held_out_single_objects": len(single)} | zero_shot(model, single))
    summary = _merge_summary(out, "sizes_mb", folder_sizes(out))
    print(json.dumps(summary, indent=2))
    return summary


def cached_teacher(out: Path, steps: int, seed: int, check_scenes: int) -> tuple[Teacher, dict[str, Any]]:
    """The teacher of this seed and schedule: read from out/synthetic-teacher/ if a run saved it, else trained and
    saved there (so a later run that trains another model distils the very same teacher)."""
    path = out / TEACHER_FOLDER / f"teacher-seed{seed}-steps{steps}.safetensors"
    teacher = Teacher()
    if path.exists():
        teacher.load_state_dict(load_file(path))
        teacher.eval().requires_grad_(False)
        return teacher, _merge_summary(out)
    teacher, log = train_teacher(steps, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(teacher.state_dict(), path)
    return teacher, _merge_summary(out, "teacher", log.describe() | {
        "threads": torch.get_num_threads(), "seed": seed} | label_accuracy(teacher, held_out_examples(check_scenes)))


def _merge_summary(out: Path, name: str | None = None, entry: Any = None) -> dict[str, Any]:
    """out/training.json with `name` set to `entry` (read back first, so runs side by side keep each other's)."""
    path = out / "training.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    if name is not None:
        summary[name] = entry
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))
    return summary


def save_clip(clip: ClipModel, folder: Path) -> None:
    """open_clip's local-folder layout: weights as float16 safetensors (half the size; the checks run on the saved
    weights) and `open_clip_config.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.half().contiguous() for name, tensor in clip.model.state_dict().items()},
              folder / CLIP_WEIGHTS_FILE)
    write_clip_config(folder)


def folder_sizes(out: Path) -> dict[str, float]:
    """Size in MB of each model folder in `out`."""
    folders = [out / family.folder for family in FAMILIES.values()] + [out / CLIP_FOLDER.name, out / TEACHER_FOLDER]
    return {folder.name: round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6, 2)
            for folder in folders if folder.is_dir()}


