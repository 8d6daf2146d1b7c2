"""Speed and memory benchmark of the playground's paths: `python -m ipag.bench [--tiny] [--runs N] [--json PATH]`.

It measures what a user waits for (caption, first click, every word precomputed, a click after that, a
typed query) and, in the same run, the same queries done the original IPAG's way (everything recomputed per
query), then compares the explanation's time with the FLOP floor of this machine.

No weights can be downloaded here, and speed does not depend on weight values, so the models are the real
architectures with random weights: BLIP-base at 384 px (`BlipConfig()`'s defaults) with a BERT-sized
WordPiece vocabulary, CLIP ViT-B/32, and the segmenter "auto" stands for (Detectron2 panoptic FPN R50, else
torchvision Mask R-CNN v2). Random weights generate gibberish of any length, so the caption is a fixed
sentence of 10 words / 12 tokens, and generation is forced to that length. `--tiny` runs the same code on
the tiny test models in seconds (for tests; its numbers mean nothing).

Grounding is timed apart too, on the segmenter's proposals for the photo: once per image (`prepare`: proposals
and their CLIP embeddings) and once per word (`ground`, with a map fused as the defaults do), for every way
CLIP can be shown a region (`GROUNDING_VARIANTS`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import json
import math
import platform
import resource
import statistics
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import open_clip
import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

from . import budget, ui
from .attribution import AttributionPass, target_gradients
from .maps import IntegratedGradientsMap, MapContext, Occlusion
from .captioners import DecodeOptions
from .captioners.blip import TINY_WORDS, BlipCaptioner
from .device import resolve_device
from .explainer import Explainer
from .grounding import ClipModel, Grounder
from .images import load_image
from .precision import PRECISIONS
from .results import Caption
from .segmenters import resolve_name
from .settings import DEFAULTS, Settings
from .target import Target

T = TypeVar("T")

#: The photo (public domain, see examples/ATTRIBUTION.md), resized to a typical upload size.
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "rocket.jpg"
IMAGE_SIZE = (640, 480)
#: `--tiny` works at a tenth of the pixels: drawing and compositing full-size maps would dominate its runtime.
TINY_IMAGE_SIZE = (200, 150)
#: The fixed caption: 10 words, 11 WordPiece tokens (skate ##board) after [DEC], in both vocabularies.
CAPTION = "a man riding a skateboard next to a red car"
CAPTION_WORDS = 10
#: Typed queries, one per run (a repeated one would be a cache hit): single tokens not in the caption.
FREE_QUERIES = ("dog", "cat", "bus", "horse", "kite", "bird", "train", "pizza", "cake", "sky")
#: Segments the random detector may return. Random weights give as many confident detections as allowed
#: (`max_segments`, 24 by default); a trained detector finds ~5–15 on a busy COCO photo. The count drives
#: CLIP's cost: 1 + segments + at most 16 unions are embedded per image.
SEGMENTS = 10
#: What CLIP is shown of each region, as settings changed from the defaults (whose view is one of them).
GROUNDING_VARIANTS = {"blur": {"region_view": "blur"}, "grey": {"region_view": "grey"}, "crop": {"region_view": "crop"},
                      "grey + counterfactual": {"region_view": "grey", "counterfactual": True}}
#: The phrase the benchmark grounds (the caption's last noun phrase).
GROUNDED_PHRASE = "red car"
#: Side of the float32 matrices whose product measures the machine's peak (2·n³ FLOPs each).
MATMUL_SIZE = 2048


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str


METRICS = (
    Metric("build_s", "model build (random init)", "s"),
    Metric("caption_s", "caption (12 tokens generated + scored)", "s"),
    Metric("cold_word_s", "one word, cold (empty caches)", "s"),
    Metric("precompute_all_s", "all 10 words precomputed", "s"),
    Metric("click_s", "click after precompute (cache + render)", "s"),
    Metric("free_query_s", "new typed query, image cached", "s"),
    Metric("original_way_s", "one query the original IPAG's way (no caches)", "s"),
    Metric("speedup_vs_original", "original IPAG's way / click", "×"),
    Metric("explanation_s", "explanation forward+backward (default maps)", "s"),
    Metric("explanation_plain_s", "same without relevancy/LeGrad", "s"),
    Metric("integrated_gradients_s", "integrated gradients, 16 steps (a word)", "s"),
    Metric("occlusion_s", "occlusion sweep (every word of a caption)", "s"),
    Metric("sanity_check_s", "live sanity check (a word)", "s"),
    Metric("segment_s", "segmenter on the photo", "s"),
    Metric("ground_prepare_s", "grounding: proposals embedded (an image)", "s"),
    Metric("ground_word_s", "grounding: one word, map fused", "s"),
    Metric("peak_rss_default_gb", "peak RSS, default path (caption, clicks, query)", "GiB"),
    Metric("explanation_gflop", "explanation FLOPs", "GFLOP"),
    Metric("matmul_peak_gflops", "matmul peak", "GFLOP/s"),
    Metric("flop_floor_s", "explanation FLOP floor", "s"),
    Metric("flop_floor_ratio", "explanation / FLOP floor", "×"),
    Metric("peak_rss_gb", "peak RSS, whole run (IG, occlusion, sanity on)", "GiB"),
)


@dataclass(frozen=True)
class Goal:
    """A target a metric is reported against: at most `limit`, or at least it for speed-ups."""

    metric: str
    limit: float
    at_least: bool = False

    def met(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    def describe(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.limit:g}"


CPU_GOALS = (
    Goal("caption_s", 2.0), Goal("click_s", 0.1), Goal("cold_word_s", 2.0), Goal("precompute_all_s", 10.0),
    Goal("speedup_vs_original", 20.0, at_least=True), Goal("flop_floor_ratio", 3.0), Goal("peak_rss_default_gb", 4.0),
    Goal("peak_rss_gb", 6.0),
)
#: The steps of the default path, what the page does for a user who uploads, clicks and types: its peak memory is
#: theirs. The other steps time parts of it (segmentation, one pass), maps that are off by default on a CPU, the
#: sanity check's button (a copy of the captioner) and the original IPAG's way (a comparison the page never runs).
DEFAULT_PATH_STEPS = ("caption_s", "cold_word_s", "precompute_all_s", "click_s", "free_query_s")
#: The steps whose time is broken down by section (`ipag.budget`).
BUDGETED_STEPS = ("cold_word_s", "precompute_all_s")
#: On a GPU the first click should feel instant.
GPU_GOALS = tuple(Goal("cold_word_s", 0.03) if goal.metric == "cold_word_s" else goal for goal in CPU_GOALS)


# --- models ------------------------------------------------------------------------------------------------

def bert_like_vocab(size: int = 30524) -> dict[str, int]:
    """A WordPiece vocabulary laid out like BLIP-base's (BERT's ids for [PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103, then BLIP's [DEC] and [ENC] last), so `BlipConfig()`'s default token ids fit.

    Words: the tiny model's caption words and pieces (so `CAPTION` and `FREE_QUERIES` tokenize the same in
    both vocabularies), then made-up three-letter words and their ## continuations to reach BERT's size.
    """
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", size - 2: "[DEC]",
                size - 1: "[ENC]"}
    made_up = ["".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=3)]
    words = iter(dict.fromkeys([*TINY_WORDS, *made_up, *(f"##{word}" for word in made_up)]))
    return {specials.get(index) or next(words): index for index in range(size)}


def blip_base(device: torch.device, seed: int = 0) -> BlipCaptioner:
    """BLIP-base's architecture (ViT-B/16 at 384 px, 12-layer BERT-base decoder, 30524 tokens), random weights."""
    tokenizer = BertTokenizer(vocab=bert_like_vocab(), do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    processor = BlipProcessor(image_processor=BlipImageProcessor(), tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig())
    return BlipCaptioner(model, processor, device, "BLIP-base architecture (random weights)")


def clip_b32(device: torch.device, seed: int = 0) -> ClipModel:
    """CLIP ViT-B/32 with random weights (`pretrained=None`: nothing is downloaded)."""
    torch.manual_seed(seed)
    network, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None,
                                                                   image_resize_mode="squash")
    return ClipModel(network, preprocess, open_clip.get_tokenizer("ViT-B-32"), device, "ViT-B-32 (random weights)")


