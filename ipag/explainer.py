"""The public entry point: caption an image, then explain any caption word or free query.

`Explainer` wires the pieces together and holds no model maths itself: captioners (`ipag.captioners`)
run the models, `ipag.attribution` computes a target's gradients, `ipag.maps` turns them into heatmaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .align import align, find_phrase
from .attribution import Target, target_gradients
from .captioners import Captioner, DecodeOptions, load_captioner
from .captioners.blip import BlipCaptioner
from .device import resolve_device
from .errors import QueryError
from .images import ImageInput, load_image
from .maps import CrossAttentionMap, GradCAMMap, MapType, SaliencyMap
from .results import Caption, Explanation, Word

#: The longest free query we explain, in tokens (a caption is ~10; longer text is not a "word" any more).
MAX_QUERY_TOKENS = 32

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

    def map_types(self) -> list[MapType]:
        return [GradCAMMap(self.cam_method), CrossAttentionMap(),
                SaliencyMap(self.smoothgrad_samples, self.smoothgrad_noise)]


class Explainer:
    """Captions images and explains, per word, why the captioner said it."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner

    @classmethod
    def from_pretrained(
        cls,
        captioner: str = "Salesforce/blip-image-captioning-base",
        device: str = "auto",
    ) -> "Explainer":
        """Load real models by hub id or local folder (downloaded once, then cached by huggingface_hub).

        Raises `ModelUnavailableError` naming the model and the fix when it cannot be loaded.
        """
        return cls(load_captioner(captioner, resolve_device(device)))

    @classmethod
    def tiny(cls, seed: int = 0, device: str = "cpu") -> "Explainer":
        """The same pipeline on tiny random models built from configs: offline, in seconds (tests, demos)."""
        return cls(BlipCaptioner.tiny(seed, resolve_device(device)))

    # --- captioning -----------------------------------------------------------------------------------------

    def caption(self, image: ImageInput, num_beams: int = 1, max_new_tokens: int = 20) -> Caption:
        """Generate a caption and align it to clickable words with their log-probabilities."""
        pixel_values = self.captioner.preprocess(load_image(image))
        token_ids = self.captioner.generate(pixel_values, DecodeOptions(num_beams, max_new_tokens))
        return self.caption_from_ids(pixel_values, token_ids)

    def caption_from_ids(self, pixel_values: torch.Tensor, token_ids: Sequence[int]) -> Caption:
        """Align a given token sequence (starting with the start token) and score it under teacher forcing."""
        token_ids = list(token_ids)
        logprobs = [0.0] + (self.captioner.token_logprobs(pixel_values, token_ids) if len(token_ids) > 1 else [])
        text, words = align(self.captioner.pieces(token_ids), token_ids, logprobs)
        return Caption(text=text, words=words, token_ids=tuple(token_ids),
                       tokens=tuple(self.captioner.token_strings(token_ids)),
                       token_logprobs=tuple(logprobs), captioner=self.captioner.describe())

    # --- explaining -----------------------------------------------------------------------------------------

    def explain(self, image: ImageInput, query: Query, caption: Caption | None = None,
                settings: MapSettings = MapSettings()) -> Explanation:
        """Explain one caption word (by index or text) or a free-text query; see `explain_many`."""
        return self.explain_many(image, [query], caption, settings)[0]

    def explain_many(self, image: ImageInput, queries: Sequence[Query], caption: Caption | None = None,
                     settings: MapSettings = MapSettings()) -> list[Explanation]:
        """Explain several queries; all caption words share one forward pass of the captioner.

        A query is a word index, a caption word or phrase (matched on tokens, first occurrence), or free
        text. Free text is explained as log p(query | image) after the neutral prompt
        `captioner.neutral_prompt`, and the result says so. `caption` defaults to a fresh greedy caption.
        """
        rgb = load_image(image)
        pixel_values = self.captioner.preprocess(rgb)
        if caption is None:
            caption = self.caption_from_ids(pixel_values, self.captioner.generate(pixel_values))
        resolved = [self._resolve(query, caption) for query in queries]
        in_caption = [(i, r) for i, r in enumerate(resolved) if isinstance(r, tuple)]
        results: list[Explanation | None] = [None] * len(queries)
        if in_caption:
            targets = [Target(tuple(p for w in words for p in w.token_positions)) for _, words in in_caption]
            computed = self._attribute(pixel_values, caption.token_ids, targets, settings, rgb.size)
            for (i, words), target, (logprob, maps) in zip(in_caption, targets, computed):
                results[i] = Explanation(
                    query=str(queries[i]), in_caption=True, words=words,
                    tokens=tuple(caption.tokens[p] for p in target.positions), token_positions=target.positions,
                    context=self._context(caption.token_ids[: target.positions[0]]), word_logprob=logprob,
                    maps=maps, image_size=rgb.size, caption=caption)
        for i, query_ids in ((i, r) for i, r in enumerate(resolved) if isinstance(r, list)):
            prefix = self.captioner.start_ids() + self.captioner.tokenize(self.captioner.neutral_prompt)
            token_ids = prefix + query_ids
            target = Target(tuple(range(len(prefix), len(token_ids))))
            ((logprob, maps),) = self._attribute(pixel_values, token_ids, [target], settings, rgb.size)
            results[i] = Explanation(
                query=str(queries[i]), in_caption=False, words=(),
                tokens=tuple(self.captioner.token_strings(query_ids)), token_positions=target.positions,
                context=self.captioner.neutral_prompt, word_logprob=logprob, maps=maps, image_size=rgb.size,
                caption=caption,
                notes=[f"'{queries[i]}' is not in the caption: explained as log p(query | image) after the "
                       f"neutral prompt '{self.captioner.neutral_prompt}'."])
        return [result for result in results if result is not None]

    def _resolve(self, query: Query, caption: Caption) -> tuple[Word, ...] | list[int]:
        """Caption words (a tuple) for an index or a phrase found in the caption, else free-text token ids."""
        if isinstance(query, bool) or not isinstance(query, (int, str)):
            raise QueryError(f"A query is a word index or a text, got {type(query).__name__}.")
        if isinstance(query, int):
            if not 0 <= query < len(caption.words):
                raise QueryError(f"Word index {query} is out of range: the caption has {len(caption.words)} words.")
            return (caption.words[query],)
        text = query.strip()
        if not text:
            raise QueryError("The query is empty: click a caption word or type a word to explain.")
        query_ids = self.captioner.tokenize(text)
        if len(query_ids) > MAX_QUERY_TOKENS:
            raise QueryError(f"The query is too long ({len(query_ids)} tokens); at most {MAX_QUERY_TOKENS} "
                             "tokens can be explained. Type a word or a short phrase.")
        if not any(piece.kind in ("start", "continue") for piece in self.captioner.pieces(query_ids)):
            raise QueryError(f"'{text[:40]}' contains no word the captioner's vocabulary knows.")
        return find_phrase(caption.words, caption.token_ids, query_ids) or query_ids

    def _attribute(self, pixel_values: torch.Tensor, token_ids: Sequence[int], targets: list[Target],
                   settings: MapSettings, image_size: tuple[int, int]) -> list[tuple[float, dict]]:
        layers = self.captioner.num_decoder_layers
        attention_layer = settings.cross_attention_layer
        if attention_layer is None:
            attention_layer = (2 * layers) // 3 if layers >= 3 else layers - 1
        map_types = settings.map_types()
        computed = target_gradients(self.captioner, pixel_values, token_ids, targets, settings.vision_layer,
                                    attention_layer, settings.smoothgrad_samples, settings.smoothgrad_noise)
        return [(logprob, {m.key: m.attribute(gradients, image_size) for m in map_types})
                for logprob, gradients in computed]

    def _context(self, token_ids: Sequence[int]) -> str:
        text, _ = align(self.captioner.pieces(list(token_ids)), list(token_ids), [0.0] * len(token_ids))
        return text

