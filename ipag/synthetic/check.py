"""How well a synthetic captioner captions held-out scenes: exact match, colour and shape words, by object count.

Used after training (`train.py`'s summary, `models/training.json`), by the shipped models' tests, and by
`evaluate-groundtruth`, which reports the same numbers from its own captions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..align import align
from ..captioners import load_captioner
from .scenes import generate_scene, word_kind


def caption_scores(truth: str, said: str) -> dict[str, Any]:
    """One caption against the true one: exact match, and for each colour and shape word of the truth whether the
    caption has the same word at the same place (words are compared in order, commas apart)."""
    true_words, said_words = truth.replace(",", " ,").split(), said.replace(",", " ,").split()
    scores: dict[str, Any] = {"exact": said == truth, "colour": [], "shape": []}
    for index, word in enumerate(true_words):
        kind = word_kind(word)
        if kind != "function":
            scores[kind].append(index < len(said_words) and said_words[index] == word)
    return scores


def caption_report(captions: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over captions (each a mapping with "truth", "caption" and "objects"): exact match, colour and shape
    words, each overall and per object count."""
    rows = [(caption["objects"], caption_scores(caption["truth"], caption["caption"])) for caption in captions]

    def accuracy(selected: list[dict[str, Any]]) -> dict[str, float]:
        words = {kind: [right for scores in selected for right in scores[kind]] for kind in ("colour", "shape")}
        return {"scenes": len(selected), "exact_match": float(np.mean([s["exact"] for s in selected])),
                "colour_words": float(np.mean(words["colour"])), "shape_words": float(np.mean(words["shape"]))}

    counts = sorted({objects for objects, _ in rows})
    return accuracy([s for _, s in rows]) | {
        "by_objects": {str(count): accuracy([s for objects, s in rows if objects == count]) for count in counts}}


def caption_check(folder: Path, seeds: Iterable[int]) -> dict[str, Any]:
    """`caption_report` of the captioner saved in `folder`, loaded as `Explainer.synthetic` loads it, on the
    held-out scenes `seeds` (greedy captions)."""
    captioner = load_captioner(str(folder), torch.device("cpu"))
    captions = []
    for seed in seeds:
        scene = generate_scene(seed)
        ids = captioner.generate(captioner.preprocess(scene.image))
        said, _ = align(captioner.pieces(ids), ids, [0.0] * len(ids))  # the caption text as the page shows it
        captions.append({"truth": scene.caption, "caption": said, "objects": len(scene.objects)})
    return caption_report(captions)
