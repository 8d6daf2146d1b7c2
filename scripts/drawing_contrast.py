"""How much the page's drawing of a map changes the photo on the named object and over the background
(issue 23's goal: the default view's change ≥ 3× larger on the object, ≤ 15/255 on average over the background).

    .venv/bin/python scripts/drawing_contrast.py               # 12 held-out scenes, their colour words
    .venv/bin/python scripts/drawing_contrast.py --scenes 50 --view saliency

The models shipped in `models/` (`Explainer.synthetic`) explain every colour word of each held-out scene's true
caption (teacher-forced, as `evaluate-groundtruth` does); the view is drawn as the page draws it (`ipag.render`,
the default drawing settings, without the true object's outline), and compared with the photo: the mean absolute
change of the RGB values, in /255, over the named object and over the background (the pixels of no object).
"Before" is the drawing this replaced: the map's values, rescaled to [0, 1], in jet at a constant 50% opacity.
"""

from __future__ import annotations

import argparse
import statistics

import matplotlib
import numpy as np
from PIL import Image

from ipag import Explainer, Settings, ui
from ipag.evaluation.groundtruth import true_caption
from ipag.render import draw_map
from ipag.synthetic.scenes import generate_scene, word_kind


def change(photo: Image.Image, drawn: Image.Image, mask: np.ndarray) -> float:
    """Mean absolute RGB change (in /255) of `drawn` against `photo` over the pixels of `mask`."""
    difference = np.abs(np.asarray(drawn, dtype=np.float32) - np.asarray(photo.convert("RGB"), dtype=np.float32))
    return float(difference[mask].mean())


def before(photo: Image.Image, values: np.ndarray) -> Image.Image:
    """The old drawing: jet over the whole picture at a constant 50% opacity."""
    colours = matplotlib.colormaps["jet"](values)[..., :3] * 255.0
    return Image.fromarray((0.5 * colours + 0.5 * np.asarray(photo.convert("RGB"))).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=12, help="held-out scenes, seeds 0, 1, …")
    parser.add_argument("--view", default=ui.DEFAULT_VIEW, help="the map key drawn (default: the page's view)")
    args = parser.parse_args()
    explainer = Explainer.synthetic()
    settings = Settings(verify=False)
    rows: dict[str, list[tuple[float, float]]] = {"before": [], "now": []}
    for seed in range(args.scenes):
        scene = generate_scene(seed)
        caption = true_caption(explainer, scene)
        background = ~np.any(scene.masks, axis=0)
        for index, (word, mask) in enumerate(scene.evidence):
            if mask is None or word_kind(word) != "colour":
                continue
            heatmap = explainer.explain(scene.image, index, caption=caption, settings=settings).maps[args.view]
            for name, drawn in (("before", before(scene.image, heatmap.values)),
                                ("now", draw_map(scene.image, heatmap, settings))):
                rows[name].append((change(scene.image, drawn, mask), change(scene.image, drawn, background)))
    for name, pairs in rows.items():
        on, off = (statistics.mean(values) for values in zip(*pairs))
        print(f"{name:>6}: {len(pairs)} colour words of {args.scenes} scenes, {args.view}: on the object "
              f"{on:.1f}/255, background {off:.1f}/255, ratio {on / off:.1f}×")


if __name__ == "__main__":
    main()
