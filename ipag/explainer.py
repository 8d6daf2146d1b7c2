"""The public entry point: caption an image, then explain any caption word or free query.

`Explainer` wires the pieces together and holds no model maths itself: captioners (`ipag.captioners`) run
the captioning models, and a word's explanation is computed in stages by `ipag.word` (its gradients in
`ipag.attribution`, its maps in `ipag.maps`, its region in `ipag.grounding` among `ipag.segmenters`'
proposals, its trust numbers in `ipag.verify`).

Every stage is a task on the explainer's `Scheduler` (one worker, most urgent first) whose results are cached
per image. `explain_stages` yields the explanation after each stage, so a page can show the first maps while
the rest is computed; `precompute_async` queues every word of a caption in the background, and a click on a
word that is not ready yet raises that word's tasks to the front instead of computing them a second time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from .align import align, find_phrase
from .attribution import KeptPass
from .budget import section
from .cache import DEFAULT_CACHE_MB, ImageCache, image_key
from .captioners import Captioner, DecodeOptions, known_captioners, load_captioner, tiny_captioner
from .device import resolve_device
from .errors import QueryError
from .grounding import ClipModel, GroundedImage
from .images import ImageInput, load_image
from .precision import choose_precision
from .results import Caption, Explanation, Word
from .sanity import SanityCascade, SanityCheck, cascade_levels, compare, randomize_top_blocks
from .schedule import Key, Plan, Priority, Publish, Scheduler
from .segmenters import Segmenter, load_segmenter, resolve_name
from .settings import DEFAULTS, Settings
from .target import Target
from .verify import verify
from .word import Keys, PreparedQuery, Query, WordStages, Workshop, grounded_image, region_checks

#: The longest free query we explain, in tokens (a caption is ~10; longer text is not a "word" any more).
MAX_QUERY_TOKENS = 32
#: Checked before tokenizing, so a pasted novel costs nothing.
MAX_QUERY_CHARS = 200


class Explainer:
    """Captions images and explains, per word, why the captioner said it and where it is."""

    def __init__(self, captioner: Captioner, clip: ClipModel | None = None, segmenter: str = "auto",
                 segmenter_options: dict | None = None, cache_mb: float = DEFAULT_CACHE_MB,
                 precision: str | None = None) -> None:
        """`cache_mb` bounds the memory of what is kept for the images seen (captions, segments, explanations)
        in MB (2²⁰ bytes): least recently used entries are evicted beyond it, and one image keeps at most a
        quarter of it (`ipag.cache`). `precision` ("auto", "float32", "bfloat16": `ipag.precision`) sets what the
        captioner and CLIP compute in; None keeps theirs (float32 unless set)."""
        self.captioner = captioner
        self.clip = clip
        if precision is not None:
            chosen = choose_precision(precision, captioner.device)
            for model in (captioner, clip):
                if model is not None:
                    model.precision = chosen
        self.default_segmenter = segmenter
        self.segmenter_options = segmenter_options or {}
        self.cache = ImageCache(round(cache_mb * 2**20))
        self.scheduler = Scheduler(self.cache)
        self._kept = KeptPass()  # the worker's current forward pass, shared by the words of a caption
        self.scheduler.on_idle(self._kept.drop)
        self._segmenters: dict[str, Segmenter] = {}
        self._lock = threading.Lock()  # segmenters load once, even when two users ask at the same time

    @classmethod
    def from_pretrained(cls, captioner: str = "Salesforce/blip-image-captioning-base",
                        clip: str | None = "ViT-B-32/openai", segmenter: str = "auto",
                        device: str = "auto", cache_mb: float = DEFAULT_CACHE_MB,
                        precision: str = "auto") -> "Explainer":
        """Load real models by hub id or local folder, or a ClipCap checkpoint file (downloaded once, then cached,
        with progress bars).

        `clip` is "architecture/pretrained-tag" (open_clip names) or "architecture/path/to/checkpoint";
        None disables grounding. Raises `ModelUnavailableError` naming the model and the fix when a model
        cannot be loaded. Segmenters load on first use. `precision` "auto": bfloat16 for the stages that keep the
        maps where the device computes it natively (`ipag.precision`).
        """
        resolved = resolve_device(device)
        captioner_model = load_captioner(captioner, resolved)
        clip_model = None
        if clip:
            architecture, _, pretrained = clip.partition("/")
            clip_model = ClipModel.from_pretrained(architecture, pretrained or "openai", resolved)
        return cls(captioner_model, clip_model, segmenter, cache_mb=cache_mb, precision=precision)

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu", captioner: str = "blip-base",
             cache_mb: float = DEFAULT_CACHE_MB, precision: str = "float32") -> "Explainer":
        """The whole pipeline on tiny random models built from configs (a captioner by friendly name, CLIP)
        and scikit-image superpixels: offline, in seconds. For tests, CI and `playground.py --tiny`: in float32
        unless asked, because tests compare their numbers with exact computations. A `captioner` that is no friendly
        name is loaded as it is (a folder of a tiny model written by `save_pretrained`, say)."""
        resolved = resolve_device(device)
        model = tiny_captioner(captioner, seed, resolved) if captioner in known_captioners() else \
            load_captioner(captioner, resolved)
        return cls(model, ClipModel.tiny(seed, resolved), "superpixels",
                   segmenter_options={"torchvision": {"pretrained": False}},  # random Mask R-CNN: no download
                   cache_mb=cache_mb, precision=precision)

    @classmethod
    def synthetic(cls, device: str = "cpu", cache_mb: float = DEFAULT_CACHE_MB, folder: str | Path | None = None,
                  captioner: str = "blip", precision: str = "auto") -> "Explainer":
        """A captioner and the CLIP trained here on generated scenes (`ipag.synthetic`), from `folder` (default:
        the ones shipped in `models/`), with superpixels tuned for flat-colour scenes as the segmenter: the
        offline demo whose captions mean something, and the models of the ground-truth benchmark. `captioner`:
        "blip" or "vit-gpt2" (`ipag.synthetic.models.FAMILIES`)."""
        from .synthetic.models import SCENE_SUPERPIXELS, model_names

        captioner, clip = model_names(folder, captioner)
        explainer = cls.from_pretrained(captioner, clip, "superpixels", device, cache_mb, precision)
        explainer.segmenter_options = {"superpixels": SCENE_SUPERPIXELS}
        return explainer

    def with_captioner(self, captioner: Captioner) -> "Explainer":
        """An explainer for another captioner, in this one's precision, that shares its CLIP model, loaded
        segmenters, cache (and its budget: keys name their captioner) and worker (so precomputing for several
        captioners never runs more than one job at a time)."""
        captioner.precision = self.captioner.precision
        other = Explainer(captioner, self.clip, self.default_segmenter, self.segmenter_options)
        other._segmenters, other._lock, other.cache, other.scheduler = (
            self._segmenters, self._lock, self.cache, self.scheduler)
        other.scheduler.on_idle(other._kept.drop)
        return other

    def resolve(self, settings: Settings = DEFAULTS) -> Settings:
        """`settings` with every default made concrete for these models (vision block and decoder layer as
        non-negative indices, the segmenter's real name, the instruction: `Captioner.instruction`), so that equal
        computations get equal cache keys. A captioner without cross-attention gets no decoder layer (None), and one
        that takes no instruction no instruction, whatever was asked."""
        captioner = self.captioner
        layers, decoder = len(captioner.vision_layers), captioner.num_decoder_layers
        cross = settings.cross_attention_layer
        if cross is None:  # a late-middle layer, ⌊2L/3⌋ (8 of 12 for BLIP-base), LAVIS's choice for BLIP
            cross = (2 * decoder) // 3 if decoder >= 3 else decoder - 1
        segmenter = resolve_name(settings.segmenter or self.default_segmenter)
        return replace(settings, instruction=captioner.instruction(settings.instruction),
                       vision_layer=captioner.resolve_layer(settings.vision_layer, layers, "Vision layer"),
                       # without cross-attention there is no layer to choose: the setting is ignored
                       cross_attention_layer=captioner.resolve_layer(cross, decoder, "Cross-attention layer")
                       if decoder else None,
                       segmenter=segmenter)

    def grounded_image(self, image: ImageInput, settings: Settings = DEFAULTS) -> GroundedImage:
        """What the regions of `image` are chosen among with `settings`' segmenter: its proposals and their CLIP
        embeddings (cached; computed here if no word of the image was grounded yet)."""
        rgb = load_image(image)
        return grounded_image(self._workshop(), self._keys(rgb), rgb, self.resolve(settings))

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
        return self.scheduler.result(*self._caption_task(load_image(image), settings), Priority.CAPTION)

    def caption_stream(self, image: ImageInput, settings: Settings = DEFAULTS) -> Iterator[str | Caption]:
        """The caption's text so far, each time generation writes a token, then the `Caption` (what `caption`
        returns, cached the same way). Greedy decoding only: beam search knows its caption only at the end, so
        with `num_beams` > 1 (or a caption computed before) only the `Caption` comes."""
        tokens: queue.Queue[list[int]] = queue.Queue()
        streamer = _QueueStreamer(tokens) if settings.num_beams == 1 else None
        key, work = self._caption_task(load_image(image), settings, streamer)
        future = self.scheduler.request([key], work, Priority.CAPTION)[key]
        token_ids = self.captioner.start_ids(instruction=self.decode_options(settings).instruction)
        while not future.done():
            try:
                token_ids = token_ids + tokens.get(timeout=0.05)
            except queue.Empty:
                continue
            yield align(self.captioner.pieces(token_ids), token_ids, [0.0] * len(token_ids))[0]
        yield future.result()

    def _caption_task(self, rgb: Image.Image, settings: Settings,
                      streamer: BaseStreamer | None = None) -> tuple[Key, Callable[[Publish], None]]:
        """The caption's cache key, and the work that computes and publishes it."""
        options = self.decode_options(settings)
        key = self._keys(rgb).caption(options)

        def work(publish: Publish) -> None:
            publish(key, self._caption_pixels(self.captioner.preprocess(rgb), options, streamer))

        return key, work

    def decode_options(self, settings: Settings) -> DecodeOptions:
        """How `settings` say to caption, for this captioner (its instruction made concrete: `Captioner.instruction`)."""
        return DecodeOptions(settings.num_beams, settings.max_new_tokens,
                             instruction=self.captioner.instruction(settings.instruction))

    def _caption_pixels(self, pixel_values, options: DecodeOptions, streamer: BaseStreamer | None = None) -> Caption:
        with section("caption"):
            return self.caption_from_ids(pixel_values, *self.captioner.generate_scored(pixel_values, options, streamer),
                                         instruction=options.instruction)

    def caption_from_ids(self, pixel_values, token_ids: Sequence[int], logprobs: Sequence[float] | None = None,
                         instruction: str | None = None) -> Caption:
        """Align a token sequence (starting with the start token, or the prompt asking `instruction`: None, the
        captioner's own) with the log-probabilities of its tokens after the first (scored here under teacher forcing
        when not given)."""
        token_ids = list(token_ids)
        if logprobs is None:
            logprobs = self.captioner.token_logprobs(pixel_values, token_ids) if len(token_ids) > 1 else []
        logprobs = [0.0, *logprobs]
        text, words = align(self.captioner.pieces(token_ids), token_ids, logprobs)
        return Caption(text=text, words=words, token_ids=tuple(token_ids),
                       tokens=tuple(self.captioner.token_strings(token_ids)),
                       token_logprobs=tuple(logprobs), captioner=self.captioner.describe(),
                       instruction=self.captioner.instruction(instruction))

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
        futures = self._queue([word], Priority.CLICK)  # all at once: the worker goes from one to the next
        results: dict[Key, Any] = {}
        for index, stage in enumerate(stages):
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
        return [word.assemble({key: futures[key].result() for key in word.all_keys()}, []) for word in words]

    def precompute(self, image: ImageInput, caption: Caption, settings: Settings = DEFAULTS) -> list[Explanation]:
        """Explain every caption word (see `precompute_async`) and wait for all of them."""
        return self.explain_many(image, list(range(len(caption.words))), caption, settings)

    def precompute_async(self, image: ImageInput, caption: Caption, settings: Settings = DEFAULTS) -> Plan:
        """Queue every caption word's stages in the background (every word's maps first, then regions, …) and
        return the plan; `Plan.cancel()` drops what has not started (e.g. when the user changes a setting), and
        `Plan.progress()` says how far each word is.
        Clicks go before it, and a click on a word it has queued raises that word's tasks to the front."""
        rgb = load_image(image)
        words = [self._word(rgb, index, caption, settings) for index in range(len(caption.words))]
        plan = self.scheduler.new_plan()
        plan.groups = [tuple(word.all_keys()) for word in words]  # each word's progress, for the page to show
        self._queue(words, Priority.BACKGROUND, plan)
        return plan

    def choose_region(self, image: ImageInput, explanation: Explanation, index: int) -> Explanation:
        """`explanation` with its candidate region `index` as the region, and the trust numbers recomputed for
        that region (the model runs are cached per region, so picking a candidate twice costs nothing)."""
        if explanation.grounding is None:
            raise QueryError("This explanation has no region to choose from (grounding was off).")
        rgb = load_image(image)
        keys = self._keys(rgb)
        grounding = explanation.grounding.choose(index)
        token_ids = explanation.token_ids
        checks_key = keys.region_checks(grounding.mask, token_ids)
        instruction = explanation.caption.instruction if explanation.caption else None
        checks = self.scheduler.result(checks_key, lambda publish: publish(
            checks_key, region_checks(self._workshop(), keys, rgb, grounding.mask, token_ids, instruction)))
        verification = None
        if checks.region_caption is not None:
            words = [w.text for w in explanation.words] or explanation.query.split()
            verification = verify(grounding, checks.region_caption, checks.logprobs, Target(explanation.token_positions),
                                  words, explanation.word_logprob, explanation.maps)
        return replace(explanation, grounding=grounding, verification=verification,
                       notes=explanation.notes + checks.notes)

    def sanity_check(self, image: ImageInput, explanation: Explanation, blocks: int | None = None) -> SanityCheck:
        """Explain the same word again with the top `blocks` vision blocks re-initialised (default: all of them,
        the basis of the verdict) and compare each captioner map with the original (`ipag.sanity`); cached per word
        and settings."""
        rgb = load_image(image)
        total = len(self.captioner.vision_layers)
        blocks = blocks or total
        settings = self._sanity_settings(explanation)
        key = self._sanity_key(rgb, explanation, blocks)

        def work(publish: Publish) -> None:
            other = Explainer(randomize_top_blocks(self.captioner, blocks), self.clip, self.default_segmenter,
                              self.segmenter_options)
            try:
                again = other.explain(rgb, _same_query(explanation), explanation.caption, settings)
            finally:
                other.scheduler.close()
            publish(key, compare(explanation, again, blocks, total))

        return self.scheduler.result(key, work)

    def sanity_cascade(self, image: ImageInput, explanation: Explanation) -> Iterator[SanityCheck]:
        """The sanity check's steps, one by one (`ipag.sanity.cascade_levels`: top 1, 2, 4, … and all vision blocks
        re-initialised); wrap them in a `SanityCascade` for its verdict."""
        for blocks in cascade_levels(len(self.captioner.vision_layers)):
            yield self.sanity_check(image, explanation, blocks)

    def cached_sanity(self, image: ImageInput, explanation: Explanation) -> SanityCascade | None:
        """The sanity cascade of `explanation` if all of it was run and is still cached (None otherwise): what an
        export carries without running it."""
        rgb = load_image(image)
        steps = [self.cache.get(*self._sanity_key(rgb, explanation, blocks))
                 for blocks in cascade_levels(len(self.captioner.vision_layers))]
        return SanityCascade(tuple(steps)) if steps and None not in steps else None

    def _sanity_settings(self, explanation: Explanation) -> Settings:
        """The settings a word is explained with again for its sanity check: its maps only."""
        return replace(explanation.settings or self.resolve(), grounding=False, verify=False)

    def _sanity_key(self, rgb: Image.Image, explanation: Explanation, blocks: int) -> Key:
        return self._keys(rgb).sanity(explanation.token_ids, explanation.token_positions,
                                      self._sanity_settings(explanation), blocks)

    def _queue(self, words: list[WordStages], priority: Priority, plan: Plan | None = None) -> dict[Key, Any]:
        futures: dict[Key, Any] = {}
        staged = [word.stages() for word in words]
        for depth in range(max((len(stages) for stages in staged), default=0)):
            for stages in staged:
                if depth < len(stages):
                    stage = stages[depth]
                    futures |= self.scheduler.request(stage.keys, stage.work, priority, plan)
        return futures

    def _word(self, image: ImageInput, query: Query, caption: Caption | None, settings: Settings) -> WordStages:
        rgb = load_image(image)
        settings = self.resolve(settings)
        caption = caption or self.caption(rgb, settings)
        # the instruction the caption answered: a changed one applies to the next caption, not to this one's words
        settings = replace(settings, instruction=caption.instruction)
        return WordStages(self._workshop(), rgb, self._keys(rgb), caption, self._prepare_query(query, caption),
                          settings)

    def _prepare_query(self, query: Query, caption: Caption) -> PreparedQuery:
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
        # The caption's own prompt: what the captioner was asked, about this image (a vision-language model's image
        # tokens depend on the photo's size).
        prompt = caption.token_ids[:self.captioner.answer_start(caption.token_ids)]
        prefix = [*prompt, *self.captioner.tokenize(self.captioner.neutral_prompt)]
        token_ids = tuple(prefix + query_ids)
        return PreparedQuery(query, token_ids, Target(tuple(range(len(prefix), len(token_ids)))), ())

    @staticmethod
    def _in_caption(query: Query, caption: Caption, words: tuple[Word, ...]) -> PreparedQuery:
        return PreparedQuery(query, caption.token_ids, Target(tuple(p for w in words for p in w.token_positions)),
                             words)

    # --- what a word's stages run on ------------------------------------------------------------------------------

    def _keys(self, rgb: Image.Image) -> Keys:
        """The cache keys of this image's results with this captioner (explainers for several captioners share
        one cache)."""
        return Keys(image_key(rgb), self.captioner.describe())

    def _workshop(self) -> Workshop:
        return Workshop(self.captioner, self.clip, self.cache, self.scheduler, self.segmenter, self._kept)

    def segmenter(self, name: str | None = None) -> Segmenter:
        """The segmenter called `name` (default: the explainer's), loaded once and reused."""
        name = resolve_name(name or self.default_segmenter)
        with self._lock:
            if name not in self._segmenters:
                device = str(self.captioner.device)
                self._segmenters[name] = load_segmenter(name, device=device, **self.segmenter_options.get(name, {}))
            return self._segmenters[name]


