"""A word's explanation, in stages: where it is computed, task by task, and cached.

`WordStages` is one query of one image with resolved settings. Its stages are tasks for the explainer's
`Scheduler` (one worker, most urgent first), in the order a user wants their results: the maps from the word's
backward pass (`ipag.attribution`: token maps first, then the pixel maps), its region (`ipag.grounding`), the
maps with passes of their own, and the trust numbers (`ipag.verify`). `assemble` makes an `Explanation` from
whatever stages are done, so a page can show the first maps while the rest is computed.

A word gets what it runs on passed in (`Workshop`: the models, cache, worker, segmenters and the kept forward
pass), and every cache key comes from `Keys`, which names each kind of result in one place.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .align import align
from .attribution import AttributionPass, KeptPass, PassNeeds, PassSpec
from .budget import section
from .cache import ImageCache, image_key
from .captioners import Captioner, DecodeOptions
from .device import release_freed_memory
from .grounding import ClipModel, GroundedImage, Grounder, Grounding, noun_phrase
from .maps import MAP_TYPES, MapContext, MapType
from .results import Caption, Explanation, Heatmap, Word
from .schedule import Key, Publish, Scheduler
from .segmenters import Segmenter
from .settings import Settings
from .target import Target
from .verify import RegionCaption, blank_image, caption_region, region_images, score_images, verify

logger = logging.getLogger(__name__)

Query = int | str


@dataclass(frozen=True)
class PreparedQuery:
    """A query's resolved target: the token sequence to teacher-force and the positions explained."""

    query: Query
    token_ids: tuple[int, ...]
    target: Target
    words: tuple[Word, ...]  #: the caption words explained; () for free text

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words) if self.words else str(self.query).strip()


@dataclass(frozen=True)
class Keys:
    """Every cache key of one image's results, made here and only here. A key is (the image's content hash,
    parts); the parts start with the captioner's description (explainers for several captioners share one
    cache), except for what does not depend on the captioner: the image's segments and a word's region."""

    image: str
    captioner: str

    def _of(self, *parts: Hashable) -> Key:
        return self.image, (self.captioner, *parts)

    def caption(self, options: DecodeOptions) -> Key:
        return self._of("caption", options)

    def token_maps(self, item: PreparedQuery, spec: PassSpec, map_types: Sequence[MapType]) -> Key:
        return self._of("token maps", spec, tuple(map_types), item.token_ids, item.target.positions)

    def pixel_maps(self, item: PreparedQuery, spec: PassSpec, map_types: Sequence[MapType]) -> Key:
        return self._of("pixel maps", spec, tuple(map_types), item.token_ids, item.target.positions)

    def own_maps(self, item: PreparedQuery, map_types: Sequence[MapType]) -> Key:
        return self._of("own maps", item.text, tuple(map_types), item.token_ids, item.target.positions)

    def region(self, text: str, settings: Settings, fused: Key | None) -> Key:
        """The region depends on the grounded text and the grounding settings (and on the maps it is fused with)."""
        return self.image, ("region", text, settings.key("grounding"), None if fused is None else fused[1])

    def checks(self, item: PreparedQuery, region: Key | None) -> Key:
        return self._of("checks", region, item.token_ids, item.target.positions)

    def segments(self, segmenter: str | None) -> Key:
        return self.image, ("grounded", segmenter)

    def prior(self, token_ids: tuple[int, ...]) -> Key:
        return self._of("prior", token_ids)

    def region_caption(self, mask: np.ndarray, instruction: str | None) -> Key:
        return self._of("region caption", _mask_key(mask), instruction)

    def region_logprobs(self, mask: np.ndarray, token_ids: tuple[int, ...]) -> Key:
        return self._of("region logprobs", _mask_key(mask), token_ids)

    def region_checks(self, mask: np.ndarray, token_ids: tuple[int, ...]) -> Key:
        return self._of("region checks", _mask_key(mask), token_ids)

    def memo(self, key: Hashable) -> Key:
        """Where a map type keeps what the words of a caption share (`MapContext.memo`)."""
        return self._of(key)

    def sanity(self, token_ids: tuple[int, ...], positions: tuple[int, ...], settings: Settings, blocks: int) -> Key:
        return self._of("sanity", token_ids, positions, settings, blocks)


def _mask_key(mask: np.ndarray) -> str:
    return image_key(Image.fromarray(mask))


@dataclass(frozen=True)
class Workshop:
    """What a word's stages run on, handed over by the explainer."""

    captioner: Captioner
    clip: ClipModel | None
    cache: ImageCache
    scheduler: Scheduler
    segmenter: Callable[[str | None], Segmenter]  #: a segmenter by name, loaded once
    kept: KeptPass  #: the forward pass the words of a caption share

    def get(self, key: Key, compute: Callable[[], Any]) -> Any:
        """The cached value under `key`, or `compute()` stored there."""
        return self.cache.get_or_compute(*key, compute)


