"""The public entry point: caption an image, then explain any caption word or free query.

`Explainer` wires the pieces together and holds no model maths itself: captioners (`ipag.captioners`) run
the captioning models, `ipag.attribution` computes a target's gradients, `ipag.maps` turns them into
heatmaps, `ipag.grounding` picks the region CLIP matches to the word among `ipag.segmenters`' proposals,
and `ipag.verify` checks that region against the captioner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from PIL import Image

from .align import align, find_phrase
from .attribution import Target, target_gradients
from .captioners import Captioner, DecodeOptions, load_captioner, tiny_captioner
from .cache import DEFAULT_CACHE_MB, ImageCache, image_key
from .device import resolve_device
from .errors import QueryError
from .grounding import ClipModel, Grounder
from .images import ImageInput, load_image
from .maps import CrossAttentionMap, GradCAMMap, MapType, SaliencyMap
from .perturbation import Occlusion
from .results import Caption, Explanation, Heatmap, Word
from .segmenters import Segmenter, load_segmenter, resolve_name
from .verify import caption_region, composite_logprobs, verify

logger = logging.getLogger(__name__)

#: The longest free query we explain, in tokens (a caption is ~10; longer text is not a "word" any more).
MAX_QUERY_TOKENS = 32
#: Checked before tokenizing, so a pasted novel costs nothing.
MAX_QUERY_CHARS = 200

Query = int | str


@dataclass(frozen=True)
class MapSettings:
    """Which maps to compute and from where. `cross_attention_layer=None` picks a late-middle decoder layer
    (⌊2L/3⌋, 8 of 12 for BLIP-base, following LAVIS's choice for BLIP's cross-attention Grad-CAM)."""

    cam_method: str = "GradCAM"
    vision_layer: int = -1
    cross_attention_layer: int | None = None
    smoothgrad_samples: int = 0
    smoothgrad_noise: float = 0.15
    occlusion: Occlusion | None = None  #: also an occlusion map (one batched sweep shared by all words)

    def map_types(self) -> list[MapType]:
        return [GradCAMMap(self.cam_method), CrossAttentionMap(),
                SaliencyMap(self.smoothgrad_samples, self.smoothgrad_noise)]


@dataclass(frozen=True)
class GroundingSettings:
    """How the word is grounded. `segmenter=None` uses the explainer's default segmenter; `enabled=False`
    skips grounding, verification and the CLIP map (attribution maps only)."""

    segmenter: str | None = None
    template: str = "a photo of {}"
    stage2: bool = False
    fusion_weight: float = 0.0
    top_k: int = 5
    verify: bool = True
    enabled: bool = True


@dataclass(frozen=True)
class _Prepared:
    """A query's resolved target: the token sequence to teacher-force and the positions explained."""

    query: Query
    token_ids: tuple[int, ...]
    target: Target
    words: tuple[Word, ...]  #: the caption words explained; () for free text


