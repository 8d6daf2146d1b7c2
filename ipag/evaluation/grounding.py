"""`python -m ipag evaluate-grounding`: where grounding fails, and which grounding settings fix it, on ground truth.

The region chosen for a word can be wrong for two reasons: the object is not among the proposals (the
segmenter's fault), or it is and another proposal was chosen (the scoring's fault). `region_record` tells
them apart for one word: proposal recall (some proposal has IoU ≥ 0.5 with the object), whether the choice is
right, the chosen region's precision on the object (its share that is object), its coverage of the object,
its area, its probability, and whether the grounding was decided (`Grounding.decided`). `evaluate-groundtruth`
records it for every word with the settings it runs; this command runs the grounding alone, under many settings
on the same scenes, each word's maps computed once (the settings differ only in the grounding stage):

    python -m ipag evaluate-grounding --scenes 100                    # the ablation table, held-out seeds 0–99
    python -m ipag evaluate-grounding --first-seed 5000 --scenes 200 \\
        --grid fusion_map=saliency,input_x_gradient --grid fusion_weight=5,10,15,20,30   # tuning: best first

Without `--grid` it runs `ablation()`: the grounding as it was before issue 22 (`BEFORE`), each change alone on
top of it, the defaults, the defaults without each change they make and with each change they do not. With
`--grid NAME=V1,V2,…` (repeatable) it runs every combination of the values over the page's defaults and sorts
them by the worse of the colour-word and shape-word right-object rates (the goal holds for each kind
separately), then by the rate over all words. Tune on seeds disjoint from the evaluation's (0–499): the
defaults were tuned on 5000–5199.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any


from ..explainer import Explainer
from ..settings import DEFAULTS, Settings
from ..synthetic.scenes import COLOURS, generate_scene
from .groundtruth import KINDS, by_kind, true_caption
from .localisation import region_record, region_summary
from .report import format_table

#: The grounding before issue 22: the word alone as the query, blurred composites, CLIP alone.
BEFORE = replace(DEFAULTS, ground_phrase=False, region_view="blur", area_penalty=0.0, counterfactual=False,
                 fusion_weight=0.0)
#: Each change of issue 22, as the settings that switch it on (on `BEFORE`) and off (on the defaults).
CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "phrase query": ({"ground_phrase": True}, {"ground_phrase": False}),
    "grey composite": ({"region_view": "grey"}, {"region_view": "blur"}),
    "crop": ({"region_view": "crop"}, {"region_view": "blur"}),
    "area penalty": ({"area_penalty": DEFAULTS.area_penalty}, {"area_penalty": 0.0}),
    "counterfactual": ({"counterfactual": True}, {"counterfactual": False}),
    "fusion": ({"fusion_map": DEFAULTS.fusion_map, "fusion_weight": DEFAULTS.fusion_weight}, {"fusion_weight": 0.0}),
}


def ablation() -> dict[str, Settings]:
    """The ablation's variants by name: before, each change alone, the defaults, then the defaults without each
    change they make ("defaults − fusion") and with each they do not ("defaults + counterfactual")."""
    variants = {"before (word, blur, CLIP alone)": BEFORE}
    variants |= {f"before + {name}": replace(BEFORE, **on) for name, (on, _) in CHANGES.items()}
    variants["defaults"] = DEFAULTS
    for name, (on, off) in CHANGES.items():
        made = all(getattr(DEFAULTS, key) == value for key, value in on.items())
        variants[f"defaults {'−' if made else '+'} {name}"] = replace(DEFAULTS, **(off if made else on))
    return variants


def grid(specs: Sequence[str], base: Settings = DEFAULTS) -> dict[str, Settings]:
    """Every combination of `NAME=V1,V2,…` specs over `base`, by name ("fusion_weight=10, fusion_map=saliency").
    Values are read as JSON where they can be (numbers, true/false), else as text."""
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if not name or not values:
            raise ValueError(f"A grid axis is NAME=V1,V2,…; got {spec!r}.")
        axes.append([(name.strip(), _value(value)) for value in values.split(",")])
    variants = {}
    for combination in itertools.product(*axes):
        values = dict(combination)
        variants[", ".join(f"{name}={value}" for name, value in combination)] = Settings.from_values(values, base)
    return variants


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


# --- the command ------------------------------------------------------------------------------------------------

def scene_groundings(explainer: Explainer, seed: int, variants: Mapping[str, Settings]) -> dict[str, Any]:
    """Scene `seed`'s content words of its true caption grounded with every variant (JSON-ready): one record per
    variant and word."""
    scene = generate_scene(seed)
    caption = true_caption(explainer, scene)
    indices = [index for index, (_, mask) in enumerate(scene.evidence) if mask is not None]
    words = []
    for name, settings in variants.items():
        settings = replace(settings, verify=False)
        proposals = explainer.grounded_image(scene.image, settings)
        masks = [proposals.mask(proposal) for proposal in proposals.proposals]
        for index, explanation in zip(indices, explainer.explain_many(scene.image, indices, caption, settings)):
            word, truth = scene.evidence[index]
            words.append({"variant": name, "seed": seed, "word_index": index, "word": word,
                          "kind": "colour" if word in COLOURS else "shape",
                          **region_record(explanation.grounding, truth, masks)})
    return {"seed": seed, "words": words}


def grounding_result(records: Sequence[Mapping[str, Any]], variants: Mapping[str, Settings],
                     ranked: bool) -> dict[str, Any]:
    """Per variant and word kind, `region_summary`; the variants in their order, or best first when `ranked`."""
    words = [word for record in records for word in record["words"]]
    summary = {name: {kind: region_summary(group) for kind, group in
                      by_kind([w for w in words if w["variant"] == name]).items()} for name in variants}
    order = list(variants)
    if ranked:
        order.sort(key=lambda name: _goal(summary[name]), reverse=True)
    return {"scenes": len(records), "words": len(words) // max(len(variants), 1),
            "variants": {name: {"settings": _changed(variants[name]), "summary": summary[name]} for name in order},
            "records": list(records)}


def _goal(summary: Mapping[str, Any]) -> tuple[float, float]:
    """The worse of the colour-word and shape-word right-object rates (the goal holds for each separately), then
    the rate over all words."""
    return (min(summary[kind]["right_object"]["mean"] for kind in KINDS), summary["all"]["right_object"]["mean"])


def _changed(settings: Settings) -> dict[str, Any]:
    """The grounding settings of a variant that differ from the defaults."""
    return {name: value for name, value in settings.key("grounding") if value != getattr(DEFAULTS, name)}


def grounding_table(result: Mapping[str, Any]) -> str:
    """What `evaluate-grounding` prints: one row per variant (means; the JSON has std and counts)."""
    def cell(summary: Mapping[str, Any], key: str) -> str:
        value = summary[key]
        return "—" if not value["n"] else f"{value['mean']:.3f}"

    rows = []
    for name, variant in result["variants"].items():
        summary = variant["summary"]
        rows.append([name, *(cell(summary[kind], "right_object") for kind in ("all", *KINDS)),
                     *(cell(summary["all"], key) for key in ("recall", "right_given_recall", "precision", "coverage",
                                                             "area", "probability", "decided",
                                                             "right_when_decided"))])
    header = ["Grounding", "right", "colour", "shape", "recall", "right|recall", "precision", "coverage", "area",
              "p(chosen)", "decided", "right|decided"]
    return "\n".join([f"Grounding on {result['scenes']} held-out scenes, {result['words']} content words of the true "
                      "captions (right: the chosen region has IoU ≥ 0.5 with the word's object):",
                      format_table(header, rows)])
