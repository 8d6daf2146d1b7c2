"""The public entry point: caption an image, then explain any caption word or free query.

`Explainer` wires the pieces together and holds no model maths itself: captioners (`ipag.captioners`) run
the captioning models, `ipag.attribution` computes a word's gradients, `ipag.maps` turns them into
heatmaps, `ipag.grounding` picks the region CLIP matches to the word among `ipag.segmenters`' proposals,
and `ipag.verify` checks that region against the captioner.

A word is explained in stages, each a task on the explainer's `Scheduler` (one worker, most urgent first)
whose results are cached per image: the maps from the word's backward pass (token maps first, then the
pixel maps), its region, the maps with passes of their own, and the trust numbers. `explain_stages`
yields the explanation after each stage, so a page can show the first maps while the rest is computed;
`precompute_async` queues every word of a caption in the background, and a click on a word that is not
ready yet raises that word's tasks to the front instead of computing them a second time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from .align import align, find_phrase
from .attribution import AttributionPass, PassSpec, Target
from .cache import DEFAULT_CACHE_MB, ImageCache, image_key
from .captioners import Captioner, DecodeOptions, load_captioner, tiny_captioner
from .device import resolve_device
from .errors import QueryError
from .grounding import ClipModel, GroundedImage, Grounder, Grounding, noun_phrase
from .images import ImageInput, load_image
from .maps import MAP_TYPES, MapContext, MapType
from .results import Caption, Explanation, Heatmap, Word
from .sanity import SanityCheck, compare, randomize_top_blocks
from .schedule import Key, Plan, Priority, Publish, Scheduler
from .segmenters import SEGMENTER_NAMES, Segmenter, load_segmenter, resolve_name
from .settings import DEFAULTS, Settings
from .verify import RegionCaption, blank_logprobs, caption_region, composite_logprobs, verify

logger = logging.getLogger(__name__)

#: The longest free query we explain, in tokens (a caption is ~10; longer text is not a "word" any more).
MAX_QUERY_TOKENS = 32
#: Checked before tokenizing, so a pasted novel costs nothing.
MAX_QUERY_CHARS = 200

Query = int | str


@dataclass(frozen=True)
class _Prepared:
    """A query's resolved target: the token sequence to teacher-force and the positions explained."""

    query: Query
    token_ids: tuple[int, ...]
    target: Target
    words: tuple[Word, ...]  #: the caption words explained; () for free text

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words) if self.words else str(self.query).strip()


class _Maps(NamedTuple):
    """What a maps stage publishes: the word's log-probability (None for stages that do not compute it),
    its maps by key, and notes (a map type that failed, what a map cost)."""

    logprob: float | None
    maps: dict[str, Heatmap]
    notes: list[str]


class _Region(NamedTuple):
    grounding: Grounding | None
    segmenter: str
    notes: list[str]


class _Checks(NamedTuple):
    """The model-heavy half of the trust numbers (cached per region and per sequence; `verify` and `assemble`
    make the numbers): the region's own caption, the sequence's token log-probabilities with only the region /
    without it, and with a blank image (the language prior)."""

    region_caption: RegionCaption | None
    logprobs: Any
    notes: list[str]
    prior: Any = None