class Explainer:
    """Captions images and explains, per word, why the captioner said it and where it is."""

    def __init__(self, captioner: Captioner, clip: ClipModel | None = None, segmenter: str = "auto",
                 segmenter_options: dict | None = None, cache_mb: float = DEFAULT_CACHE_MB) -> None:
        """`cache_mb` bounds the memory of what is kept for the images seen (captions, segments, explanations)
        in MB (2²⁰ bytes): least recently used entries are evicted beyond it, and one image keeps at most a
        quarter of it (`ipag.cache`)."""
        self.captioner = captioner
        self.clip = clip
        self.default_segmenter = segmenter
        self.segmenter_options = segmenter_options or {}
        self.cache = ImageCache(round(cache_mb * 2**20))
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()  # segmenters load once, even when two users ask at the same time
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ipag-precompute")

    @classmethod
    def from_pretrained(cls, captioner: str = "Salesforce/blip-image-captioning-base",
                        clip: str | None = "ViT-B-32/openai", segmenter: str = "auto",
                        device: str = "auto", cache_mb: float = DEFAULT_CACHE_MB) -> "Explainer":
        """Load real models by hub id or local folder (downloaded once, then cached, with progress bars).

        `clip` is "architecture/pretrained-tag" (open_clip names) or "architecture/path/to/checkpoint";
        None disables grounding. Raises `ModelUnavailableError` naming the model and the fix when a model
        cannot be loaded. Segmenters load on first use.
        """
        resolved = resolve_device(device)
        captioner_model = load_captioner(captioner, resolved)
        clip_model = None
        if clip:
            architecture, _, pretrained = clip.partition("/")
            clip_model = ClipModel.from_pretrained(architecture, pretrained or "openai", resolved)
        return cls(captioner_model, clip_model, segmenter, cache_mb=cache_mb)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", captioner: str = "blip-base",
             cache_mb: float = DEFAULT_CACHE_MB) -> "Explainer":
        """The whole pipeline on tiny random models built from configs (a captioner by friendly name, CLIP)
        and scikit-image superpixels: offline, in seconds. For tests, CI and `playground.py --tiny`."""
        resolved = resolve_device(device)
        return cls(tiny_captioner(captioner, seed, resolved), ClipModel.tiny(seed, resolved), "superpixels",
                   segmenter_options={"torchvision": {"pretrained": False}},  # random Mask R-CNN: no download
                   cache_mb=cache_mb)

    def with_captioner(self, captioner: Captioner) -> "Explainer":
        """An explainer for another captioner that shares this one's CLIP model, loaded segmenters,
        background thread (so precomputing for several captioners never runs more than one job at a time) and
        cache budget (its entries kept apart by captioner)."""
        other = Explainer(captioner, self.clip, self.default_segmenter, self.segmenter_options)
        other._segmenters, other._lock, other._background = self._segmenters, self._lock, self._background
        other.cache = self.cache.scoped(captioner)
        return other

    # --- captioning -----------------------------------------------------------------------------------------

    def caption(self, image: ImageInput, num_beams: int = 1, max_new_tokens: int = 20) -> Caption:
        """Generate a caption and align it to clickable words with their log-probabilities (cached)."""
        rgb = load_image(image)
        options = DecodeOptions(num_beams, max_new_tokens)

        return self.cache.get_or_compute(image_key(rgb), ("caption", options),
                                         lambda: self._caption_pixels(self.captioner.preprocess(rgb), options))

    def _caption_pixels(self, pixel_values: torch.Tensor, options: DecodeOptions = DecodeOptions()) -> Caption:
        return self.caption_from_ids(pixel_values, *self.captioner.generate_scored(pixel_values, options))

    def caption_from_ids(self, pixel_values: torch.Tensor, token_ids: Sequence[int],
                         logprobs: Sequence[float] | None = None) -> Caption:
        """Align a token sequence (starting with the start token) with the log-probabilities of its tokens
        after the first (scored here under teacher forcing when not given)."""
        token_ids = list(token_ids)
        if logprobs is None:
            logprobs = self.captioner.token_logprobs(pixel_values, token_ids) if len(token_ids) > 1 else []
        logprobs = [0.0, *logprobs]
        text, words = align(self.captioner.pieces(token_ids), token_ids, logprobs)
        return Caption(text=text, words=words, token_ids=tuple(token_ids),
                       tokens=tuple(self.captioner.token_strings(token_ids)),
                       token_logprobs=tuple(logprobs), captioner=self.captioner.describe())

    # --- explaining -----------------------------------------------------------------------------------------

    def explain(self, image: ImageInput, query: Query, caption: Caption | None = None,
                settings: MapSettings = MapSettings(),
                grounding: GroundingSettings = GroundingSettings()) -> Explanation:
        """Explain one caption word (by index or text) or a free-text query; see `explain_many`."""
        return self.explain_many(image, [query], caption, settings, grounding)[0]

    def explain_many(self, image: ImageInput, queries: Sequence[Query], caption: Caption | None = None,
                     settings: MapSettings = MapSettings(),
                     grounding: GroundingSettings = GroundingSettings()) -> list[Explanation]:
        """Explain several queries; all caption words share one forward pass of the captioner.

        A query is a word index, a caption word or phrase (matched on tokens, first occurrence), or free
        text. Free text is explained as log p(query | image) after the neutral prompt
        `captioner.neutral_prompt`, and the result says so. `caption` defaults to a fresh greedy caption.
        """
        rgb = load_image(image)
        key = image_key(rgb)
        caption = caption or self.caption(rgb)
        prepared = [self._prepare_query(query, caption) for query in queries]
        found = {i: self.cache.get(key, self._result_key(item, settings, grounding)) for i, item in enumerate(prepared)}
        missing = [i for i, hit in found.items() if hit is None]
        # One forward for every target on the caption itself, one per free query.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index in missing:
            groups.setdefault(prepared[index].token_ids, []).append(index)
        pixel_values = self.captioner.preprocess(rgb) if missing else None
        for token_ids, members in groups.items():
            results = self._attribute(pixel_values, token_ids, [prepared[i].target for i in members], settings,
                                      rgb.size)
            for index, (logprob, maps, notes) in zip(members, results):  # each word cached as soon as it is done
                result_key = self._result_key(prepared[index], settings, grounding)
                found[index] = self.cache.get(key, result_key)  # a click may have finished it meanwhile
                if found[index] is None:
                    found[index] = self._finish(rgb, key, caption, prepared[index], logprob, maps, notes, grounding)
                    self.cache.put(key, result_key, found[index])
        return [found[i] for i in range(len(prepared))]

    def precompute(self, image: ImageInput, caption: Caption, settings: MapSettings = MapSettings(),
                   grounding: GroundingSettings = GroundingSettings()) -> list[Explanation]:
        """Explain every caption word (one shared forward) so that later clicks are served from the cache."""
        return self.explain_many(image, list(range(len(caption.words))), caption, settings, grounding)

    def precompute_async(self, image: ImageInput, caption: Caption, settings: MapSettings = MapSettings(),
                         grounding: GroundingSettings = GroundingSettings()) -> Future:
        """`precompute` on a background thread. A click meanwhile is not queued behind it: `explain`
        computes a word that is not cached yet at once (the model's hooked forward is shared in turn)."""
        return self._background.submit(self.precompute, load_image(image), caption, settings, grounding)

    def wait_for_precompute(self) -> None:
        """Block until every background precompute submitted so far is done (the stress check samples memory
        then; the page never waits: its clicks are served meanwhile)."""
        self._background.submit(lambda: None).result()

    @staticmethod
    def _result_key(item: _Prepared, settings: MapSettings, grounding: GroundingSettings) -> tuple:
        """What an explanation depends on besides the image: the sequence, the target and the settings."""
        return ("explanation", item.token_ids, item.target.positions, settings, grounding)

    def _prepare_query(self, query: Query, caption: Caption) -> _Prepared:
        """Resolve a query to caption words (index, or a phrase found in the caption) or free-text tokens."""
        if isinstance(query, bool) or not isinstance(query, (int, str)):
            raise QueryError(f"A query is a word index or a text, got {type(query).__name__}.")
        if isinstance(query, int):
            if not 0 <= query < len(caption.words):
                raise QueryError(f"Word index {query} is out of range: the caption has {len(caption.words)} words.")
            return self._in_caption(query, caption, (caption.words[query],))
        text = query.strip()
        if not text:
            raise QueryError("The query is empty: click a caption word or type a word to explain.")
        if len(text) > MAX_QUERY_CHARS:
            raise QueryError(f"The query is too long ({len(text)} characters; at most {MAX_QUERY_CHARS}). "
                             "Type a word or a short phrase.")
        query_ids = self.captioner.tokenize(text)
        if len(query_ids) > MAX_QUERY_TOKENS:
            raise QueryError(f"The query is too long ({len(query_ids)} tokens); at most {MAX_QUERY_TOKENS} "
                             "tokens can be explained. Type a word or a short phrase.")
        if not any(piece.kind in ("start", "continue") for piece in self.captioner.pieces(query_ids)):
            raise QueryError(f"'{text[:40]}' contains no word the captioner's vocabulary knows.")
        words = find_phrase(caption.words, caption.token_ids, query_ids)
        if words:
            return self._in_caption(query, caption, words)
        prefix = self.captioner.start_ids() + self.captioner.tokenize(self.captioner.neutral_prompt)
        token_ids = tuple(prefix + query_ids)
        return _Prepared(query, token_ids, Target(tuple(range(len(prefix), len(token_ids)))), ())

    @staticmethod
    def _in_caption(query: Query, caption: Caption, words: tuple[Word, ...]) -> _Prepared:
        return _Prepared(query, caption.token_ids, Target(tuple(p for w in words for p in w.token_positions)),
                         words)

    def _attribute(self, pixel_values: torch.Tensor, token_ids: Sequence[int], targets: list[Target],
                   settings: MapSettings,
                   image_size: tuple[int, int]) -> Iterator[tuple[float, dict[str, Heatmap], list[str]]]:
        """(log-probability, maps, notes) per target, one at a time as each backward pass finishes. A map type
        that fails leaves a note, not a failure: the user still gets the other maps."""
        layers = self.captioner.num_decoder_layers
        attention_layer = settings.cross_attention_layer
        if attention_layer is None:
            attention_layer = (2 * layers) // 3 if layers >= 3 else layers - 1
        map_types = settings.map_types()
        occluded = (self._occlude(settings.occlusion, pixel_values, token_ids, targets, image_size)
                    if settings.occlusion is not None else [({}, [])] * len(targets))
        computed = target_gradients(self.captioner, pixel_values, token_ids, targets, settings.vision_layer,
                                    attention_layer, settings.smoothgrad_samples, settings.smoothgrad_noise)
        for (logprob, gradients), (occlusion_map, occlusion_notes) in zip(computed, occluded):
            maps: dict[str, Heatmap] = {}
            notes: list[str] = []
            for map_type in map_types:
                try:
                    maps[map_type.key] = map_type.attribute(gradients, image_size)
                except Exception as err:  # noqa: BLE001 — any failure of one map must not cost the others
                    logger.exception("map %s failed", map_type.key)
                    notes.append(f"The {map_type.key} map could not be computed ({type(err).__name__}: {err}).")
            yield logprob, maps | occlusion_map, notes + occlusion_notes

    def _occlude(self, occlusion: Occlusion, pixel_values: torch.Tensor, token_ids: Sequence[int],
                 targets: list[Target], image_size: tuple[int, int]) -> list[tuple[dict[str, Heatmap], list[str]]]:
        """The occlusion map (one sweep serves every target) and a note with what it cost, per target."""
        try:
            heatmaps, cost = occlusion.attribute(self.captioner, pixel_values, token_ids, targets, image_size)
        except Exception as err:  # noqa: BLE001 — like any map type: a note, not a failure
            logger.exception("occlusion failed")
            return [({}, [f"The occlusion map could not be computed ({type(err).__name__}: {err})."])] * len(targets)
        note = (f"Occlusion cost: {cost.images} images in {cost.forward_passes} forward passes, "
                f"{cost.seconds:.2f} s (one sweep for {len(targets)} word(s)).")
        return [({Occlusion.key: heatmap}, [note]) for heatmap in heatmaps]

    def _finish(self, rgb: Image.Image, key: str, caption: Caption, item: _Prepared, logprob: float,
                maps: dict[str, Heatmap], notes: list[str], settings: GroundingSettings) -> Explanation:
        """Assemble the explanation, with grounding, verification and the CLIP map where CLIP is loaded."""
        tokens = tuple(self.captioner.token_strings([item.token_ids[p] for p in item.target.positions]))
        text = " ".join(w.text for w in item.words) if item.words else str(item.query).strip()
        context_ids = list(item.token_ids[: item.target.positions[0]])
        context, _ = align(self.captioner.pieces(context_ids), context_ids, [0.0] * len(context_ids))
        explanation = Explanation(
            query=str(item.query), in_caption=bool(item.words), words=item.words, tokens=tokens,
            token_positions=item.target.positions, context=context, word_logprob=logprob, maps=maps,
            image_size=rgb.size, caption=caption, notes=notes)
        if not item.words:
            explanation.notes.append(f"'{text}' is not in the caption: explained as log p(query | image) after "
                                     f"the neutral prompt '{self.captioner.neutral_prompt}'.")
        if self.clip is not None and settings.enabled:
            try:
                self._ground(explanation, rgb, key, item, text, settings)
            except Exception as err:  # noqa: BLE001 — the maps are still worth showing without a region
                logger.exception("grounding failed")
                explanation.notes.append(f"No region: grounding failed ({err})")
        return explanation

    def _ground(self, explanation: Explanation, rgb: Image.Image, key: str, item: _Prepared, text: str,
                settings: GroundingSettings) -> None:
        """Add the region, the CLIP relevance map and the verification numbers to `explanation`."""
        maps = explanation.maps
        grounder = Grounder(self.clip, template=settings.template, top_k=settings.top_k, stage2=settings.stage2,
                            fusion_weight=settings.fusion_weight)
        segmenter = resolve_name(settings.segmenter or self.default_segmenter)
        prepared = self.cache.get_or_compute(
            key, ("grounded", segmenter), lambda: grounder.prepare(rgb, self.segmenter(segmenter).segment(rgb)))
        cam = maps["gradcam"].values if "gradcam" in maps else None
        explanation.grounding = grounder.ground(prepared, text, cam=cam)
        explanation.segmenter = prepared.segmenter
        relevance = self.clip.relevance_map(rgb, explanation.grounding.prompt)  # its hooks are per thread
        maps["clip_relevance"] = Heatmap(relevance, relevance, "CLIP relevance (Chefer et al. 2021)",
                                         f"{self.clip.name} vision transformer, all blocks")
        if settings.verify:  # several words often share one region: its forward passes are made once
            mask = explanation.grounding.mask
            region = image_key(Image.fromarray(mask))
            region_caption = self.cache.get_or_compute(key, ("region caption", region),
                                                       lambda: caption_region(self.captioner, rgb, mask))
            logprobs = self.cache.get_or_compute(
                key, ("region logprobs", region, item.token_ids),
                lambda: composite_logprobs(self.captioner, rgb, mask, item.token_ids))
            explanation.verification = verify(explanation.grounding, region_caption, logprobs, item.target,
                                              [w.text for w in item.words] or text.split(),
                                              explanation.word_logprob, maps)

    # --- per-image caches -----------------------------------------------------------------------------------

    def segmenter(self, name: str | None = None) -> Segmenter:
        """The segmenter called `name` (default: the explainer's), loaded once and reused."""
        name = resolve_name(name or self.default_segmenter)
        with self._lock:
            if name not in self._segmenters:
                device = str(self.captioner.device)
                self._segmenters[name] = load_segmenter(name, device=device, **self.segmenter_options.get(name, {}))
            return self._segmenters[name]


class Explainers:
    """One explainer per captioner name, loaded on first use, all sharing one CLIP model and segmenters
    (the playground's captioner choice and side-by-side comparison)."""

    def __init__(self, first: Explainer, name: str, load: Callable[[str], Captioner]) -> None:
        self.default = name
        self._explainers = {name: first}
        self._load = load
        self._lock = threading.Lock()

    def get(self, name: str | None = None) -> Explainer:
        name = name or self.default
        with self._lock:
            if name not in self._explainers:
                self._explainers[name] = self._explainers[self.default].with_captioner(self._load(name))
            return self._explainers[name]
