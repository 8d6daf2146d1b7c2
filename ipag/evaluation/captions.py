"""Caption quality against references: the COCO caption metrics, and CLIP-based scores.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D come from `pycocoevalcap`, the COCO caption evaluation code that
captioning papers report, with its PTB tokenisation: numbers are comparable with published ones, and it runs
offline (METEOR's jar ships its paraphrase table; it and the tokenizer need Java). SPICE is left out: its jar
downloads Stanford CoreNLP models on first use.

CLIP gives two more views (captions compared through CLIP text embeddings; Hessel et al. 2021 score
the caption against the image itself):
- text similarity: mean cosine between the caption's and each reference's CLIP text embedding;
- CLIPScore: w·max(cos(image, "A photo depicts " + caption), 0) with w = 2.5, reference-free.
Both use the explainer's own CLIP (`ipag.grounding.ClipModel`), so they work with any open_clip model and
offline; torchmetrics' CLIPScore would need Hugging Face CLIP weights.
"""

from __future__ import annotations

import inspect
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from tqdm import tqdm

from ..explainer import Explainer
from ..grounding import ClipModel
from ..images import ImageError, load_image
from ..settings import DEFAULTS, Settings
from .bias import gender_bias
from .report import summarize

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
#: Hessel et al. (2021) prefix every candidate with this before embedding it, and rescale by this weight.
CLIPSCORE_PREFIX = "A photo depicts "
CLIPSCORE_WEIGHT = 2.5
#: Texts per CLIP text-tower call: a whole dataset's references at once would not fit a CPU's memory.
TEXT_BATCH = 256


class MetricUnavailableError(RuntimeError):
    """A metric's runtime is missing (Java for METEOR and the PTB tokenizer); the message says how to fix it."""


def require_java() -> None:
    """Raise `MetricUnavailableError` unless Java is on PATH (METEOR and the PTB tokenizer are Java programs)."""
    if shutil.which("java") is None:
        raise MetricUnavailableError(
            "METEOR and the COCO (PTB) tokenizer run on Java, and no `java` was found on PATH. Fix: install a "
            "Java runtime (Debian/Ubuntu: apt-get install default-jre-headless; macOS: brew install openjdk).")


def coco_metrics(references: Mapping[str, Sequence[str]],
                 candidates: Mapping[str, str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(corpus scores, per-image scores) for the images of `candidates`, as the COCO caption evaluation computes
    them: both sides PTB-tokenised and lower-cased, punctuation dropped. BLEU ("closest" reference length) and
    METEOR pool their statistics over the corpus; ROUGE-L and CIDEr average the per-image scores."""
    require_java()
    images = list(candidates)
    tokenizer = PTBTokenizer()
    try:
        gts = tokenizer.tokenize({image: [{"caption": text} for text in references[image]] for image in images})
        res = tokenizer.tokenize({image: [{"caption": candidates[image]}] for image in images})
    except OSError as err:  # it writes its input next to its jar, inside the installed package
        raise MetricUnavailableError(f"The COCO tokenizer could not run ({err}). It writes a temporary file into "
                                     f"{Path(inspect.getfile(PTBTokenizer)).parent}: install "
                                     "pycocoevalcap somewhere writable (e.g. a virtual environment).") from err
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    results = [(f"BLEU-{n + 1}", bleu[n], bleu_each[n]) for n in range(4)]
    for name, scorer in (("METEOR", Meteor), ("ROUGE-L", Rouge), ("CIDEr", Cider)):
        score, each = scorer().compute_score(gts, res)
        results.append((name, score, each))
    corpus = {name: float(score) for name, score, _ in results}
    per_image = {image: {name: float(each[i]) for name, _, each in results} for i, image in enumerate(images)}
    return corpus, per_image


def clip_text_similarity(candidate: torch.Tensor, references: torch.Tensor) -> float:
    """Mean cosine between a caption's L2-normalised text embedding (D,) and its references' (R, D)."""
    return float((references @ candidate).mean())


def clip_score(image: torch.Tensor, caption: torch.Tensor) -> float:
    """CLIPScore (Hessel et al. 2021) of L2-normalised embeddings: w·max(cos, 0), in [0, w]."""
    return CLIPSCORE_WEIGHT * max(float(image @ caption), 0.0)


def encode_texts(clip: ClipModel, texts: Sequence[str]) -> torch.Tensor:
    """CLIP text embeddings (N, D), `TEXT_BATCH` texts at a time."""
    return torch.cat([clip.encode_text(texts[start:start + TEXT_BATCH]) for start in range(0, len(texts), TEXT_BATCH)])


def clip_metrics(clip: ClipModel, image_embeddings: Mapping[str, torch.Tensor], candidates: Mapping[str, str],
                 references: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per image: "CLIP text similarity" and "CLIPScore" (see the module docstring)."""
    images = list(candidates)
    plain = encode_texts(clip, [candidates[image] for image in images])
    prefixed = encode_texts(clip, [CLIPSCORE_PREFIX + candidates[image] for image in images])
    flat = [text for image in images for text in references[image]]
    embedded = encode_texts(clip, flat).split([len(references[image]) for image in images])
    return {image: {"CLIP text similarity": clip_text_similarity(plain[i], embedded[i]),
                    "CLIPScore": clip_score(image_embeddings[image], prefixed[i])}
            for i, image in enumerate(images)}


def evaluate_captions(explainer: Explainer, images: Mapping[str, Path], references: Mapping[str, Sequence[str]],
                      settings: Settings = DEFAULTS) -> dict[str, Any]:
    """Caption every image and score the captions: COCO metrics, CLIP metrics (when the explainer has a CLIP)
    and gender bias. An image that cannot be read is reported under "failed" and left out."""
    generated: dict[str, str] = {}
    embeddings: dict[str, torch.Tensor] = {}
    failed: list[dict[str, str]] = []
    for name, path in tqdm(images.items(), desc="Captioning", unit="image"):
        try:
            rgb = load_image(path)
        except ImageError as err:
            failed.append({"image": name, "error": str(err)})
            tqdm.write(f"skipped {name}: {err}", file=sys.stderr)
            continue
        generated[name] = explainer.caption(rgb, settings).text
        if explainer.clip is not None:
            embeddings[name] = explainer.clip.encode_images([rgb])[0]
    metrics: dict[str, Any] = {}
    per_image = {name: {} for name in generated}
    if generated:
        corpus, coco_each = coco_metrics(references, generated)
        metrics.update(corpus)
        for name, scores in coco_each.items():
            per_image[name].update(scores)
        if explainer.clip is not None:
            clip_each = clip_metrics(explainer.clip, embeddings, generated, references)
            for name, scores in clip_each.items():
                per_image[name].update(scores)
            for metric in ("CLIP text similarity", "CLIPScore"):
                metrics[metric] = summarize(scores[metric] for scores in clip_each.values())
    return {
        "images": len(generated),
        "metrics": metrics,
        "gender_bias": gender_bias(generated, references),
        "per_image": [{"image": name, "caption": generated[name], "references": list(references[name]),
                       **per_image[name]} for name in generated],
        "failed": failed,
    }
