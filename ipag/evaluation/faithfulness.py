"""Are the maps faithful to the captioner? Perturb the pixels a map ranks highest and watch log p(word).

- Deletion / insertion (Petsiuk et al., RISE, BMVC 2018): replace the top k of the pixels, ranked by the map,
  by a blurred copy of the image (deletion), or reveal them on that blurred copy (insertion), for k = 0,
  1/steps, …, 1; the score is the area under log p(word) over k (trapezoids, so the mean log p along the
  curve). A faithful map makes log p fall fast when deleting (low AUC) and rise fast when inserting (high AUC).
- ROAD (Rong et al., ICML 2022) through the grad-cam library's `ROADCombined`: removed pixels are filled by
  noisy linear imputation from their neighbours, so that the mask's shape cannot itself inform the model;
  (LeRF − MoRF)/2 averaged over percentiles, higher is more faithful.
- A "random" map (uniform noise) is scored alongside the real ones: the floor they have to beat.

Everything is perturbed on the captioner's own input tensor, with the maps resized to it, so pixels are ranked
at the resolution the model sees; the blurred copy is the grounding's composite backdrop (`backdrop`). The
target is the explained word's log-probability under teacher forcing on the caption, exactly what the maps
explain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam.metrics.road import ROADCombined
from tqdm import tqdm

from ..captioners import Captioner
from ..errors import QueryError
from ..explainer import Explainer
from ..grounding.composite import backdrop
from ..images import ImageError, load_image
from ..settings import DEFAULTS, Settings
from ..target import Target
from .inputs import select_queries
from .report import summarize

#: A batch of model inputs (B, 3, S, S) → the target's log-probability for each (B,).
Score = Callable[[torch.Tensor], torch.Tensor]

METRICS = ("deletion_auc", "insertion_auc", "road")
#: ROAD's imputation solves a sparse system per perturbed input (seconds at 384 px), so fewer percentiles than
#: the library's nine by default.
ROAD_PERCENTILES = (20, 50, 80)


class WordTarget:
    """log p(word | image, caption so far) for a batch of model inputs, `batch_size` inputs per forward: the
    explained target as a `Score`, and the "model" grad-cam's ROAD metric calls."""

    def __init__(self, captioner: Captioner, token_ids: Sequence[int], positions: Sequence[int],
                 batch_size: int = 32) -> None:
        self.captioner = captioner
        self.token_ids = list(token_ids)
        self.target = Target(tuple(positions))
        self.target.check(len(self.token_ids))
        self.batch_size = batch_size

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        chunks = (chunk.to(self.captioner.device) for chunk in pixel_values.split(self.batch_size))
        return torch.cat([self.target.score(self.captioner.batch_token_logprobs(chunk, self.token_ids))
                          for chunk in chunks])


def pixel_ranks(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pixel's rank by `saliency` (0 = most salient), in the map's shape. Ties go in random order: a flat
    map (common for tiny random models) must not delete the image row by row from the top."""
    flat = saliency.ravel()
    order = np.lexsort((rng.random(flat.size), -flat))
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(saliency.shape)


def perturbation_curves(score: Score, pixels: torch.Tensor, baseline: torch.Tensor, ranks: np.ndarray,
                        steps: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(deletion, insertion): log p after replacing by / revealing on `baseline` the pixels ranked below
    k·N/steps, k = 0..steps. `pixels` and `baseline` are (1, 3, S, S); `ranks` is S×S from `pixel_ranks`."""
    counts = np.round(np.linspace(0, ranks.size, steps + 1))
    changed = torch.from_numpy(ranks[None] < counts[:, None, None])[:, None].to(pixels.device)
    perturbed = torch.cat([torch.where(changed, baseline, pixels), torch.where(changed, pixels, baseline)])
    values = score(perturbed).float().cpu().numpy()
    return values[: steps + 1], values[steps + 1:]


def auc(curve: np.ndarray) -> float:
    """Area under a curve sampled evenly on [0, 1]."""
    return float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1)))


def road_scores(score: Score, pixels: torch.Tensor, ranks: Mapping[str, np.ndarray],
                percentiles: Sequence[int] = ROAD_PERCENTILES, seed: int = 0) -> dict[str, float]:
    """ROADCombined per map, all maps in one batch. The maps are passed as their ranks (a strict order), so
    every percentile removes exactly that share of the pixels even where a map is flat."""
    cams = np.stack([1.0 - rank / (rank.size - 1) for rank in ranks.values()]).astype(np.float32)
    batch = pixels.expand(len(cams), -1, -1, -1)
    with torch.random.fork_rng(devices=[]):  # the imputer draws its noise from torch's global generator
        torch.manual_seed(seed)
        values = ROADCombined(percentiles=list(percentiles))(batch, cams, [_itself] * len(cams), score)
    return {key: float(value) for key, value in zip(ranks, values)}


def _itself(output: torch.Tensor) -> torch.Tensor:
    """grad-cam's target callback: our model already returns the target."""
    return output