class MapsResult(NamedTuple):
    """What a maps stage publishes: the word's log-probability (None for stages that do not compute it),
    its maps by key, notes (what a map cost) and why each map type that failed did."""

    logprob: float | None
    maps: dict[str, Heatmap]
    notes: list[str]
    failed: dict[str, str]


class RegionResult(NamedTuple):
    grounding: Grounding | None
    segmenter: str
    notes: list[str]


class Checks(NamedTuple):
    """The model-heavy half of the trust numbers (cached per region and per sequence; `verify` and `assemble`
    make the numbers): the region's own caption, the sequence's token log-probabilities with only the region /
    without it, and with a blank image (the language prior)."""

    region_caption: RegionCaption | None
    logprobs: Any
    notes: list[str]
    prior: Any = None


@dataclass(frozen=True)
class Stage:
    name: str  #: what the page says is still coming, e.g. "region"
    keys: tuple[Key, ...]
    work: Callable[[Publish], None]


def grounded_image(tools: Workshop, keys: Keys, rgb: Image.Image, settings: Settings) -> GroundedImage:
    """What the regions of the image are chosen among with `settings`' segmenter: its proposals and their CLIP
    embeddings (cached per segmenter; the views a grounder needs beyond them are added when first asked for)."""
    segmenter = settings.segmenter

    def prepare() -> GroundedImage:
        with section("segmentation"):
            segments = tools.segmenter(segmenter).segment(rgb)
        with section("CLIP proposals"):
            return Grounder.from_settings(tools.clip, settings).prepare(rgb, segments)

    return tools.get(keys.segments(segmenter), prepare)


