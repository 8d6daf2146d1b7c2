"""Generated scenes whose evidence is known exactly: the ground truth for captioner explanations.

A scene is 1–3 flat-coloured shapes on a textured, noisy background with low-contrast clutter, and a caption
from a fixed grammar that names every object by colour and shape:

    "a red circle"   "a red circle and a blue square"   "a red circle, a blue square and a green triangle"

Rules that make every content word unambiguous (so that its evidence is exactly one object's mask):

- **Order**: objects are named left to right. Their horizontal extents never overlap (there is a gap of at
  least `GAP` pixels), so "left of" holds at every height and the order never depends on a pixel.
- **Distinct words**: within one scene all colours differ and all shapes differ, so each colour word and
  each shape word refers to exactly one object.
- **Evidence**: a colour or shape word's evidence is the mask of the object it names; "a", "an", "and" have none.
- **No shortcut**: the background is a smooth random greyish tint plus pixel noise, and the clutter (thin lines
  and specks) is desaturated and close to the background's brightness: it is never an object colour or shape,
  but "everything that is not flat background" is not the answer either.

Everything is drawn without anti-aliasing, so an object's mask is exactly the set of pixels painted in its
colour, and `Scene.without(i)` re-renders the same background, clutter and other objects without object i
(the counterfactual: only that object's pixels change). Scenes are deterministic functions of their seed.
Seeds below `TRAINING_SEEDS_START` are never used in training: evaluation, tests and examples draw from them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: Scene side in pixels (square scenes; the shipped models see exactly these pixels, no resizing).
SIZE = 96
#: Object colours: saturated and far apart in hue, so none is ever confused with the greyish background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 30),
    "purple": (145, 55, 195),
    "orange": (250, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
#: Object side (bounding box) in pixels, by number of objects: at least 2.5 of the captioner's 8 px patches.
OBJECT_SIZES = {1: (22, 44), 2: (21, 38), 3: (20, 27)}
#: Least horizontal gap between objects and between an object and the image border, in pixels.
GAP = 3
#: Each colour channel of an object varies by up to this much between scenes (still flat within the object).
COLOUR_JITTER = 12
#: Seeds from here on are for training; everything below is held out.
TRAINING_SEEDS_START = 1_000_000
#: Held-out scenes the playground shows as examples in synthetic mode.
EXAMPLE_SEEDS = (0, 1, 2, 3, 5, 8, 13, 21)
#: Held-out scenes `find_scene` recognises (the benchmark's default 500 and the examples are among them).
KNOWN_SEEDS = range(1000)
#: Words that name nothing in the image.
FUNCTION_WORDS = ("a", "an", "and")


@dataclass(frozen=True)
class SceneObject:
    """One shape: what it is called, the colour it is painted in and where (its bounding box)."""

    colour: str
    shape: str
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]  #: left, top, right, bottom (inclusive), in pixels

    def mask(self) -> np.ndarray:
        """The pixels the shape covers (H×W bool), drawn exactly as it is painted."""
        canvas = Image.new("L", (SIZE, SIZE), 0)
        draw_shape(ImageDraw.Draw(canvas), self.shape, self.box)
        return np.asarray(canvas) > 0


@dataclass(frozen=True)
class Scene:
    """A generated scene: `image`, its true `caption`, and per caption word the `evidence` mask (or None)."""

    seed: int
    objects: tuple[SceneObject, ...]  #: left to right, the order the caption names them in
    background: np.ndarray = field(repr=False)  #: H×W×3 uint8 background with its clutter

    @cached_property
    def masks(self) -> tuple[np.ndarray, ...]:
        """Each object's mask, in caption order."""
        return tuple(obj.mask() for obj in self.objects)

    @cached_property
    def image(self) -> Image.Image:
        pixels = self.background.copy()
        for obj, mask in zip(self.objects, self.masks):
            pixels[mask] = obj.rgb
        return Image.fromarray(pixels)

    @property
    def caption(self) -> str:
        return caption_of(self.objects)

    @cached_property
    def evidence(self) -> tuple[tuple[str, np.ndarray | None], ...]:
        """(word, mask) for every caption word in order (punctuation is not a word); None for function words."""
        return tuple((word, None if index is None else self.masks[index])
                     for word, index in _words(self.objects) if word != ",")

    def without(self, index: int) -> "Scene":
        """The same scene with object `index` (caption order) removed: the counterfactual."""
        if not 0 <= index < len(self.objects):
            raise IndexError(f"Object {index} does not exist: the scene has {len(self.objects)} objects.")
        return replace(self, objects=self.objects[:index] + self.objects[index + 1:])

    def object_of(self, word_index: int) -> int | None:
        """Which object (caption order) caption word `word_index` names; None for function words."""
        return [index for word, index in _words(self.objects) if word != ","][word_index]


def caption_of(objects: Sequence[SceneObject]) -> str:
    """The caption of objects, left to right (see `describe`)."""
    return describe([(obj.colour, obj.shape) for obj in objects])


def describe(pairs: Sequence[tuple[str, str]]) -> str:
    """The grammar, for (colour, shape) pairs: "a red circle", "… and a blue square", "…, an orange square and a
    green triangle"."""
    return " ".join(word for word, _ in _words(pairs)).replace(" ,", ",")