class _QueueStreamer(BaseStreamer):
    """Hands each token generation writes to a queue (`Explainer.caption_stream` reads it in another thread). The
    first call is the prompt, which the caption starts with anyway."""

    def __init__(self, tokens: queue.Queue[list[int]]) -> None:
        self.tokens = tokens
        self.prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
        else:
            self.tokens.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def _same_query(explanation: Explanation) -> Query:
    """A query that asks for what `explanation` explains: its word by index, its caption phrase, or its free text."""
    if not explanation.in_caption:
        return explanation.query
    if len(explanation.words) == 1:
        return explanation.words[0].index
    return " ".join(word.text for word in explanation.words)


class Explainers:
    """One explainer per captioner name, loaded on first use, all sharing one CLIP model, segmenters, cache
    and worker (the playground's captioner choice and side-by-side comparison)."""

    def __init__(self, first: Explainer, name: str, load: Callable[[str], Captioner],
                 names: Sequence[str] = ()) -> None:
        self.default = name
        self.names = list(dict.fromkeys([name, *names]))  #: the captioners offered by name (others load too)
        self._explainers = {name: first}
        self._load = load
        self._lock = threading.Lock()

    def get(self, name: str | None = None) -> Explainer:
        name = name or self.default
        with self._lock:
            if name not in self._explainers:
                self._explainers[name] = self._explainers[self.default].with_captioner(self._load(name))
            return self._explainers[name]
