"""`python -m ipag evaluate-groundtruth`: every map and the grounding scored against evidence we know exactly.

On held-out generated scenes (`ipag.synthetic`, seeds never used in training) every content word (a colour or a
shape) names exactly one object, whose mask is the word's evidence. For each scene:

- the captioner: does its own caption match the scene's true caption exactly;
- every content word of the *true* caption, teacher-forced (so a word is scored whether or not the model
  would have said it, and every map explains the same target), explained with every map of `MAP_TYPES`, every
  Grad-CAM weighting and SmoothGrad, and scored against the mask (`localisation`: pointing game, relevance
  mass and rank accuracy, AUROC), next to two baselines, a random map on the Grad-CAM grid and a centre prior;
- the grounding: is the region chosen for the word its object (IoU ≥ 0.5), and if not, was the object among the
  proposals at all; the region's precision and coverage on the object, its area and probability
  (`localisation.region_record`; `python -m ipag evaluate-grounding` compares grounding settings this way);
- the counterfactual: Δlog p(word) when the word's own object is removed from the scene, against removing
  another object (a captioner that uses the evidence loses the word only in the first case);
- on the first `sanity_scenes` scenes, the cascading randomisation check (Adebayo et al. 2018): each map's rank
  correlation with the same map after re-initialising the captioner's top 1, 2, … vision blocks.

Each scene is one item of `ipag.batch.run_items` (here, or on Ray with `--ray`), and the summary is computed from
the per-scene records alone, so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution import target_gradients
from ..explainer import Explainer
from ..maps import CAM_METHODS, GradCAMMap, MapContext, MapType, SaliencyMap, map_titles
from ..results import Caption, Explanation
from ..sanity import FLAG_ABOVE
from ..settings import Settings
from ..synthetic.check import caption_report
from ..synthetic.scenes import COLOURS, Scene, generate_scene
from ..target import Target
from .localisation import (
    METRICS,
    RIGHT_OBJECT_IOU,
    centre_prior,
    iou,
    random_map,
    region_record,
    region_summary,
    score_map,
)
from .report import describe, format_table, summarize

#: What the benchmark explains with: the page's defaults plus the maps that are off by default on CPU.
EVALUATED = Settings(occlusion=True, integrated_gradients=True, verify=False)
#: The map variants the page computes only when its settings ask: every other Grad-CAM weighting and SmoothGrad,
#: all from one more gradient pass per word (with SmoothGrad's noisy copies), whose gradients they share.
VARIANTS: tuple[tuple[str, MapType], ...] = (
    *((f"gradcam:{method}", GradCAMMap(method)) for method in CAM_METHODS if method != EVALUATED.cam_method),
    ("saliency:SmoothGrad", SaliencyMap(EVALUATED.smoothgrad_samples, EVALUATED.smoothgrad_noise)),
)
BASELINES = {"random": "baseline: random map", "centre": "baseline: centre prior"}
KINDS = ("colour", "shape")
METRIC_NAMES = {"pointing": "pointing game", "mass": "mass accuracy", "rank": "rank accuracy", "auroc": "AUROC"}


def scene_record(explainer: Explainer, seed: int, sanity: bool = False, settings: Settings = EVALUATED,
                 baseline_seed: int = 0) -> dict[str, Any]:
    """Everything measured on scene `seed` (JSON-ready): its captions, one record per content word, and the
    sanity correlations when `sanity`. The random baseline is seeded by (`baseline_seed`, `seed`), so a record
    is the same whichever process computes it."""
    scene = generate_scene(seed)
    image = scene.image
    caption = explainer.caption(image, settings)
    truth = true_caption(explainer, scene)
    indices = content_words(scene)
    explanations, maps = word_maps(explainer, scene, truth, settings)
    rng = np.random.default_rng([baseline_seed, seed])
    deltas = counterfactuals(explainer, scene, truth, indices)
    proposals = proposal_masks(explainer, image, settings) if settings.grounding and explainer.clip else []
    words = [word_record(scene, index, found, explanation, delta, rng, proposals)
             for index, found, explanation, delta in zip(indices, maps, explanations, deltas)]
    record = {"seed": seed, "truth": scene.caption, "caption": caption.text, "exact": caption.text == scene.caption,
              "objects": len(scene.objects), "words": words, "sanity": []}
    if sanity:
        record["sanity"] = [correlation | {"seed": seed, "word_index": index}
                            for index, explanation in zip(indices, explanations)
                            for correlation in cascade(explainer, image, explanation)]
    return record


def content_words(scene: Scene) -> list[int]:
    """The indices of the caption words that name an object (colours and shapes)."""
    return [index for index, (_, mask) in enumerate(scene.evidence) if mask is not None]


def word_maps(explainer: Explainer, scene: Scene, truth: Caption,
              settings: Settings) -> tuple[list[Explanation], list[dict[str, np.ndarray]]]:
    """Each content word of the true caption explained with `settings`, and its maps by key: the explanation's
    and the `VARIANTS` (from one more gradient pass per word)."""
    image = scene.image
    indices = content_words(scene)
    explanations = explainer.explain_many(image, indices, truth, settings)
    maps = [{_key(key): heatmap.values for key, heatmap in explanation.maps.items()} for explanation in explanations]
    resolved = explainer.resolve(settings)
    targets = [Target(truth.words[index].token_positions) for index in indices]
    captioner = explainer.captioner
    passes = target_gradients(captioner, captioner.preprocess(image), truth.token_ids, targets, resolved.vision_layer,
                              resolved.cross_attention_layer, resolved.smoothgrad_samples, resolved.smoothgrad_noise)
    for found, (_, gradients) in zip(maps, passes):
        context = MapContext(image.size, gradients=gradients)
        found |= {key: map_type.attribute(context).values for key, map_type in VARIANTS}
    return explanations, maps


def quick_check(explainer: Explainer, seeds: Iterable[int]) -> dict[str, float]:
    """The headline numbers without the maps' scores (for training summaries and tests): caption exact match,
    and on the true captions' content words the grounding's right-object rate and mean IoU."""
    settings = Settings(verify=False)
    exact, ious = [], []
    for seed in seeds:
        scene = generate_scene(seed)
        exact.append(explainer.caption(scene.image, settings).text == scene.caption)
        if explainer.clip is None:
            continue
        indices = content_words(scene)
        for index, explanation in zip(indices, explainer.explain_many(scene.image, indices,
                                                                      true_caption(explainer, scene), settings)):
            ious.append(iou(explanation.grounding.mask, scene.evidence[index][1]))
    return {"scenes": len(exact), "exact_match": float(np.mean(exact)), "words": len(ious),
            "right_object": float(np.mean(np.array(ious) >= RIGHT_OBJECT_IOU)) if ious else float("nan"),
            "iou": float(np.mean(ious)) if ious else float("nan")}


def proposal_masks(explainer: Explainer, image, settings: Settings) -> list[np.ndarray]:
    """The masks of every region the grounding chose among for `image` (at its size), the whole image first."""
    grounded = explainer.grounded_image(image, settings)
    return [grounded.mask(proposal) for proposal in grounded.proposals]


def true_caption(explainer: Explainer, scene: Scene) -> Caption:
    """The scene's true caption as the captioner's tokens, scored under teacher forcing."""
    captioner = explainer.captioner
    pixel_values = captioner.preprocess(scene.image)
    token_ids = captioner.start_ids(pixel_values) + captioner.tokenize(scene.caption)
    return explainer.caption_from_ids(pixel_values, token_ids)


def _key(key: str) -> str:
    """The default Grad-CAM weighting named like the others ("gradcam:GradCAM")."""
    return f"gradcam:{EVALUATED.cam_method}" if key == "gradcam" else key


def counterfactuals(explainer: Explainer, scene: Scene, caption: Caption, indices: Sequence[int]) -> list[dict]:
    """Per word: Δlog p(word) when its own object is removed, and the mean when each other object is removed
    (the caption teacher-forced on the scene and on each counterfactual, in one batched forward)."""
    captioner = explainer.captioner
    images = [scene.image] + [scene.without(index).image for index in range(len(scene.objects))]
    pixels = torch.cat([captioner.preprocess(image) for image in images])
    with torch.no_grad():
        logprobs = captioner.batch_token_logprobs(pixels, list(caption.token_ids)).double().cpu().numpy()
    deltas = []
    for index in indices:
        word = Target(caption.words[index].token_positions).score(logprobs)
        change = word[1:] - word[0]
        own = scene.object_of(index)
        others = [float(value) for obj, value in enumerate(change) if obj != own]
        deltas.append({"own": float(change[own]), "other": float(np.mean(others)) if others else None})
    return deltas


def word_record(scene: Scene, index: int, maps: Mapping[str, np.ndarray], explanation: Explanation,
                counterfactual: dict[str, Any], rng: np.random.Generator,
                proposals: Sequence[np.ndarray]) -> dict[str, Any]:
    """The scores of one content word's maps, baselines, region (against every proposal's mask) and
    counterfactual."""
    word, mask = scene.evidence[index]
    size = scene.image.size
    baselines = {"random": random_map(size, explanation.maps["gradcam"].raw.shape, rng), "centre": centre_prior(size)}
    record: dict[str, Any] = {
        "seed": scene.seed, "word_index": index, "word": word, "kind": "colour" if word in COLOURS else "shape",
        "objects": len(scene.objects), "area": float(mask.mean()), "logprob": explanation.word_logprob,
        "maps": {key: score_map(values, mask) for key, values in {**maps, **baselines}.items()},
        "counterfactual": counterfactual, "grounding": None,
    }
    if explanation.grounding is not None:
        record["grounding"] = region_record(explanation.grounding, mask, proposals)
    return record


def cascade(explainer: Explainer, image, explanation: Explanation) -> list[dict[str, Any]]:
    """Each map's rank correlation with itself after re-initialising the top 1, 2, … vision blocks."""
    total = len(explainer.captioner.vision_layers)
    return [{"map": _key(key), "blocks": blocks, "spearman": None if np.isnan(value) else value}
            for blocks in range(1, total + 1)
            for key, value in explainer.sanity_check(image, explanation, blocks).correlations.items()]