def word_faithfulness(score: Score, pixels: torch.Tensor, baseline: torch.Tensor, maps: Mapping[str, np.ndarray],
                      steps: int = 20, road_percentiles: Sequence[int] = ROAD_PERCENTILES,
                      seed: int = 0) -> dict[str, dict[str, Any]]:
    """Deletion and insertion curves with their AUCs, and ROAD (unless `road_percentiles` is empty), per map;
    maps are S×S at the input tensor's size."""
    rng = np.random.default_rng(seed)
    ranks = {key: pixel_ranks(values, rng) for key, values in maps.items()}
    results: dict[str, dict[str, Any]] = {}
    for key, rank in ranks.items():
        deletion, insertion = perturbation_curves(score, pixels, baseline, rank, steps)
        results[key] = {"deletion_auc": auc(deletion), "insertion_auc": auc(insertion),
                        "deletion": deletion.tolist(), "insertion": insertion.tolist()}
    if road_percentiles:
        for key, value in road_scores(score, pixels, ranks, road_percentiles, seed).items():
            results[key]["road"] = value
    return results


def evaluate_faithfulness(explainer: Explainer, images: Sequence[Path], words: Sequence[str] | None = None,
                          settings: Settings = DEFAULTS, steps: int = 20,
                          road_percentiles: Sequence[int] = ROAD_PERCENTILES, batch_size: int = 32,
                          seed: int = 0) -> dict[str, Any]:
    """Explain the caption words of every image and score each map type (plus a random map) on them; also the
    improved-XIC hit rate: how often the captioner, shown only the grounded region, still says the word.
    Images that cannot be read or explained are reported under "failed" and left out.

    In this process; `python -m ipag evaluate-faithfulness --ray` computes the same `image_faithfulness` records
    on Ray workers and aggregates them with the same `faithfulness_result`."""
    return faithfulness_result([
        image_faithfulness(explainer, path, index, words, settings, steps, road_percentiles, batch_size, seed)
        for index, path in enumerate(tqdm(images, desc="Faithfulness", unit="image"))])


def image_faithfulness(explainer: Explainer, path: Path, index: int, words: Sequence[str] | None = None,
                       settings: Settings = DEFAULTS, steps: int = 20,
                       road_percentiles: Sequence[int] = ROAD_PERCENTILES, batch_size: int = 32,
                       seed: int = 0) -> dict[str, Any]:
    """One image's part of `evaluate_faithfulness`: {"image", "words": its words' records, "notes"}, or
    {"image", "error"} when it cannot be read or explained. Its random map is seeded by (`seed`, `index`, the
    image's position in the set), so the record is the same whichever process computes it, in whatever order."""
    try:
        rgb = load_image(path)
        caption = explainer.caption(rgb, settings)
        explanations = explainer.explain_many(rgb, select_queries(caption, words), caption, settings)
    except (ImageError, QueryError) as err:
        return {"image": str(path), "error": str(err)}
    pixels = explainer.captioner.preprocess(rgb)
    baseline = explainer.captioner.preprocess(Image.fromarray(backdrop(rgb, "blur")))
    size = (pixels.shape[-1], pixels.shape[-2])
    rng = np.random.default_rng([seed, index])
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for explanation in explanations:
        if not explanation.in_caption:
            notes.append(f"{path.name}: '{explanation.query}' is not in the caption, skipped.")
            continue
        maps = {key: heatmap.at(size) for key, heatmap in explanation.maps.items()}
        maps["random"] = rng.random(size[::-1])
        target = WordTarget(explainer.captioner, caption.token_ids, explanation.token_positions, batch_size)
        check = explanation.verification
        records.append({
            "image": str(path), "caption": caption.text, "word": " ".join(w.text for w in explanation.words),
            "word_index": explanation.words[0].index, "word_logprob": explanation.word_logprob,
            "region_says_word": check.region_says_word if check else None,
            "maps": word_faithfulness(target, pixels, baseline, maps, steps, road_percentiles, seed),
        })
    return {"image": str(path), "words": records, "notes": notes}


def faithfulness_result(images: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The set's result from its images' records (`image_faithfulness`, in image order): every word's record,
    the summary over them, the images that failed and the notes."""
    words = [word for image in images for word in image.get("words", ())]
    return {"summary": summarize_faithfulness(words), "words": words,
            "failed": [{"image": image["image"], "error": image["error"]} for image in images if "error" in image],
            "notes": [note for image in images for note in image.get("notes", ())]}


def summarize_faithfulness(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std of each metric per map type over the explained words, and the XIC hit rate."""
    keys = dict.fromkeys(key for record in records for key in record["maps"])
    maps = {key: {metric: summarize(record["maps"][key].get(metric) for record in records if key in record["maps"])
                  for metric in METRICS} for key in keys}
    hits = [record["region_says_word"] for record in records if record["region_says_word"] is not None]
    return {"maps": maps, "xic_hit_rate": {"rate": sum(hits) / len(hits) if hits else None, "hits": sum(hits),
                                           "n": len(hits)}}
