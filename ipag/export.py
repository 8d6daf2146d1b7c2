"""An explanation as files: the page's Export button, the API and the batch CLI all write these.

`explanation.json` (everything, including the captioner and every setting it was computed with), the image,
each map's overlay and the map itself as full-size PNGs, and the region with its mask.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .render import draw_maps, draw_region
from .results import Explanation
from .settings import Settings


def export_files(image: Image.Image, explanation: Explanation, settings: Settings,
                 include_image: bool = True) -> dict[str, bytes]:
    """File name → bytes for one explanation of `image` (drawn with `settings`' colour map and opacity)."""
    files = {"explanation.json": json.dumps(explanation.to_dict(), indent=2).encode()}
    if include_image:
        files["image.png"] = png(image)
    for key, picture in draw_maps(image, explanation, settings, max_side=None).items():
        files[f"{key}_overlay.png"] = png(picture)
        files[f"{key}.png"] = png(Image.fromarray((explanation.maps[key].values * 255).round().astype(np.uint8)))
    grounding = explanation.grounding
    if grounding is not None:
        files["region.png"] = png(draw_region(image, grounding.mask, max_side=None))
        files["region_mask.png"] = png(Image.fromarray(grounding.mask.astype(np.uint8) * 255))
    return files


def write_zip(files: dict[str, bytes], path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def safe_name(name: str) -> str:
    """A file-name-safe version of user text."""
    return "".join(c if c.isalnum() else "-" for c in name)[:40] or "query"