# --- the summary -----------------------------------------------------------------------------------------------

def groundtruth_result(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The benchmark's result from its scenes' records (in scene order): the summary, every word, the captions."""
    words = [word for record in records for word in record.get("words", ())]
    captions = [{key: record[key] for key in ("seed", "truth", "caption", "exact", "objects")} for record in records]
    sanity = [item for record in records for item in record.get("sanity", ())]
    return {"summary": summarize_groundtruth(captions, words, sanity), "captions": captions, "words": words,
            "sanity": sanity}


def map_order(keys: Iterable[str]) -> list[str]:
    """The page's map order (Grad-CAM weightings together), then the variants, then the baselines."""
    rank = {f"gradcam:{method}": index for index, method in enumerate(CAM_METHODS)}
    titles = list(map_titles())
    rank |= {key: 100 + index for index, key in enumerate(titles)}
    rank |= {"saliency:SmoothGrad": 100 + titles.index("saliency") + 0.5}
    rank |= {key: 1000 + index for index, key in enumerate(BASELINES)}
    return sorted(set(keys), key=lambda key: (rank.get(key, 500), key))


def summarize_groundtruth(captions: Sequence[Mapping], words: Sequence[Mapping], sanity: Sequence[Mapping]) -> dict:
    """Means ± std (with counts) per map and metric, overall and per word kind; grounding; counterfactual;
    caption exact match; the sanity check per map."""
    kinds = by_kind(words)
    keys = map_order(key for word in words for key in word["maps"])
    grounded = {kind: [w["grounding"] for w in group if w["grounding"]] for kind, group in kinds.items()}
    return {
        "scenes": len(captions), "words": len(words),
        "exact_match": summarize(float(c["exact"]) for c in captions),
        "captions": caption_report(captions),
        "maps": {key: {kind: {metric: summarize(w["maps"][key][metric] for w in group if key in w["maps"])
                              for metric in METRICS} for kind, group in kinds.items()} for key in keys},
        "grounding": {kind: region_summary(found) for kind, found in grounded.items()} if grounded["all"] else None,
        "counterfactual": {which: summarize(w["counterfactual"][which] for w in words) for which in ("own", "other")},
        "sanity": sanity_summary(sanity),
    }


def by_kind(words: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Words grouped as "all" and by kind (colour / shape)."""
    return {"all": list(words)} | {kind: [w for w in words if w["kind"] == kind] for kind in KINDS}


def sanity_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per map: mean rank correlation by number of re-initialised blocks; it fails the check when the mean with
    every block re-initialised stays above `FLAG_ABOVE` (the page's threshold)."""
    summary = {}
    for key in map_order(record["map"] for record in records):
        mine = [record for record in records if record["map"] == key]
        levels = sorted({record["blocks"] for record in mine})
        by_blocks = {blocks: summarize(r["spearman"] for r in mine if r["blocks"] == blocks) for blocks in levels}
        final = by_blocks[levels[-1]]["mean"]
        summary[key] = {"by_blocks": by_blocks, "all_blocks": final, "fails": bool(final > FLAG_ABOVE)}
    return summary


def map_label(key: str) -> str:
    """How a map key reads in tables: "gradcam:GradCAM++" → "Grad-CAM (GradCAM++)"."""
    base, _, variant = key.partition(":")
    title = BASELINES.get(key) or map_titles().get(base, base)
    return f"{title} ({variant})" if variant else title


def groundtruth_table(result: Mapping[str, Any]) -> str:
    """What `evaluate-groundtruth` prints (means; the JSON has std and counts too)."""
    summary = result["summary"]
    captions = summary["captions"]
    by_objects = "; ".join(f"{count} object{'s' if count != '1' else ''}: {found['exact_match']:.3f} / "
                           f"{found['colour_words']:.3f} / {found['shape_words']:.3f}"
                           for count, found in captions["by_objects"].items())
    lines = [f"Ground truth on {summary['scenes']} held-out scenes, {summary['words']} content words of the true "
             f"captions (teacher-forced). The captioner's own captions: exact match "
             f"{describe(summary['exact_match'])}; colour words {captions['colour_words']:.3f}, shape words "
             f"{captions['shape_words']:.3f} right. Exact / colour / shape by scene: {by_objects}."]
    rows = [[map_label(key), *(f"{_mean(scores['all'][m])} ({_mean(scores['colour'][m])} / "
                               f"{_mean(scores['shape'][m])})" for m in METRICS)]
            for key, scores in summary["maps"].items()]
    lines += ["", "Maps against the word's object mask, all content words (colour / shape words):",
              format_table(["Map", *(METRIC_NAMES[m] for m in METRICS)], rows)]
    if summary["grounding"]:
        grounding = summary["grounding"]
        columns = {"right object (IoU ≥ 0.5)": "right_object", "object proposed": "recall",
                   "right if proposed": "right_given_recall", "mean IoU": "iou", "precision": "precision",
                   "coverage": "coverage", "area": "area", "p(chosen)": "probability", "decided": "decided",
                   "whole image": "whole_image"}
        rows = [[kind, *(_mean(found[key]) for key in columns.values()), str(found["iou"]["n"])]
                for kind, found in grounding.items()]
        lines += ["", "Grounding (the region chosen among the segmenter's proposals; precision and coverage on the "
                      "word's object, area as a share of the image):",
                  format_table(["Words", *columns, "n"], rows)]
    counterfactual = summary["counterfactual"]
    lines += ["", f"Counterfactual Δlog p(word): its own object removed {describe(counterfactual['own'])}; "
                  f"another object removed {describe(counterfactual['other'])}."]
    if summary["sanity"]:
        levels = sorted({blocks for item in summary["sanity"].values() for blocks in item["by_blocks"]})
        rows = [[map_label(key), *(_mean(item["by_blocks"].get(blocks)) for blocks in levels),
                 "FAILS" if item["fails"] else "passes"] for key, item in summary["sanity"].items()]
        lines += ["", "Sanity check: Spearman ρ of each map with the same map after re-initialising the captioner's "
                      f"top k vision blocks (fails: ρ > {FLAG_ABOVE} with all blocks re-initialised):",
                  format_table(["Map", *(f"k={blocks}" for blocks in levels), "check"], rows)]
    return "\n".join(lines)


#: The metrics whose ranking of the methods is compared between captioners.
AGREEMENT_METRICS = ("pointing", "mass")


def rank_agreement(summaries: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """For each pair of captioners' summaries: Kendall's τ (τ-b, ties allowed) between their rankings of the methods
    (every map and variant both scored, baselines left out) by each of `AGREEMENT_METRICS` over all content words.
    τ = 1: the two captioners rank the methods identically; 0: no relation; −1: reversed."""
    from scipy.stats import kendalltau

    names = list(summaries)
    agreement = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            maps = [key for key in summaries[first]["maps"] if key in summaries[second]["maps"] and key not in BASELINES]
            row: dict[str, Any] = {"captioners": [first, second], "methods": len(maps)}
            for metric in AGREEMENT_METRICS:
                pairs = [[summaries[name]["maps"][key]["all"][metric]["mean"] for key in maps] for name in (first, second)]
                row[metric] = float(kendalltau(*pairs).statistic)
            agreement.append(row)
    return agreement


def agreement_table(agreement: Sequence[Mapping[str, Any]]) -> str:
    """The rank agreement as `evaluate-groundtruth` prints it."""
    rows = [[" vs ".join(row["captioners"]), str(row["methods"]), *(f"{row[m]:.3f}" for m in AGREEMENT_METRICS)]
            for row in agreement]
    return ("Do the captioners rank the methods alike? Kendall's τ across methods (1: same order, 0: unrelated):\n"
            + format_table(["Captioners", "methods", *(f"τ of {METRIC_NAMES[m]}" for m in AGREEMENT_METRICS)], rows))


def _mean(value: Mapping[str, Any] | None) -> str:
    return "—" if not value or not value["n"] else f"{value['mean']:.3f}"


def plot(summary: Mapping[str, Any], path: Path) -> None:
    """One bar chart per metric: every map's mean over content words, baselines in grey."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot

    keys = list(summary["maps"])
    figure, axes = pyplot.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 0.32 * len(keys) + 1.6), sharey=True)
    positions = np.arange(len(keys))
    for axis, metric in zip(axes, METRICS):
        for kind, offset, colour in (("colour", -0.2, "tab:orange"), ("shape", 0.2, "tab:blue")):
            means = [summary["maps"][key][kind][metric]["mean"] for key in keys]
            colours = ["0.6" if key in BASELINES else colour for key in keys]
            axis.barh(positions + offset, means, height=0.4, color=colours, label=f"{kind} words")
        axis.set_title(METRIC_NAMES[metric])
        axis.set_xlim(0, 1)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [map_label(key) for key in keys])
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    figure.suptitle(f"Maps against the true evidence: {summary['words']} content words of {summary['scenes']} "
                    "generated scenes (grey: baselines)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