def build_explainer(device: torch.device, tiny: bool, segments: int = SEGMENTS,
                    precision: str = "auto") -> Explainer:
    """The explainer the benchmark measures, its segmenter loaded (it loads lazily, on the first query)."""
    if tiny:
        explainer = Explainer.tiny(device=str(device), precision=precision)
    else:
        name = resolve_name("auto")
        random_weights = {"weights": ""} if name == "detectron2" else {"pretrained": False}
        explainer = Explainer(blip_base(device), clip_b32(device), name,
                              segmenter_options={name: {**random_weights, "max_segments": segments}},
                              precision=precision)
    explainer.segmenter()
    return explainer


def benchmark_image(size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    return load_image(IMAGE).resize(size, Image.BICUBIC)


# --- the measured steps --------------------------------------------------------------------------------------

def caption_fixed(explainer: Explainer, rgb: Image.Image, token_ids: Sequence[int]) -> Caption:
    """What `Explainer.caption` does (preprocess, generate greedily with scores, align), with generation
    forced to `token_ids`' length (its tokens after the start token, plus the end token): random weights
    would stop anywhere. The fixed `token_ids` are aligned in place of the random ones (with the generated
    tokens' scores: only the time matters here), so every run aligns the same 10 words.
    """
    captioner = explainer.captioner
    pixel_values = captioner.preprocess(rgb)
    length = len(token_ids)
    _, logprobs = captioner.generate_scored(pixel_values, DecodeOptions(1, length, min_new_tokens=length))
    return explainer.caption_from_ids(pixel_values, token_ids, logprobs[: length - 1])


def cold(explainer: Explainer, step: Callable[[], T]) -> T:
    """`step()` after emptying every per-image cache, as for a never-seen image (models stay loaded)."""
    explainer.clear_cache()
    return step()


def click(explainer: Explainer, session: ui.Session, query: int | str, settings: Settings) -> ui.Session:
    """What the page does for a click, to the end (every stage computed or read, and drawn)."""
    *_, (session, _) = ui.explain(explainer, session, query, settings)
    return session


class BackwardCounter:
    """Counts the words' backward passes (`AttributionPass.token_gradients` calls) while in use."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> "BackwardCounter":
        self._original = AttributionPass.token_gradients

        def counted(attribution: AttributionPass, *args: Any) -> Any:
            self.count += 1
            return self._original(attribution, *args)

        AttributionPass.token_gradients = counted
        return self

    def __exit__(self, *exc_info: object) -> None:
        AttributionPass.token_gradients = self._original


def original_way(explainer: Explainer, rgb: Image.Image, token_ids: Sequence[int], query: int | str,
             settings: Settings) -> ui.Session:
    """One query as the original IPAG answered it: caption, segmentation, CLIP scores of every proposal and
    the explanation all recomputed (our pipeline on empty caches; models are not reloaded, which IPAG
    also did per query for its sentence model, so this favours IPAG)."""
    caption = cold(explainer, lambda: caption_fixed(explainer, rgb, token_ids))
    return click(explainer, ui.Session(image=rgb, caption=caption), query, settings)


def grounding_costs(explainer: Explainer, rgb: Image.Image, segments: Sequence[Any], cam: np.ndarray,
                    device: torch.device) -> dict[str, dict[str, float]]:
    """Seconds per image (`prepare`) and per word (`ground`, with `cam` fused) of each `GROUNDING_VARIANTS`
    entry."""
    costs = {}
    for name, changes in GROUNDING_VARIANTS.items():
        grounder = Grounder.from_settings(explainer.clip, replace(DEFAULTS, **changes))
        prepare_s, prepared = timed(device, grounder.prepare, rgb, segments)
        word_s, _ = timed(device, grounder.ground, prepared, GROUNDED_PHRASE, cam)
        costs[name] = {"prepare_s": prepare_s, "word_s": word_s}
    return costs


def explanation_flops(explainer: Explainer, pixel_values: torch.Tensor, token_ids: Sequence[int],
                      target: Target) -> float:
    """FLOPs of one explanation's forward and backward (matrix products, convolutions and attention).

    FlopCounterMode's per-module tracker hooks the inputs of every module, and `torch.autograd.grad` with a
    leaf input (our pixels) then fails (pytorch/pytorch#131753); only the total is needed, so the tracker is
    replaced by one that attributes everything to "Global".
    """
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        list(target_gradients(explainer.captioner, pixel_values, token_ids, [target], -1, -1,
                              attentions=explainer.captioner.exposes_attentions))  # what a click computes
    return float(counter.get_total_flops())


class _GlobalOnly:
    """Stands in for `torch.utils.module_tracker.ModuleTracker`: no hooks, every FLOP counted as "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = MATMUL_SIZE, reps: int = 5) -> float:
    """The machine's attainable FLOP/s: the best of `reps` timed products of two size×size matrices."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)  # warm-up: thread pool, kernel choice
    best = min(timed(device, torch.matmul, a, b)[0] for _ in range(reps))
    return 2.0 * size**3 / best


def timed(device: torch.device, fn: Callable[..., T], *args: Any) -> tuple[float, T]:
    """(seconds, result) of `fn(*args)`, with queued GPU work finished on both sides of the clock."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args)
    synchronize(device)
    return time.perf_counter() - start, result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    """This process's peak resident memory since it started or since `reset_peak_rss` (Linux: VmHWM; elsewhere
    ru_maxrss, which cannot be reset: KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def reset_peak_rss() -> None:
    """Start a new peak of resident memory from what is live now (Linux only: elsewhere the peak stays the whole
    run's). glibc keeps freed memory mapped for reuse, so without a trim every step's peak would start from the
    largest earlier step's (occlusion's batches, say) and say nothing of the step itself."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def processor_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- the benchmark -------------------------------------------------------------------------------------------

def run_benchmark(runs: int = 3, device: str = "auto", tiny: bool = False, segments: int = SEGMENTS,
                  precision: str = "auto",
                  progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Run every measurement `runs` times; returns {"environment", "samples", "metrics", "grounding", "goals",
    "budgets"}.

    Metrics are medians over the runs (the machine may be shared: medians shrug off a disturbed run);
    ratios are taken between medians. Each run clicks a different word and types a different query. Peak
    memory is taken per step, so that the default path's peak is known apart from the optional maps'; the
    `BUDGETED_STEPS` are broken down by section (`ipag.budget`), medians over the runs.
    """
    if not 1 <= runs <= len(FREE_QUERIES):
        raise ValueError(f"runs must be between 1 and {len(FREE_QUERIES)} (one new typed query per run), got {runs}.")
    resolved = resolve_device(device)  # also flushes denormals on CPU
    samples: dict[str, list[float]] = {"build_s": []}
    explainer: Explainer | None = None
    for run in range(runs):
        progress(f"building the models ({run + 1}/{runs})")
        explainer = None  # free the previous copy first: peak memory should be one set of models
        gc.collect()
        seconds, explainer = timed(resolved, build_explainer, resolved, tiny, segments, precision)
        samples["build_s"].append(seconds)
    assert explainer is not None
    captioner = explainer.captioner
    rgb = benchmark_image(TINY_IMAGE_SIZE if tiny else IMAGE_SIZE)
    pixel_values = captioner.preprocess(rgb)
    token_ids = captioner.start_ids(pixel_values) + captioner.tokenize(CAPTION)
    caption = explainer.caption_from_ids(pixel_values, token_ids)
    if len(caption.words) != CAPTION_WORDS:
        raise RuntimeError(f"The benchmark caption aligned to {len(caption.words)} words, not {CAPTION_WORDS}.")
    settings = DEFAULTS  # the settings the page starts with and precomputes with, so that clicks hit the cache
    session = ui.Session(image=rgb, caption=caption)

    progress("warming up (segments, CLIP proposals, one explanation)")
    segments_found = explainer.segmenter().segment(rgb)
    grounder = Grounder.from_settings(explainer.clip, settings)
    prepared = grounder.prepare(rgb, segments_found)
    proposal_count = len(prepared.proposals)
    cam = np.random.default_rng(0).random(rgb.size[::-1]).astype(np.float32)  # the values do not change the cost
    original_way(explainer, rgb, token_ids, 0, settings)
    gflop = explanation_flops(explainer, pixel_values, token_ids, Target(caption.words[0].token_positions)) / 1e9

    peaks: dict[str, list[float]] = {}
    budgets: dict[str, list[budget.Budget]] = {}
    for run in range(runs):
        word = run % len(caption.words)
        target = Target(caption.words[word].token_positions)
        progress(f"run {run + 1}/{runs}: caption, cold word, precompute, click, typed query, original way")
        def click_counted() -> int:
            with BackwardCounter() as counter:
                click(explainer, session, word, settings)
            return counter.count

        steps: dict[str, Callable[[], Any]] = {
            "caption_s": lambda: caption_fixed(explainer, rgb, token_ids),
            "cold_word_s": lambda: cold(explainer, lambda: click(explainer, session, word, settings)),
            "precompute_all_s": lambda: cold(explainer, lambda: explainer.precompute(rgb, caption, settings)),
            "click_s": lambda: click_counted(),
            "free_query_s": lambda: click(explainer, session, FREE_QUERIES[run], settings),
            "original_way_s": lambda: original_way(explainer, rgb, token_ids, word, settings),
            "explanation_s": lambda: list(target_gradients(captioner, pixel_values, token_ids, [target], -1, -1,
                                                           attentions=captioner.exposes_attentions)),
            "explanation_plain_s": lambda: list(target_gradients(captioner, pixel_values, token_ids, [target], -1, -1)),
            "integrated_gradients_s": lambda: IntegratedGradientsMap(16).compute(MapContext(
                rgb.size, captioner=captioner, pixel_values=pixel_values, token_ids=tuple(token_ids), target=target,
                image=rgb)),
            "occlusion_s": lambda: Occlusion().sweep(captioner, pixel_values, token_ids),
            "sanity_check_s": lambda: explainer.sanity_check(rgb, click(explainer, session, word, settings).explanation),
            "segment_s": lambda: explainer.segmenter().segment(rgb),
            "ground_prepare_s": lambda: grounder.prepare(rgb, segments_found),
            "ground_word_s": lambda: grounder.ground(prepared, GROUNDED_PHRASE, cam),
        }
        results = {}
        for key, step in steps.items():  # in this order: the click must follow the precompute
            reset_peak_rss()
            with budget.recording() as spent, budget.sections_of(ui, "render", "drawing"):
                seconds, results[key] = timed(resolved, step)
            samples.setdefault(key, []).append(seconds)
            peaks.setdefault(key, []).append(peak_rss_gib())
            if key in BUDGETED_STEPS:
                budgets.setdefault(key, []).append(spent)
        if results["click_s"]:
            raise RuntimeError("The click after precompute ran a backward pass: the benchmark is wrong.")

    progress("timing the grounding variants")
    grounding = grounding_costs(explainer, rgb, segments_found, cam, resolved)
    progress("measuring the matmul peak")
    metrics = {key: statistics.median(values) for key, values in samples.items()}
    metrics["speedup_vs_original"] = metrics["original_way_s"] / metrics["click_s"]
    metrics["explanation_gflop"] = gflop
    metrics["matmul_peak_gflops"] = matmul_peak(resolved, captioner.precision.dtype("gradients")) / 1e9
    metrics["flop_floor_s"] = gflop / metrics["matmul_peak_gflops"]
    metrics["flop_floor_ratio"] = metrics["explanation_s"] / metrics["flop_floor_s"]
    metrics["peak_rss_default_gb"] = max(max(peaks[key]) for key in DEFAULT_PATH_STEPS)
    metrics["peak_rss_gb"] = max(max(values) for values in peaks.values())
    goals = GPU_GOALS if resolved.type == "cuda" else CPU_GOALS
    return {
        "environment": {
            "device": str(resolved),
            "processor": processor_name(resolved),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "open_clip": open_clip.__version__,
            "tiny": tiny,
            "captioner": captioner.describe(),
            "precision": captioner.precision.describe(),
            "clip": explainer.clip.name,
            "segmenter": explainer.segmenter().describe(),
            "segments": len(segments_found),
            "clip_proposals": proposal_count,
            "image_size": list(rgb.size),
            "caption": caption.text,
            "caption_words": len(caption.words),
            "caption_tokens": len(token_ids),
            "runs": runs,
        },
        "samples": samples,
        "metrics": {metric.key: metrics[metric.key] for metric in METRICS},
        "grounding": grounding,
        "goals": [{"metric": goal.metric, "goal": goal.describe(), "value": metrics[goal.metric],
                   "met": goal.met(metrics[goal.metric])} for goal in goals],
        "peaks_gb": peaks,
        "budgets": {key: {"wall_s": metrics[key], "sections": budget.Budget.median(spent).to_dict()}
                    for key, spent in budgets.items()},
    }


def format_report(results: dict[str, Any]) -> str:
    """The results as a plain-text table: environment, then one line per metric with its runs and goal."""
    env = results["environment"]
    goals = {goal["metric"]: goal for goal in results["goals"]}
    lines = [
        f"IPAG benchmark{' (TINY models: numbers are meaningless)' if env['tiny'] else ''}",
        f"device {env['device']} ({env['processor']}), {env['threads']} threads; python {env['python']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, open_clip {env['open_clip']}",
        f"captioner {env['captioner']}; CLIP {env['clip']}; segmenter {env['segmenter']}; precision "
        f"{env['precision']}",
        f"image {env['image_size'][0]}×{env['image_size'][1]}; caption “{env['caption']}” "
        f"({env['caption_words']} words, {env['caption_tokens']} tokens); {env['segments']} segments → "
        f"{env['clip_proposals']} CLIP proposals; medians of {env['runs']} run(s)",
        "",
        f"{'metric':<42} {'median':>12}  {'goal':<10} {'met':<4} runs",
    ]
    for metric in METRICS:
        value = results["metrics"][metric.key]
        runs = " ".join(f"{v:.3g}" for v in results["samples"].get(metric.key, []))
        goal = goals.get(metric.key)
        verdict = ("yes" if goal["met"] else "NO") if goal else ""
        lines.append(f"{metric.label:<42} {_number(value):>8} {metric.unit:<4} "
                     f"{goal['goal'] if goal else '':<10} {verdict:<4} {runs}")
    lines += ["", "grounding variants (one run each): s per image (proposals embedded) / s per word"]
    lines += [f"  {name:<40} {cost['prepare_s']:>8.3g} s / {cost['word_s']:.3g} s"
              for name, cost in results["grounding"].items()]
    labels = {metric.key: metric.label for metric in METRICS}
    for key, spent in results["budgets"].items():
        lines += ["", budget.format_budget(budget.Budget.from_dict(spent["sections"]), spent["wall_s"],
                                           f"where “{labels[key]}” goes (medians)")]
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) and abs(value) < 1000 else f"{value:.0f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m ipag.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement; medians are reported (1–10)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, …")
    parser.add_argument("--tiny", action="store_true", help="tiny random models: seconds, numbers meaningless")
    parser.add_argument("--segments", type=int, default=SEGMENTS, help="most segments the random detector returns")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (bfloat16 for the accepted stages where the processor has it), float32, bfloat16")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(args.runs, args.device, args.tiny, args.segments, args.precision,
                            progress=lambda message: print(f"… {message}", file=sys.stderr, flush=True))
    print(format_report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return results


if __name__ == "__main__":
    main()
