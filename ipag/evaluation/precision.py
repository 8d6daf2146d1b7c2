"""`python -m ipag check-precision`: may a stage of the models' work run in bfloat16? Only where its results
agree with float32 on generated scenes, whose evidence is known (`ipag.precision` runs in bfloat16 the stages
this check accepted).

On each held-out scene, every content word of the true caption is explained with every map and every Grad-CAM
weighting (the ground-truth benchmark's settings, `EVALUATED`, with grounding) in float32, and again with one
stage at a time in bfloat16 (the rest float32). Per map, over all words: the mean Spearman ρ between the two
maps, and the pointing game against the word's true object in each. A stage is accepted when every map keeps
ρ ≥ `SPEARMAN_AT_LEAST` and its pointing game within `POINTING_WITHIN`; its captions must also stay the same
(caption stage; on at least `SPEARMAN_AT_LEAST` of the scenes) and the grounding's right-object rate within
`POINTING_WITHIN` (CLIP stage). Maps a stage does not compute come out equal, and pass.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..explainer import Explainer
from ..precision import STAGES, Precision
from ..sanity import rank_correlation
from ..synthetic.scenes import generate_scene
from .groundtruth import EVALUATED, RIGHT_OBJECT_IOU, content_words, iou, map_label, map_order, true_caption, word_maps
from .localisation import pointing_game
from .report import format_table

SPEARMAN_AT_LEAST = 0.95
POINTING_WITHIN = 0.02
#: The settings the check explains with: the ground-truth benchmark's, with the region (CLIP's stage).
CHECKED = EVALUATED


def with_precision(explainer: Explainer, precision: Precision) -> Explainer:
    """An explainer on the same models (weights shared, not copied) computing in `precision`, with a cache of
    its own, so that results of one precision are never read as another's."""
    captioner = copy.copy(explainer.captioner)
    clip = copy.copy(explainer.clip) if explainer.clip is not None else None
    for model in (captioner, clip):
        if model is not None:
            model.precision = precision
    return Explainer(captioner, clip, explainer.default_segmenter, explainer.segmenter_options)


def precision_record(explainer: Explainer, seed: int, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    """Scene `seed` explained in float32 and with each of `stages` alone in bfloat16 (JSON-ready): per stage,
    whether the caption stayed the same, and per content word each map's ρ with float32 and its pointing game
    (float32, bfloat16) and whether the region chose the true object (float32, bfloat16)."""
    scene = generate_scene(seed)
    reference = with_precision(explainer, Precision())
    truth = true_caption(reference, scene)
    expected, expected_maps = word_maps(reference, scene, truth, CHECKED)
    caption = reference.caption(scene.image, CHECKED).text
    record: dict[str, Any] = {"seed": seed, "stages": {}}
    for stage in stages:
        other = with_precision(explainer, Precision(frozenset({stage})))
        found, found_maps = word_maps(other, scene, truth, CHECKED)
        words = []
        for index, first, second, maps, again in zip(content_words(scene), expected, found, expected_maps,
                                                     found_maps):
            mask = scene.evidence[index][1].ravel()
            words.append({
                "word_index": index,
                "maps": {key: {"spearman": agreement(maps[key], again[key]),
                               "pointing": [pointing_game(np.maximum(values, 0).ravel(), mask)
                                            for values in (maps[key], again[key])]}
                         for key in maps if key in again},
                "right_object": [_right(explanation, scene.evidence[index][1]) for explanation in (first, second)],
            })
        record["stages"][stage] = {"same_caption": other.caption(scene.image, CHECKED).text == caption,
                                   "words": words}
    return record


def agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman's ρ of two maps; two constant maps agree when they are equal (ρ is undefined for them)."""
    value = rank_correlation(first, second)
    if np.isnan(value):
        return 1.0 if np.array_equal(first, second) else 0.0
    return value


def _right(explanation, mask: np.ndarray) -> bool | None:
    grounding = explanation.grounding
    return None if grounding is None else iou(grounding.mask, mask) >= RIGHT_OBJECT_IOU


def precision_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per stage: per map the mean ρ and the pointing games, the share of scenes with the same caption, the
    right-object rates, and whether the stage is accepted (and which checks failed)."""
    summary = {}
    for stage in records[0]["stages"]:
        words = [word for record in records for word in record["stages"][stage]["words"]]
        maps = {}
        for key in map_order(key for word in words for key in word["maps"]):
            scores = [word["maps"][key] for word in words if key in word["maps"]]
            pointing = np.mean([score["pointing"] for score in scores], axis=0)
            spearman = float(np.mean([score["spearman"] for score in scores]))
            maps[key] = {"spearman": spearman, "pointing_float32": float(pointing[0]),
                         "pointing_bfloat16": float(pointing[1]),
                         "passes": bool(spearman >= SPEARMAN_AT_LEAST and abs(pointing[1] - pointing[0]) <= POINTING_WITHIN)}
        same = float(np.mean([record["stages"][stage]["same_caption"] for record in records]))
        right = [word["right_object"] for word in words if None not in word["right_object"]]
        rates = np.mean(right, axis=0).tolist() if right else None
        failed = [key for key, scores in maps.items() if not scores["passes"]]
        if same < SPEARMAN_AT_LEAST:
            failed.append("caption")
        if rates is not None and abs(rates[1] - rates[0]) > POINTING_WITHIN:
            failed.append("region")
        summary[stage] = {"maps": maps, "same_caption": same, "right_object": rates, "words": len(words),
                          "scenes": len(records), "failed": failed, "accepted": not failed}
    return summary


def precision_table(summary: Mapping[str, Any]) -> str:
    """What `check-precision` prints: per stage its verdict, then per map ρ and the pointing games."""
    lines = []
    for stage, result in summary.items():
        verdict = "ACCEPTED" if result["accepted"] else "rejected (" + ", ".join(map(_label, result["failed"])) + ")"
        rates = result["right_object"]
        region = f"{rates[0]:.3f} → {rates[1]:.3f}" if rates else "—"
        lines += [f"Stage '{stage}' in bfloat16: {verdict}. {result['scenes']} scenes, {result['words']} content words; "
                  f"same caption on {result['same_caption']:.0%} of the scenes; right object (float32 → bfloat16) {region}.",
                  format_table(["Map", "Spearman ρ with float32", "pointing game float32 → bfloat16", "passes"],
                               [[map_label(key), f"{scores['spearman']:.3f}",
                                 f"{scores['pointing_float32']:.3f} → {scores['pointing_bfloat16']:.3f}",
                                 "yes" if scores["passes"] else "NO"] for key, scores in result["maps"].items()]),
                  ""]
    lines.append(f"Accepted: ρ ≥ {SPEARMAN_AT_LEAST} and pointing game within {POINTING_WITHIN} for every map, the same "
                 f"caption on ≥ {SPEARMAN_AT_LEAST:.0%} of the scenes, the right-object rate within {POINTING_WITHIN}.")
    return "\n".join(lines)


def _label(key: str) -> str:
    return key if key in ("caption", "region") else map_label(key)
