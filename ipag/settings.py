"""Every setting of an explanation, declared once: its default, what it affects, its label, and how it is
chosen (widget kind, range, choices). The page's settings panel, the CLI's options, the API and the cache keys
are made from these declarations, and a value is checked against its declaration once, when `Settings` are
made: nowhere else.

A setting is a `Setting`. The settings of the pipeline (captioning, the pass's layers, grounding, drawing) are
the fields of `Settings`; a map type declares the settings it owns (`MapType.declares`), and registering the
map type adds them (`declare`), so a plugin's setting gets a widget, a CLI option and a check like the others.
Either kind reads as an attribute: `settings.num_beams`, `settings.cam_method`.

Each setting says which stage of the computation it affects (`Setting.stage`): the caption, the gradient maps
of a word, the other maps, the grounding, the verification, or only the drawing. The page redraws for a
drawing setting and recomputes for the others; the grounding's cache key is made of its settings
(`Settings.key`); the other stages' keys hold the map types and the pass they use, which are made from the
settings. "Default" values (`vision_layer=-1`, `segmenter=None`, no cross-attention layer) are resolved to
concrete ones by the explainer (`Explainer.resolve`) before any key is made, so equal computations have equal
keys however they were asked for.
"""

from __future__ import annotations

import reprlib
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Stage = Literal["caption", "gradients", "maps", "grounding", "verification", "draw"]
Widget = Literal["slider", "number", "checkbox", "dropdown", "radio", "text"]

#: The colour maps a heatmap can be drawn with (matplotlib's names): perceptually uniform ones first (equal steps
#: in value look like equal steps in colour), then the rainbow ones people know from other tools.
COLORMAPS = ("viridis", "inferno", "magma", "cividis", "gray", "turbo", "jet")
#: What CLIP is shown of a region (`ipag.grounding.composite`): the region sharp and the rest blurred or grey, or
#: the blurred composite cropped to the region.
REGION_VIEWS = ("blur", "grey", "crop")
#: The longest instruction a vision-language model is asked (a question or a task, not a document: every character
#: is prompt the model reads again for each word explained).
MAX_INSTRUCTION_CHARS = 500


@dataclass(frozen=True)
class Setting:
    """One setting's declaration. `choices` may be a function, for names registered at run time (segmenters);
    `widget` defaults to what the rest implies: a checkbox for a flag, a dropdown for choices, a slider for a
    range, a number box for a number, a text box for text. `type` is needed only where the default is None
    (None then means "resolved by the explainer"). `valid` adds a rule of its own: it returns what is wrong
    with a value, or None."""

    default: Any
    stage: Stage
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    widget: Widget | None = None
    type: type | None = None
    valid: Callable[[Any], str | None] | None = None

    @property
    def kind(self) -> type:
        """The values' type: bool, int, float or str."""
        return self.type or type(self.default)

    @property
    def widget_kind(self) -> Widget:
        if self.widget:
            return self.widget
        if self.kind is bool:
            return "checkbox"
        if self.choices is not None:
            return "dropdown"
        if self.minimum is not None and self.maximum is not None:
            return "slider"
        return "number" if self.kind in (int, float) else "text"

    def options(self) -> list[str] | None:
        """The allowed values (None: any of the type in range)."""
        return list(self.choices() if callable(self.choices) else self.choices) if self.choices is not None else None

    def coerce(self, value: Any) -> Any:
        """`value` as the declared type: widgets send numbers as floats and JSON may send ints for floats, and an
        empty text box sends "" where it means "none given" (None, where None is the default)."""
        if value is None or (self.default is None and isinstance(value, str) and not value.strip()):
            return None
        if self.kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"Expected a whole number, got {value}.")
            return int(value)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value

    def check(self, name: str, value: Any) -> None:
        """Refuse a value this declaration does not allow, saying what would be allowed."""
        if value is None:
            if self.default is not None:
                raise ValueError(f"{name} needs a value.")
            return
        kinds = (int, float) if self.kind is float else (self.kind,)  # an int is a float's value too
        if isinstance(value, bool) != (self.kind is bool) or not isinstance(value, kinds):
            raise ValueError(f"{name} must be a {self.kind.__name__}, got {value!r}.")
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else \
                f"at least {low:g}" if low is not None else f"at most {high:g}"
            raise ValueError(f"{name} must be {bounds}, got {value}.")
        options = self.options()
        if options is not None and value not in options:
            raise ValueError(f"Unknown {name} {value!r}; choose one of: {', '.join(options)}.")
        problem = self.valid(value) if self.valid else None
        if problem:
            raise ValueError(f"{name} {problem}; got {reprlib.repr(value)}.")  # a long text shortened