def pairs_of(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption of the grammar names, in order (the inverse of `describe`)."""
    words = [word for word in caption.replace(",", " ").split() if word_kind(word) != "function"]
    return list(zip(words[::2], words[1::2]))


def _words(objects: Sequence[SceneObject] | Sequence[tuple[str, str]]) -> list[tuple[str, int | None]]:
    """The caption's words and commas, each with the index of the object it names (None: names nothing)."""
    pairs = [obj if isinstance(obj, tuple) else (obj.colour, obj.shape) for obj in objects]
    words: list[tuple[str, int | None]] = []
    for index, (colour, shape) in enumerate(pairs):
        if index:
            words.append(("and" if index == len(pairs) - 1 else ",", None))
        article = "an" if colour[0] in "aeiou" else "a"
        words += [(article, None), (colour, index), (shape, index)]
    return words


def generate_scene(seed: int) -> Scene:
    """The scene of `seed` (deterministic; see the module docstring for the rules it follows)."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 4))
    colours = rng.choice(list(COLOURS), size=count, replace=False)
    shapes = rng.choice(SHAPES, size=count, replace=False)
    low, high = OBJECT_SIZES[count]
    sides = rng.integers(low, high + 1, size=count)
    # Split the horizontal slack at random between the gaps: objects anywhere, never overlapping in x.
    slack = SIZE - int(sides.sum()) - GAP * (count + 1)
    shares = np.diff(np.concatenate([[0], np.sort(rng.integers(0, slack + 1, size=count)), [slack]]))
    objects = []
    left = GAP
    for colour, shape, side, share in zip(colours, shapes, sides, shares):
        left += int(share)
        top = int(rng.integers(GAP, SIZE - GAP - side + 1))
        rgb = tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255))
                    for c in COLOURS[str(colour)])
        objects.append(SceneObject(str(colour), str(shape), rgb, (left, top, left + int(side) - 1, top + int(side) - 1)))
        left += int(side) + GAP
    return Scene(seed, tuple(objects), _background(rng))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: int = 255) -> None:
    """Paint `shape` into `box` (inclusive pixel corners) without anti-aliasing."""
    left, top, right, bottom = box
    middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        inset = (right - left) * 0.08  # a full-box square would look much larger than the other shapes
        draw.rectangle((left + inset, top + inset, right - inset, bottom - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(middle_x, top), (right, bottom), (left, bottom)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(middle_x, top), (right, middle_y), (middle_x, bottom), (left, middle_y)], fill=fill)
    elif shape == "cross":
        arm = (right - left) / 6
        draw.rectangle((middle_x - arm, top, middle_x + arm, bottom), fill=fill)
        draw.rectangle((left, middle_y - arm, right, middle_y + arm), fill=fill)
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {', '.join(SHAPES)}.")


def _background(rng: np.random.Generator) -> np.ndarray:
    """A greyish tint with smooth low-frequency variation, pixel noise and desaturated clutter (H×W×3 uint8)."""
    brightness = rng.uniform(70, 190)
    tint = rng.uniform(-12, 12, size=3)
    coarse = Image.fromarray(rng.normal(0, rng.uniform(5, 18), size=(4, 4)).astype(np.float32))
    smooth = np.asarray(coarse.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    pixels = brightness + tint + smooth[..., None] + rng.normal(0, rng.uniform(3, 10), size=(SIZE, SIZE, 1))
    canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 10))):
        grey = brightness + rng.choice([-1, 1]) * rng.uniform(15, 35)
        colour = tuple(int(np.clip(grey + t + rng.uniform(-6, 6), 0, 255)) for t in tint)
        x, y = rng.uniform(0, SIZE, size=2)
        if rng.random() < 0.5:  # a thin line
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6) * SIZE
            end = (x + length * np.cos(angle), y + length * np.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 3)))
        else:  # a speck
            radius = rng.uniform(1, 3)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return np.asarray(canvas).copy()


def example_files(folder: Path, seeds: Sequence[int] = EXAMPLE_SEEDS) -> list[str]:
    """Held-out scenes as PNG files named `scene-<seed>.png` in `folder` (the playground's examples in synthetic
    mode; a file name tells which scene, hence which evidence, an example is)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"scene-{seed}.png"
        generate_scene(seed).image.save(path)
        paths.append(str(path))
    return paths


def find_scene(image: Image.Image) -> Scene | None:
    """The held-out scene (`KNOWN_SEEDS`) whose image this is, pixel for pixel, or None: how the page knows the
    ground truth of an uploaded or example scene without trusting its file name."""
    if image.size != (SIZE, SIZE):
        return None
    seed = _known_scenes().get(_fingerprint(image))
    return None if seed is None else generate_scene(seed)


@cache
def _known_scenes() -> dict[str, int]:
    return {_fingerprint(generate_scene(seed).image): seed for seed in KNOWN_SEEDS}


def _fingerprint(image: Image.Image) -> str:
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def word_kind(word: str) -> str:
    """"colour", "shape" or "function": what a caption word of the grammar says."""
    return "colour" if word in COLOURS else "shape" if word in SHAPES else "function"


def evidence_for(scene: Scene, words: Sequence[str], index: int) -> np.ndarray | None:
    """The evidence of word `index` of a caption (`words`) the model wrote for `scene`: the mask of the object
    that word's place in the grammar names, when the caption has the true caption's structure (same length,
    a colour where a colour belongs, a shape where a shape belongs), so a wrong shape word ("a red square" for
    a red circle) is still scored on the object it was said of. None for function words and other structures."""
    truth = [word for word, _ in scene.evidence]
    if len(words) != len(truth) or any(word_kind(a) != word_kind(b) for a, b in zip(words, truth)):
        return None
    return scene.evidence[index][1]