def trust_logprobs(tools: Workshop, keys: Keys, rgb: Image.Image, token_ids: tuple[int, ...],
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The sequence's token log-probabilities on a blank image (the language prior, shared by every word of a
    caption) and, for a region, on its `region_images` (2 rows; shared by the words grounded to it), each
    cached: what is not cached yet is scored in one batched forward."""
    prior_key = keys.prior(token_ids)
    region_key = None if mask is None else keys.region_logprobs(mask, token_ids)
    prior = tools.cache.get(*prior_key)
    region = None if region_key is None else tools.cache.get(*region_key)
    images = [blank_image(rgb.size)] if prior is None else []
    if region_key is not None and region is None:
        images += region_images(rgb, mask)
    if images:
        rows = score_images(tools.captioner, images, token_ids)
        if prior is None:
            prior, rows = rows[0], rows[1:]
            tools.cache.put(*prior_key, prior)
        if region_key is not None and region is None:
            region = rows
            tools.cache.put(*region_key, region)
    return prior, region


def region_checks(tools: Workshop, keys: Keys, rgb: Image.Image, mask: np.ndarray, token_ids: tuple[int, ...],
                  instruction: str | None) -> Checks:
    """The region's own caption (asked the caption's `instruction`) and the sequence's token log-probabilities with
    only the region / without it, cached per region: several words often share one region, and its passes are
    made once."""
    try:
        prior, logprobs = trust_logprobs(tools, keys, rgb, token_ids, mask)
        caption = tools.get(keys.region_caption(mask, instruction),
                            lambda: caption_region(tools.captioner, rgb, mask, instruction))
        return Checks(caption, logprobs, [], prior)
    except Exception as err:  # noqa: BLE001 — the region and maps stand without their trust numbers
        logger.exception("verification failed")
        return Checks(None, None, [f"No trust numbers: the region check failed ({err})"])


@dataclass
class WordStages:
    """One query of one image with resolved settings: the keys and work of its stages, and how to assemble
    an explanation from their results."""

    tools: Workshop
    rgb: Image.Image
    keys: Keys
    caption: Caption
    item: PreparedQuery
    settings: Settings
    map_types: dict[str, list[MapType]] = field(init=False)  #: the map types computed, by what they need
    unavailable: dict[str, str] = field(init=False)  #: map key → why this captioner cannot have it

    def __post_init__(self) -> None:
        self.map_types = {"tokens": [], "pixels": [], "own": []}
        self.unavailable = {}
        for map_type in MAP_TYPES:
            chosen = map_type.from_settings(self.settings)
            if chosen is None or (chosen.needs_clip and self.tools.clip is None):
                continue
            reason = chosen.unavailable(self.tools.captioner)
            if reason:
                self.unavailable[chosen.key] = reason
            else:
                self.map_types[chosen.needs].append(chosen)

    # --- stages and their keys ------------------------------------------------------------------------------

    @property
    def spec(self) -> PassSpec:
        """The word's pass: the settings' layers, and what its gradient maps need of it."""
        needs = functools.reduce(operator.or_, (map_type.pass_needs() for map_type in
                                                self.map_types["tokens"] + self.map_types["pixels"]), PassNeeds())
        return PassSpec(self.settings.vision_layer, self.settings.cross_attention_layer, needs)

    @property
    def grounded(self) -> bool:
        return self.tools.clip is not None and self.settings.grounding

    def _token_key(self) -> Key:
        return self.keys.token_maps(self.item, self.spec, self.map_types["tokens"])

    def _pixel_key(self) -> Key:
        return self.keys.pixel_maps(self.item, self.spec, self.map_types["pixels"])

    def _own_key(self) -> Key:
        return self.keys.own_maps(self.item, self.map_types["own"])

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
        if not self.settings.fusion_weight:
            return None
        stages = {"tokens": (self._token_key(), self._token_maps), "pixels": (self._pixel_key(), self._pixel_maps),
                  "own": (self._own_key(), self._own_maps)}
        return next((stages[needs] for needs, map_types in self.map_types.items()
                     if any(map_type.key == self.settings.fusion_map for map_type in map_types)), None)

    def _region_key(self) -> Key:
        fusion = self._fusion_stage()
        return self.keys.region(self.grounded_text, self.settings, None if fusion is None else fusion[0])

    def _checks_key(self) -> Key:
        return self.keys.checks(self.item, self._region_key() if self.grounded else None)

    def stages(self) -> list[Stage]:
        """In the order a user wants them: the maps of the backward pass (the token maps, then saliency), the
        region, the maps with passes of their own, the trust numbers. Names say what is still coming."""
        stages = [Stage("first maps", (self._token_key(),), self._token_maps),
                  Stage("saliency", (self._pixel_key(),), self._pixel_maps)]
        if self.grounded:
            stages.append(Stage("region", (self._region_key(),), self._region))
        if self.map_types["own"]:
            stages.append(Stage("more maps", (self._own_key(),), self._own_maps))
        if self.settings.verify:
            stages.append(Stage("trust numbers", (self._checks_key(),), self._checks))
        return stages

    def all_keys(self) -> list[Key]:
        return [key for stage in self.stages() for key in stage.keys]

    # --- work (run by the scheduler's worker) ----------------------------------------------------------------

    def _context(self, **values: Any) -> MapContext:
        tools = self.tools
        return MapContext(self.rgb.size, captioner=tools.captioner, token_ids=self.item.token_ids,
                          target=self.item.target, image=self.rgb, text=self.item.text, clip=tools.clip,
                          memo=lambda key, compute: tools.get(self.keys.memo(key), compute), **values)

    def _attribution(self) -> AttributionPass:
        """The forward pass of the word's sequence: the one kept from the previous word when it matches (the
        words of a caption share it), else a new one replacing it."""
        captioner, token_ids, spec = self.tools.captioner, self.item.token_ids, self.spec

        def forward() -> AttributionPass:
            with section("forward"):
                return AttributionPass(captioner, captioner.preprocess(self.rgb), token_ids, spec)

        return self.tools.kept.get((self.keys.image, token_ids, spec), forward)

    def _token_maps(self, publish: Publish) -> None:
        """The maps of the first step of the word's backward pass (through the decoder to the vision layer)."""
        logprob, gradients, _ = self._attribution().first_step(self.item.target)
        with section("map weighting"):
            maps = _attribute(self.map_types["tokens"], self._context(gradients=gradients))
        publish(self._token_key(), MapsResult(logprob, *maps))

    def _pixel_maps(self, publish: Publish) -> None:
        """The maps of the second step (on through the vision encoder to the pixels). A task of its own, so that a
        click can go between a word's first maps and its saliency: the first step's results wait in the kept
        forward pass."""
        attribution = self._attribution()
        logprob, gradients, vision_grad = attribution.first_step(self.item.target)
        if self.map_types["pixels"]:
            with section("vision backward"):
                gradients = attribution.pixel_gradients(self.item.target, gradients, vision_grad)
        context = self._context(gradients=gradients, pixel_values=attribution.clean.pixel_values.detach())
        with section("map weighting"):
            maps = _attribute(self.map_types["pixels"], context)
        publish(self._pixel_key(), MapsResult(logprob, *maps))

    def _free_kept_pass(self) -> None:
        """A stage that does not use the word's forward pass frees it first, and gives its memory back to the
        system: its graph (~0.5 GB for BLIP-base) would otherwise sit beside the segmenter, the region's caption
        and the trust forwards at a click's memory peak (or its freed pieces, which their larger tensors cannot
        reuse). Every word's maps are queued before any word's region (`Explainer._queue`), so the caption's words
        still share one forward; a click between them costs the next word one more."""
        if self.tools.kept.drop():
            release_freed_memory()

    def _own_maps(self, publish: Publish) -> None:
        self._free_kept_pass()
        pixel_values = self.tools.captioner.preprocess(self.rgb)
        with section("more maps"):
            maps = _attribute(self.map_types["own"], self._context(pixel_values=pixel_values))
        publish(self._own_key(), MapsResult(None, *maps))

    def _region(self, publish: Publish) -> None:
        self._free_kept_pass()
        tools, settings = self.tools, self.settings
        try:
            prepared = grounded_image(tools, self.keys, self.rgb, settings)
            cam, notes = None, []
            fusion = self._fusion_stage()
            if fusion is not None:
                fused = tools.scheduler.result(*fusion).maps.get(settings.fusion_map)
                cam = fused.at(prepared.pixels.shape[1::-1]) if fused is not None else None
            if settings.fusion_weight and cam is None:
                notes.append(f"The region was chosen without the captioner's evidence: its {settings.fusion_map!r} "
                             "map is not computed with these settings (or failed).")
            with section("CLIP query"):
                grounding = Grounder.from_settings(tools.clip, settings).ground(prepared, self.grounded_text,
                                                                                cam=cam)
            result = RegionResult(grounding, prepared.segmenter, notes)
        except Exception as err:  # noqa: BLE001 — the maps are still worth showing without a region
            logger.exception("grounding failed")
            result = RegionResult(None, settings.segmenter, [f"No region: grounding failed ({err})"])
        publish(self._region_key(), result)

    def _checks(self, publish: Publish) -> None:
        """The trust numbers' model runs: the checks of the word's region when it has one, and the language
        prior of the word's sequence (scored in the same batch as the region's composites when not cached)."""
        self._free_kept_pass()
        tools, token_ids = self.tools, self.item.token_ids
        checks = Checks(None, None, [])
        if self.grounded:
            region = tools.scheduler.result(self._region_key(), self._region)
            if region.grounding is not None:
                checks = region_checks(tools, self.keys, self.rgb, region.grounding.mask, token_ids,
                                       self.caption.instruction)
        if checks.prior is None:  # no region, or its check failed
            checks = checks._replace(prior=trust_logprobs(tools, self.keys, self.rgb, token_ids)[0])
        publish(self._checks_key(), checks)

    # --- the result -----------------------------------------------------------------------------------------------

    def assemble(self, results: dict[Key, Any], pending: list[str]) -> Explanation:
        """The explanation from the stage results computed so far (cheap: no model runs here)."""
        item, captioner = self.item, self.tools.captioner
        maps: dict[str, Heatmap] = {}
        failed: dict[str, str] = {}
        notes: list[str] = []
        logprob = 0.0
        region: RegionResult | None = None
        checks: Checks | None = None
        for value in (results[key] for key in self.all_keys() if key in results):
            notes += value.notes
            if isinstance(value, MapsResult):
                maps |= value.maps
                failed |= value.failed
                logprob = value.logprob if value.logprob is not None else logprob
            elif isinstance(value, RegionResult):
                region = value
            else:
                checks = value
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
        prior = None if checks is None else float(item.target.score(checks.prior))
        return Explanation(
            query=str(item.query), in_caption=bool(item.words), words=item.words,
            tokens=tuple(captioner.token_strings([item.token_ids[p] for p in item.target.positions])),
            token_positions=item.target.positions, context=context, word_logprob=logprob, maps=ordered,
            unavailable_maps=dict(self.unavailable), failed_maps=failed, token_ids=item.token_ids,
            image_size=self.rgb.size, caption=self.caption, grounding=grounding, verification=verification,
            segmenter=region.segmenter if region else "", notes=notes, settings=self.settings,
            pending=tuple(pending), prior_logprob=prior)


def _attribute(map_types: Sequence[MapType], context: MapContext) -> tuple[dict[str, Heatmap], list[str], dict[str, str]]:
    """Each map type's heatmap, the notes of those that made one, and why each that failed did: one that fails
    must not cost the user the others."""
    maps: dict[str, Heatmap] = {}
    notes: list[str] = []
    failed: dict[str, str] = {}
    for map_type in map_types:
        try:
            maps[map_type.key] = map_type.attribute(context)
            note = map_type.note(context)
            if note:
                notes.append(note)
        except Exception as err:  # noqa: BLE001 — any failure of one map must not cost the others
            logger.exception("map %s failed", map_type.key)
            failed[map_type.key] = f"The {map_type.title} map could not be computed ({type(err).__name__}: {err})."
    return maps, notes, failed