@dataclass(frozen=True)
class _Stage:
    name: str  #: what the page says is still coming, e.g. "region"
    keys: tuple[Key, ...]
    work: Callable[[Publish], None]


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
        self.scheduler = Scheduler(self.cache)
        self.scheduler.on_idle(self._drop_pass)
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()  # segmenters load once, even when two users ask at the same time
        self._pass: tuple[tuple, AttributionPass] | None = None  # the worker's current forward (see `_attribution`)

    @classmethod
    def from_pretrained(cls, captioner: str = "Salesforce/blip-image-captioning-base",
                        clip: str | None = "ViT-B-32/openai", segmenter: str = "auto",
                        device: str = "auto", cache_mb: float = DEFAULT_CACHE_MB) -> "Explainer":
        """Load real models by hub id or local folder, or a ClipCap checkpoint file (downloaded once, then cached,
        with progress bars).

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

    @classmethod
    def synthetic(cls, device: str = "cpu", cache_mb: float = DEFAULT_CACHE_MB,
                  folder: str | Path | None = None) -> "Explainer":
        """The captioner and CLIP trained here on generated scenes (`ipag.synthetic`), from `folder` (default:
        the ones shipped in `models/`), with superpixels tuned for flat-colour scenes as the segmenter: the
        offline demo whose captions mean something, and the models of the ground-truth benchmark."""
        from .synthetic.models import SCENE_SUPERPIXELS, model_names

        captioner, clip = model_names(folder)
        explainer = cls.from_pretrained(captioner, clip, "superpixels", device, cache_mb)
        explainer.segmenter_options = {"superpixels": SCENE_SUPERPIXELS}
        return explainer

    def with_captioner(self, captioner: Captioner) -> "Explainer":
        """An explainer for another captioner that shares this one's CLIP model, loaded segmenters, cache (and its
        budget: keys name their captioner) and worker (so precomputing for several captioners never runs more
        than one job at a time)."""
        other = Explainer(captioner, self.clip, self.default_segmenter, self.segmenter_options)
        other._segmenters, other._lock, other.cache, other.scheduler = (
            self._segmenters, self._lock, self.cache, self.scheduler)
        other.scheduler.on_idle(other._drop_pass)
        return other

    def resolve(self, settings: Settings = DEFAULTS) -> Settings:
        """`settings` with every default made concrete for these models (vision block and decoder layer as
        non-negative indices, the segmenter's real name), so that equal computations get equal cache keys.
        A captioner without cross-attention gets no decoder layer (None), whatever was asked."""
        captioner = self.captioner
        layers, decoder = len(captioner.vision_layers), captioner.num_decoder_layers
        cross = settings.cross_attention_layer
        if cross is None:  # a late-middle layer, ⌊2L/3⌋ (8 of 12 for BLIP-base), LAVIS's choice for BLIP
            cross = (2 * decoder) // 3 if decoder >= 3 else decoder - 1
        segmenter = resolve_name(settings.segmenter or self.default_segmenter)
        if segmenter not in SEGMENTER_NAMES:
            raise ValueError(f"Unknown segmenter {settings.segmenter!r}; choose one of {', '.join(SEGMENTER_NAMES)}.")
        return replace(settings, vision_layer=captioner.resolve_layer(settings.vision_layer, layers, "Vision layer"),
                       # without cross-attention there is no layer to choose: the setting is ignored
                       cross_attention_layer=captioner.resolve_layer(cross, decoder, "Cross-attention layer")
                       if decoder else None,
                       segmenter=segmenter)

    def grounded_image(self, image: ImageInput, settings: Settings = DEFAULTS) -> GroundedImage:
        """What the regions of `image` are chosen among with `settings`' segmenter: its proposals and their CLIP
        embeddings (cached; computed here if no word of the image was grounded yet)."""
        rgb = load_image(image)
        return self._grounded(rgb, image_key(rgb), self.resolve(settings))

    def _grounded(self, rgb: Image.Image, image: str, settings: Settings) -> GroundedImage:
        segmenter = settings.segmenter
        return self.cache.get_or_compute(image, ("grounded", segmenter), lambda: Grounder.from_settings(
            self.clip, settings).prepare(rgb, self.segmenter(segmenter).segment(rgb)))

    def wait_until_idle(self, timeout: float | None = None) -> bool:
        """Block until the worker has nothing queued or running (every background precompute done); returns
        False if `timeout` seconds passed first. The page never waits: its clicks are served meanwhile."""
        return self.scheduler.wait_idle(timeout)

    def clear_cache(self) -> None:
        """Forget everything computed for every image (models stay loaded): the next request starts cold."""
        self.cache.clear()

    # --- captioning -----------------------------------------------------------------------------------------

    def caption(self, image: ImageInput, settings: Settings = DEFAULTS) -> Caption:
        """Generate a caption and align it to clickable words with their log-probabilities (cached)."""
        rgb = load_image(image)
        options = DecodeOptions(settings.num_beams, settings.max_new_tokens)
        key = (image_key(rgb), (self._id, "caption", options))

        def work(publish: Publish) -> None:
            publish(key, self._caption_pixels(self.captioner.preprocess(rgb), options))

        return self.scheduler.result(key, work, Priority.CAPTION)

    def _caption_pixels(self, pixel_values, options: DecodeOptions) -> Caption:
        return self.caption_from_ids(pixel_values, *self.captioner.generate_scored(pixel_values, options))

    def caption_from_ids(self, pixel_values, token_ids: Sequence[int],
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
                settings: Settings = DEFAULTS) -> Explanation:
        """Explain one caption word (by index or text) or a free-text query; see `explain_stages`."""
        for explanation in self.explain_stages(image, query, caption, settings):
            pass
        return explanation

    def explain_stages(self, image: ImageInput, query: Query, caption: Caption | None = None,
                       settings: Settings = DEFAULTS) -> Iterator[Explanation]:
        """The explanation after each stage is ready (token maps, pixel maps, region, more maps, trust
        numbers); the last one is complete, and each says in `pending` what is still coming.

        A query is a word index, a caption word or phrase (matched on tokens, first occurrence), or free
        text. Free text is explained as log p(query | image) after the neutral prompt
        `captioner.neutral_prompt`, and the result says so. `caption` defaults to the image's caption with
        these settings. What was computed before (or by the background precompute) is reused.
        """
        word = self._word(image, query, caption, settings)
        stages = word.stages()
        results: dict[Key, Any] = {}
        for index, stage in enumerate(stages):
            futures = self.scheduler.request(stage.keys, stage.work, Priority.CLICK)
            for key in stage.keys:
                if results and not futures[key].done():  # show what there is before waiting for more
                    yield word.assemble(results, [s.name for s in stages[index:]])
                results[key] = futures[key].result()
        yield word.assemble(results, [])

    def explain_many(self, image: ImageInput, queries: Sequence[Query], caption: Caption | None = None,
                     settings: Settings = DEFAULTS) -> list[Explanation]:
        """Explain several queries. All stages of all queries are queued at once, every word's maps first,
        so that the words of a caption share one forward pass of the captioner."""
        rgb = load_image(image)
        caption = caption or self.caption(rgb, settings)
        words = [self._word(rgb, query, caption, settings) for query in queries]
        futures = self._queue(words, Priority.CLICK)
        return [word.assemble({key: futures[key].result() for key in word.keys()}, []) for word in words]

    def precompute(self, image: ImageInput, caption: Caption, settings: Settings = DEFAULTS) -> list[Explanation]:
        """Explain every caption word (see `precompute_async`) and wait for all of them."""
        return self.explain_many(image, list(range(len(caption.words))), caption, settings)

    def precompute_async(self, image: ImageInput, caption: Caption, settings: Settings = DEFAULTS) -> Plan:
        """Queue every caption word's stages in the background (every word's maps first, then regions, …) and
        return the plan; `Plan.cancel()` drops what has not started (e.g. when the user changes a setting).
        Clicks go before it, and a click on a word it has queued raises that word's tasks to the front."""
        rgb = load_image(image)
        words = [self._word(rgb, index, caption, settings) for index in range(len(caption.words))]
        plan = self.scheduler.new_plan()
        self._queue(words, Priority.BACKGROUND, plan)
        return plan

    def choose_region(self, image: ImageInput, explanation: Explanation, index: int) -> Explanation:
        """`explanation` with its candidate region `index` as the region, and the trust numbers recomputed for
        that region (the model runs are cached per region, so picking a candidate twice costs nothing)."""
        if explanation.grounding is None:
            raise QueryError("This explanation has no region to choose from (grounding was off).")
        rgb = load_image(image)
        key = image_key(rgb)
        grounding = explanation.grounding.choose(index)
        token_ids = explanation.token_ids
        checks_key = (key, (self._id, "region checks", image_key(Image.fromarray(grounding.mask)), token_ids))
        checks = self.scheduler.result(checks_key, lambda publish: publish(
            checks_key, self._region_checks(rgb, key, grounding.mask, token_ids)))
        verification = None
        if checks.region_caption is not None:
            words = [w.text for w in explanation.words] or explanation.query.split()
            verification = verify(grounding, checks.region_caption, checks.logprobs, Target(explanation.token_positions),
                                  words, explanation.word_logprob, explanation.maps)
        return replace(explanation, grounding=grounding, verification=verification,
                       notes=explanation.notes + checks.notes)

    def sanity_check(self, image: ImageInput, explanation: Explanation, blocks: int | None = None) -> SanityCheck:
        """Explain the same word again with the top `blocks` vision blocks re-initialised (default: the top half)
        and compare each captioner map with the original (`ipag.sanity`); cached per word and settings."""
        rgb = load_image(image)
        total = len(self.captioner.vision_layers)
        blocks = blocks or max(1, total // 2)
        settings = replace(explanation.settings or self.resolve(), grounding=False, verify=False)
        key = (image_key(rgb), (self._id, "sanity", explanation.token_ids, explanation.token_positions, settings,
                                blocks))

        def work(publish: Publish) -> None:
            other = Explainer(randomize_top_blocks(self.captioner, blocks), self.clip, self.default_segmenter,
                              self.segmenter_options)
            try:
                again = other.explain(rgb, _same_query(explanation), explanation.caption, settings)
            finally:
                other.scheduler.close()
            publish(key, compare(explanation, again, blocks, total))

        return self.scheduler.result(key, work)

    def _queue(self, words: list["_Word"], priority: Priority, plan: Plan | None = None) -> dict[Key, Any]:
        futures: dict[Key, Any] = {}
        staged = [word.stages() for word in words]
        for depth in range(max((len(stages) for stages in staged), default=0)):
            for stages in staged:
                if depth < len(stages):
                    stage = stages[depth]
                    futures |= self.scheduler.request(stage.keys, stage.work, priority, plan)
        return futures

    def _word(self, image: ImageInput, query: Query, caption: Caption | None, settings: Settings) -> "_Word":
        rgb = load_image(image)
        settings = self.resolve(settings)
        caption = caption or self.caption(rgb, settings)
        return _Word(self, rgb, image_key(rgb), caption, self._prepare_query(query, caption), settings)

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

    # --- what the worker runs -------------------------------------------------------------------------------------

    @property
    def _id(self) -> str:
        """Which captioner a cache key belongs to (explainers for several captioners share one cache)."""
        return self.captioner.describe()

    def _attribution(self, rgb: Image.Image, key: str, token_ids: tuple[int, ...], spec: PassSpec) -> AttributionPass:
        """The forward pass for this image, sequence and spec: the one kept from the previous word when it
        matches (the words of a caption share it), else a new one replacing it. Only the worker calls this."""
        wanted = (key, token_ids, spec)
        if self._pass is None or self._pass[0] != wanted:
            self._pass = None  # free the old graph before building the new one
            self._pass = (wanted, AttributionPass(self.captioner, self.captioner.preprocess(rgb), token_ids, spec))
        return self._pass[1]

    def _region_checks(self, rgb: Image.Image, image: str, mask, token_ids: tuple[int, ...]) -> "_Checks":
        """The region's own caption and the sequence's token log-probabilities with only the region / without
        it, cached per region: several words often share one region, and its forward passes are made once."""
        area = image_key(Image.fromarray(mask))
        captioner = self.captioner
        try:
            return _Checks(
                self.cache.get_or_compute(image, (self._id, "region caption", area),
                                          lambda: caption_region(captioner, rgb, mask)),
                self.cache.get_or_compute(image, (self._id, "region logprobs", area, token_ids),
                                          lambda: composite_logprobs(captioner, rgb, mask, token_ids)),
                [])
        except Exception as err:  # noqa: BLE001 — the region and maps stand without their trust numbers
            logger.exception("verification failed")
            return _Checks(None, None, [f"No trust numbers: the region check failed ({err})"])

    def _drop_pass(self) -> None:
        """Free the kept autograd graph (hundreds of MB for BLIP-base) once the worker has nothing to do."""
        self._pass = None

    def segmenter(self, name: str | None = None) -> Segmenter:
        """The segmenter called `name` (default: the explainer's), loaded once and reused."""
        name = resolve_name(name or self.default_segmenter)
        with self._lock:
            if name not in self._segmenters:
                device = str(self.captioner.device)
                self._segmenters[name] = load_segmenter(name, device=device, **self.segmenter_options.get(name, {}))
            return self._segmenters[name]


@dataclass
class _Word:
    """One query of one image with resolved settings: the keys and work of its stages, and how to assemble
    an explanation from their results."""

    explainer: Explainer
    rgb: Image.Image
    image: str  #: the image's cache key
    caption: Caption
    item: _Prepared
    settings: Settings
    map_types: dict[str, list[MapType]] = field(init=False)
    unavailable: dict[str, str] = field(init=False)  #: map key → why this captioner cannot have it

    def __post_init__(self) -> None:
        self.map_types = {"tokens": [], "pixels": [], "own": []}
        self.unavailable = {}
        for map_type in MAP_TYPES:
            chosen = map_type.from_settings(self.settings)
            if chosen is None or (chosen.needs_clip and self.explainer.clip is None):
                continue
            reason = chosen.unavailable(self.explainer.captioner)
            if reason:
                self.unavailable[chosen.key] = reason
            else:
                self.map_types[chosen.needs].append(chosen)

    # --- stages and their keys ------------------------------------------------------------------------------

    def _key(self, *parts: Any) -> Key:
        item = self.item
        return self.image, (self.explainer._id, *parts, item.token_ids, item.target.positions)

    @property
    def spec(self) -> PassSpec:
        settings = self.settings
        samples = settings.smoothgrad_samples if settings.saliency == "SmoothGrad" else 0
        attentions = any(map_type.needs_attentions for kind in ("tokens", "pixels") for map_type in self.map_types[kind])
        return PassSpec(settings.vision_layer, settings.cross_attention_layer, samples, settings.smoothgrad_noise,
                        attentions=attentions)

    @property
    def grounded(self) -> bool:
        return self.explainer.clip is not None and self.settings.grounding

    def _maps_keys(self) -> tuple[Key, Key]:
        """Where the token maps and the pixel maps of the word's backward pass go."""
        return (self._key("token maps", self.spec, tuple(self.map_types["tokens"])),
                self._key("pixel maps", self.spec, tuple(self.map_types["pixels"])))

    def _own_key(self) -> Key:
        return self._key("own maps", self.item.text, tuple(self.map_types["own"]))

    @property
    def grounded_text(self) -> str:
        """What the region is asked for: a clicked caption word's noun phrase ("red circle" for "red") when
        `ground_phrase`, else the query as typed (or the caption phrase it matched)."""
        item, caption = self.item, self.caption
        if self.settings.ground_phrase and isinstance(item.query, int):
            return noun_phrase(caption.text, [word.span for word in caption.words], item.query)
        return item.text

    def _fusion_stage(self) -> tuple[Key, Callable[[Publish], None]] | None:
        """The stage whose maps include the one fused into the region's choice (`fusion_map`), or None when
        fusion is off or that map is not computed with these settings."""
        settings = self.settings
        if not settings.fusion_weight:
            return None
        token_key, pixel_key = self._maps_keys()
        stages = {"tokens": (token_key, self._token_maps), "pixels": (pixel_key, self._pixel_maps),
                  "own": (self._own_key(), self._own_maps)}
        return next((stages[needs] for needs, map_types in self.map_types.items()
                     if any(map_type.key == settings.fusion_map for map_type in map_types)), None)

    def _region_key(self) -> Key:
        """The region depends on the grounded text and the grounding settings (and on the word's maps if fused)."""
        fusion = self._fusion_stage()
        return self.image, ("region", self.grounded_text, self.settings.key("grounding"),
                            None if fusion is None else fusion[0][1])

    def _checks_key(self) -> Key:
        return self._key("checks", self._region_key() if self.grounded else None)

    def stages(self) -> list[_Stage]:
        """In the order a user wants them: the maps of the backward pass (the token maps, then saliency), the
        region, the maps with passes of their own, the trust numbers. Names say what is still coming."""
        token_key, pixel_key = self._maps_keys()
        stages = [_Stage("first maps", (token_key,), self._token_maps), _Stage("saliency", (pixel_key,), self._pixel_maps)]
        if self.grounded:
            stages.append(_Stage("region", (self._region_key(),), self._region))
        if self.map_types["own"]:
            stages.append(_Stage("more maps", (self._own_key(),), self._own_maps))
        if self.settings.verify:
            stages.append(_Stage("trust numbers", (self._checks_key(),), self._checks))
        return stages

    def keys(self) -> list[Key]:
        return [key for stage in self.stages() for key in stage.keys]

    # --- work (run by the scheduler's worker) ----------------------------------------------------------------

    def _context(self, **values: Any) -> MapContext:
        explainer = self.explainer
        return MapContext(self.rgb.size, captioner=explainer.captioner, token_ids=self.item.token_ids,
                          target=self.item.target, image=self.rgb, text=self.item.text, clip=explainer.clip,
                          memo=lambda key, compute: explainer.cache.get_or_compute(self.image, (explainer._id, key),
                                                                                   compute), **values)

    def _token_maps(self, publish: Publish) -> None:
        """The maps of the first step of the word's backward pass (through the decoder to the vision layer)."""
        attribution = self.explainer._attribution(self.rgb, self.image, self.item.token_ids, self.spec)
        logprob, gradients, _ = attribution.first_step(self.item.target)
        publish(self._maps_keys()[0], _Maps(logprob, *_attribute(self.map_types["tokens"],
                                                                 self._context(gradients=gradients))))

    def _pixel_maps(self, publish: Publish) -> None:
        """The maps of the second step (on through the vision encoder to the pixels). A task of its own, so that a
        click can go between a word's first maps and its saliency: the first step's results wait in the kept
        forward pass."""
        attribution = self.explainer._attribution(self.rgb, self.image, self.item.token_ids, self.spec)
        logprob, gradients, vision_grad = attribution.first_step(self.item.target)
        if self.map_types["pixels"]:
            gradients = attribution.pixel_gradients(self.item.target, gradients, vision_grad)
        context = self._context(gradients=gradients, pixel_values=attribution.clean.pixel_values.detach())
        publish(self._maps_keys()[1], _Maps(logprob, *_attribute(self.map_types["pixels"], context)))

    def _own_maps(self, publish: Publish) -> None:
        pixel_values = self.explainer.captioner.preprocess(self.rgb)
        publish(self._own_key(), _Maps(None, *_attribute(self.map_types["own"], self._context(pixel_values=pixel_values))))

    def _region(self, publish: Publish) -> None:
        explainer, settings = self.explainer, self.settings
        try:
            prepared = explainer._grounded(self.rgb, self.image, settings)
            cam, notes = None, []
            fusion = self._fusion_stage()
            if fusion is not None:
                fused = explainer.scheduler.result(*fusion).maps.get(settings.fusion_map)
                cam = fused.at(prepared.pixels.shape[1::-1]) if fused is not None else None
            if settings.fusion_weight and cam is None:
                notes.append(f"The region was chosen without the captioner's evidence: its {settings.fusion_map!r} "
                             "map is not computed with these settings (or failed).")
            grounding = Grounder.from_settings(explainer.clip, settings).ground(prepared, self.grounded_text, cam=cam)
            result = _Region(grounding, prepared.segmenter, notes)
        except Exception as err:  # noqa: BLE001 — the maps are still worth showing without a region
            logger.exception("grounding failed")
            result = _Region(None, settings.segmenter, [f"No region: grounding failed ({err})"])
        publish(self._region_key(), result)

    def _checks(self, publish: Publish) -> None:
        """The trust numbers' model runs: the language prior of the word's sequence (one forward, shared by
        every word of a caption) and, when it has one, the checks of the word's region."""
        explainer, token_ids = self.explainer, self.item.token_ids
        prior = explainer.cache.get_or_compute(self.image, (explainer._id, "prior", token_ids),
                                               lambda: blank_logprobs(explainer.captioner, self.rgb.size, token_ids))
        checks = _Checks(None, None, [])
        if self.grounded:
            region = explainer.scheduler.result(self._region_key(), self._region)
            if region.grounding is not None:
                checks = explainer._region_checks(self.rgb, self.image, region.grounding.mask, token_ids)
        publish(self._checks_key(), checks._replace(prior=prior))

    # --- the result -----------------------------------------------------------------------------------------------

    def assemble(self, results: dict[Key, Any], pending: list[str]) -> Explanation:
        """The explanation from the stage results computed so far (cheap: no model runs here)."""
        item, captioner = self.item, self.explainer.captioner
        found = [results[key] for key in self.keys() if key in results]
        maps: dict[str, Heatmap] = {}
        notes: list[str] = []
        logprob = 0.0
        region: _Region | None = None
        checks: _Checks | None = None
        for value in found:
            if isinstance(value, _Maps):
                maps |= value.maps
                notes += value.notes
                logprob = value.logprob if value.logprob is not None else logprob
            elif isinstance(value, _Region):
                region = value
                notes += value.notes
            else:
                checks = value
                notes += value.notes
        if not item.words:
            notes.append(f"'{item.text}' is not in the caption: explained as log p(query | image) after the "
                         f"neutral prompt '{captioner.neutral_prompt}'.")
        notes += dict.fromkeys(self.unavailable.values())  # one note per reason
        context_ids = list(item.token_ids[: item.target.positions[0]])
        context, _ = align(captioner.pieces(context_ids), context_ids, [0.0] * len(context_ids))
        grounding = region.grounding if region else None
        ordered = {map_type.key: maps[map_type.key] for map_type in MAP_TYPES if map_type.key in maps}
        verification = None
        if grounding is not None and checks is not None and checks.region_caption is not None:
            verification = verify(grounding, checks.region_caption, checks.logprobs, item.target,
                                  [w.text for w in item.words] or item.text.split(), logprob, ordered)
        prior = None if checks is None else float(checks.prior[item.target.rows].sum())
        return Explanation(
            query=str(item.query), in_caption=bool(item.words), words=item.words,
            tokens=tuple(captioner.token_strings([item.token_ids[p] for p in item.target.positions])),
            token_positions=item.target.positions, context=context, word_logprob=logprob, maps=ordered,
            unavailable_maps=dict(self.unavailable), token_ids=item.token_ids,
            image_size=self.rgb.size, caption=self.caption, grounding=grounding, verification=verification,
            segmenter=region.segmenter if region else "", notes=notes, settings=self.settings,
            pending=tuple(pending), prior_logprob=prior)


def _same_query(explanation: Explanation) -> Query:
    """A query that asks for what `explanation` explains: its word by index, its caption phrase, or its free text."""
    if not explanation.in_caption:
        return explanation.query
    if len(explanation.words) == 1:
        return explanation.words[0].index
    return " ".join(word.text for word in explanation.words)


def _attribute(map_types: Sequence[MapType], context: MapContext) -> tuple[dict[str, Heatmap], list[str]]:
    """Each map type's heatmap; one that fails leaves a note, not a failure: the user still gets the others."""
    maps: dict[str, Heatmap] = {}
    notes: list[str] = []
    for map_type in map_types:
        try:
            maps[map_type.key] = map_type.attribute(context)
            note = map_type.note(context)
            if note:
                notes.append(note)
        except Exception as err:  # noqa: BLE001 — any failure of one map must not cost the others
            logger.exception("map %s failed", map_type.key)
            notes.append(f"The {map_type.title} map could not be computed ({type(err).__name__}: {err}).")
    return maps, notes


class Explainers:
    """One explainer per captioner name, loaded on first use, all sharing one CLIP model, segmenters, cache
    and worker (the playground's captioner choice and side-by-side comparison)."""

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