def _setting(default: Any, stage: Stage, label: str, **declaration: Any) -> Any:
    """A field of `Settings`, declared by a `Setting` in its metadata."""
    return field(default=default, metadata={"setting": Setting(default, stage, label, **declaration)})


def _segmenters() -> list[str]:
    """The registered segmenters' names (one that is not installed here explains how to install it)."""
    from .segmenters import segmenter_names

    return segmenter_names()


def _has_placeholder(template: str) -> str | None:
    return None if "{}" in template else "must contain '{}' where the word goes"


def _plain_instruction(text: str) -> str | None:
    """What is wrong with an instruction: nothing to ask, too long, or control characters (line breaks, tabs,
    escape sequences), which a one-line question has no use for and which could break the chat template's turns."""
    if not text.strip():
        return "is empty; leave it out to ask the model's own"
    if len(text) > MAX_INSTRUCTION_CHARS:
        return f"is too long ({len(text)} characters; at most {MAX_INSTRUCTION_CHARS})"
    if any(unicodedata.category(char) == "Cc" for char in text):
        return "must not contain control characters (line breaks, tabs, …)"
    return None


#: The settings map types and other plugins declared (`declare`), by name, in the order they were declared.
_DECLARED: dict[str, Setting] = {}


@dataclass(frozen=True, init=False)
class Settings:
    """How to caption, explain and draw. Frozen and hashable: resolved settings are part of cache keys.

    `Settings(num_beams=3, cam_method="LayerCAM")` takes any declared setting by name; unknown names and values
    out of their declared range are refused. The settings that map types declare are held in `declared`
    (only those that differ from their default, so that equal settings are equal whatever was declared since).
    """

    # captioning
    num_beams: int = _setting(1, "caption", "Beam size (1 = greedy)", minimum=1, maximum=16, step=1)
    max_new_tokens: int = _setting(20, "caption", "Max new tokens", minimum=1, maximum=128, step=1)
    #: What a vision-language model is asked (None: its own instruction, `Captioner.default_instruction`);
    #: captioners that take none ignore it, and the page shows its box only for those that take one.
    instruction: str | None = _setting(None, "caption", "Instruction: what a vision-language model is asked",
                                       type=str, widget="text", valid=_plain_instruction)
    # the word's pass (its range is the captioner's: `Explainer.resolve` checks it)
    vision_layer: int = _setting(-1, "gradients", "Vision block for Grad-CAM (-1 = last)", step=1, widget="slider")
    cross_attention_layer: int | None = _setting(None, "gradients", "Decoder layer for cross-attention", step=1,
                                                 widget="slider", type=int)
    # grounding the word in a region, and checking that region
    grounding: bool = _setting(True, "grounding", "Ground the word in a region (CLIP)")
    segmenter: str | None = _setting(None, "grounding", "Segmenter (region proposals)", choices=_segmenters, type=str)
    template: str = _setting("a photo of {}", "grounding", "CLIP prompt template ({} = the word)",
                             valid=_has_placeholder)
    #: The grounding defaults are the best combination measured with the shipped synthetic models on tuning scenes
    #: (seeds 5000–5199, disjoint from the evaluation's 0–499) by `python -m ipag evaluate-grounding --grid …`
    #: (docs/evaluation.md#grounding): the phrase, grey composites, an area penalty and the captioner's saliency.
    ground_phrase: bool = _setting(True, "grounding", "Ground a clicked word's phrase (“red circle” for “red”)")
    region_view: str = _setting("grey", "grounding", "What CLIP sees of a region", choices=REGION_VIEWS,
                                widget="radio")
    area_penalty: float = _setting(10.0, "grounding", "Area penalty (logits for the whole image; 0 = none)",
                                   minimum=0.0, maximum=50.0, step=0.5)
    counterfactual: bool = _setting(False, "grounding", "Add CLIP's drop when the region is blurred away")
    stage2: bool = _setting(False, "grounding", "Stage II: refine with superpixels")
    #: The weight of the captioner's own map of the word in the choice; which map is `fusion_map`, declared with
    #: the registry of map types (`ipag.maps`), whose keys are its choices.
    fusion_weight: float = _setting(10.0, "grounding", "Fusion weight of that map (0 = CLIP alone)", minimum=0.0,
                                    maximum=100.0, step=0.5)
    top_k: int = _setting(5, "grounding", "Candidate regions shown", minimum=1)
    verify: bool = _setting(True, "verification", "Trust numbers for the region")
    # drawing only (`ipag.render`): the defaults meet the page's goal on held-out generated scenes, the default map's
    # change of the photo ≥ 3× larger on the named object than on the background (docs/method.md#drawing-a-map)
    opacity: float = _setting(0.7, "draw", "Overlay opacity at the strongest values (weaker ones fade out)",
                              minimum=0.0, maximum=1.0, step=0.05)
    colormap: str = _setting("viridis", "draw", "Colour map", choices=COLORMAPS)
    clip_percent: float = _setting(2.0, "draw", "Clip outliers: % of the map's mass drawn at full strength (Captum's "
                                   "outlier_perc)", minimum=0.0, maximum=50.0, step=0.5)
    smoothing: float = _setting(3.0, "draw", "Smooth pixel-level maps for display (σ, % of the image side; 0 = off)",
                                minimum=0.0, maximum=10.0, step=0.5)
    signed: bool = _setting(False, "draw", "Signed maps: show evidence against the word too (diverging colours)")
    #: (name, value) of the declared settings that differ from their default, sorted by name.
    declared: tuple[tuple[str, Any], ...] = field(default=())

    def __init__(self, **values: Any) -> None:
        declared = dict(values.pop("declared", ()))  # `dataclasses.replace` hands the current ones back
        known = declarations()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(f"Unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}.")
        for name, setting in known.items():
            value = values[name] if name in values else declared.get(name, setting.default)
            setting.check(name, value)
            if name in _DECLARED:
                declared[name] = value
            else:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "declared", tuple(sorted(
            (name, value) for name, value in declared.items() if name in _DECLARED and value != _DECLARED[name].default)))

    def __getattr__(self, name: str) -> Any:
        """A declared setting's value (called only for names that are not fields)."""
        setting = _DECLARED.get(name)
        if setting is None:
            raise AttributeError(f"'Settings' has no setting {name!r}")
        return dict(self.__dict__.get("declared", ())).get(name, setting.default)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], base: "Settings | None" = None) -> "Settings":
        """Settings from a mapping of setting names (the page's widgets, an API call's JSON, CLI options), cast to
        their declared types. Unknown names are refused with the list of known ones; missing names keep `base`'s
        (the defaults)."""
        known = declarations()
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"Unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}.")
        return replace(base or cls(), **{name: known[name].coerce(value) for name, value in values.items()})

    def key(self, *stages: Stage) -> tuple[tuple[str, Any], ...]:
        """The (name, value) pairs of the settings that affect `stages`: a cache key part for those stages."""
        return tuple((name, getattr(self, name)) for name, setting in declarations().items() if setting.stage in stages)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in declarations()}


def declarations() -> dict[str, Setting]:
    """Every setting by name: the fields of `Settings`, then the declared ones."""
    core = {f.name: f.metadata["setting"] for f in fields(Settings) if "setting" in f.metadata}
    return core | _DECLARED


def declare(settings: Mapping[str, Setting]) -> None:
    """Add settings (a map type's, when it is registered); a name that is taken is refused."""
    taken = sorted(set(settings) & set(declarations()))
    if taken:
        raise ValueError(f"The setting name(s) {', '.join(taken)} are taken; choose other names.")
    _DECLARED.update(settings)


def undeclare(names: Sequence[str]) -> None:
    for name in names:
        _DECLARED.pop(name, None)


DEFAULTS = Settings()
