"""Every setting of an explanation, defined once: the page's widgets, the API, the CLI and the cache keys read
their defaults and meanings from `Settings`, and nowhere else.

Each field says which stage of the computation it affects (`stage` in its metadata): the caption, the
gradient maps of a word, the other maps, the grounding, or only the drawing. A stage's cache key is made of
its own fields (`Settings.key`), so changing the colour map redraws, changing the prompt template regrounds
the word, and neither recomputes a backward pass. "Default" values (`vision_layer=-1`, `segmenter=None`, no
cross-attention layer) are resolved to concrete ones by the explainer (`Explainer.resolve`) before any key is
made, so equal computations have equal keys however they were asked for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Stage = Literal["caption", "gradients", "maps", "grounding", "verification", "draw"]

#: Saliency variants the page offers: the plain gradient, or SmoothGrad over `smoothgrad_samples` noisy copies.
SALIENCY_METHODS = ("gradient", "SmoothGrad")
#: What CLIP is shown of a region (`ipag.grounding.composite`): the region sharp and the rest blurred or grey, or
#: the blurred composite cropped to the region.
REGION_VIEWS = ("blur", "grey", "crop")


def _setting(default: Any, stage: Stage, label: str) -> Any:
    """A settings field with the stage it affects and the label the page shows for it."""
    return field(default=default, metadata={"stage": stage, "label": label})


@dataclass(frozen=True)
class Settings:
    """How to caption, explain and draw. Frozen and hashable: resolved settings are part of cache keys."""

    # captioning
    num_beams: int = _setting(1, "caption", "Beam size (1 = greedy)")
    max_new_tokens: int = _setting(20, "caption", "Max new tokens")
    # the maps computed from each word's backward pass
    #: GradCAM, although HiResCAM and EigenGradCAM localise better on the ground-truth benchmark: under bfloat16
    #: (GPUs) their maps change (HiResCAM's correlation with float32 fell to 0.02–0.98 on the tiny captioners,
    #: EigenGradCAM's sign flipped), GradCAM's do not (> 0.99). The page opens on input × gradient instead.
    cam_method: str = _setting("GradCAM", "gradients", "CAM method")
    vision_layer: int = _setting(-1, "gradients", "Vision block for Grad-CAM (-1 = last)")
    cross_attention_layer: int | None = _setting(None, "gradients", "Decoder layer for cross-attention")
    saliency: str = _setting("gradient", "gradients", "Saliency")
    smoothgrad_samples: int = _setting(8, "gradients", "SmoothGrad samples")
    smoothgrad_noise: float = _setting(0.15, "gradients", "SmoothGrad noise (fraction of the input range)")
    # maps that need passes of their own
    occlusion: bool = _setting(False, "maps", "Occlusion map (model-agnostic: 225 occluded copies, slower)")
    integrated_gradients: bool = _setting(False, "maps", "Integrated gradients (a forward and backward per step)")
    ig_steps: int = _setting(16, "maps", "Integrated gradients: steps")
    # grounding the word in a region, and checking that region
    grounding: bool = _setting(True, "grounding", "Ground the word in a region (CLIP)")
    segmenter: str | None = _setting(None, "grounding", "Segmenter (region proposals)")
    template: str = _setting("a photo of {}", "grounding", "CLIP prompt template ({} = the word)")
    #: The grounding defaults are the best combination measured with the shipped synthetic models on tuning scenes
    #: (seeds 5000–5199, disjoint from the evaluation's 0–499) by `python -m ipag evaluate-grounding --grid …`
    #: (docs/evaluation.md#grounding): the phrase, grey composites, an area penalty and the captioner's saliency.
    ground_phrase: bool = _setting(True, "grounding", "Ground a clicked word's phrase (“red circle” for “red”)")
    region_view: str = _setting("grey", "grounding", "What CLIP sees of a region (blur, grey, crop)")
    area_penalty: float = _setting(10.0, "grounding", "Area penalty (logits for the whole image; 0 = none)")
    counterfactual: bool = _setting(False, "grounding", "Add CLIP's drop when the region is blurred away")
    stage2: bool = _setting(False, "grounding", "Stage II: refine with superpixels")
    #: A map key of `ipag.maps` whose map is computed with these settings: the captioner's own evidence for the word.
    fusion_map: str = _setting("saliency", "grounding", "Captioner map fused into the choice")
    fusion_weight: float = _setting(10.0, "grounding", "Fusion weight of that map (0 = CLIP alone)")
    top_k: int = _setting(5, "grounding", "Candidate regions shown")
    verify: bool = _setting(True, "verification", "Trust numbers for the region")
    # drawing only
    opacity: float = _setting(0.5, "draw", "Overlay opacity")
    colormap: str = _setting("jet", "draw", "Colour map")

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.num_beams <= 16, f"num_beams must be between 1 and 16, got {self.num_beams}."),
            (1 <= self.max_new_tokens <= 128, f"max_new_tokens must be between 1 and 128, got {self.max_new_tokens}."),
            (self.saliency in SALIENCY_METHODS,
             f"Unknown saliency {self.saliency!r}; choose one of {', '.join(SALIENCY_METHODS)}."),
            (1 <= self.smoothgrad_samples <= 64,
             f"SmoothGrad samples must be between 1 and 64, got {self.smoothgrad_samples}."),
            (0.0 < self.smoothgrad_noise <= 1.0, f"SmoothGrad noise must be in (0, 1], got {self.smoothgrad_noise}."),
            (2 <= self.ig_steps <= 256, f"Integrated gradients steps must be between 2 and 256, got {self.ig_steps}."),
            ("{}" in self.template,
             f"The prompt template must contain '{{}}' where the word goes; got {self.template!r}."),
            (self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}."),
            (self.region_view in REGION_VIEWS,
             f"Unknown region view {self.region_view!r}; choose one of {', '.join(REGION_VIEWS)}."),
            (self.area_penalty >= 0.0, f"The area penalty must not be negative, got {self.area_penalty}."),
            (0.0 <= self.opacity <= 1.0, f"Opacity must be in [0, 1], got {self.opacity}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], base: "Settings | None" = None) -> "Settings":
        """Settings from a mapping of field names (the page's widgets, an API call's JSON, CLI options).
        Unknown names are refused with the list of known ones; missing names keep `base`'s (the defaults)."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}.")
        return replace(base or cls(), **{name: _coerce(known[name].type, value) for name, value in values.items()})

    def key(self, *stages: Stage) -> tuple[tuple[str, Any], ...]:
        """The (name, value) pairs of the fields that affect `stages`: a cache key part for those stages."""
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.metadata["stage"] in stages)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def label(name: str) -> str:
        """The page's label for the field `name`."""
        return next(f.metadata["label"] for f in fields(Settings) if f.name == name)


def _coerce(annotation: str, value: Any) -> Any:
    """Widgets send numbers as floats and JSON may send ints for floats: cast to the field's declared type."""
    if value is None:
        return None
    if annotation.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"Expected a whole number, got {value}.")
        return int(value)
    if annotation == "float":
        return float(value)
    if annotation == "bool":
        return bool(value)
    return value


DEFAULTS = Settings()
