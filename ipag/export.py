"""An explanation as files: the page's Export button, the API and the batch CLI all write these.

One image's export is `image_export`: the image (`image.png`), an index (`image.json`: the caption and a summary
of each word, plus what the caller adds, e.g. the CLI's settings), and a folder per explained word (`03-blue/`)
with `explanation.json` (every number the page shows for the word: the explanation with the captioner and every
setting it was computed with, the ground truth on a generated scene, the sanity check when it was run), each map's
overlay and the map itself as full-size PNGs, and the region with its mask. The page's zip holds one word's folder,
the CLI's output folder one per word: the same files.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from .evaluation.localisation import GroundTruth
from .render import draw_maps, draw_region
from .results import Caption, Explanation
from .sanity import SanityCascade
from .settings import Settings

#: The index of an image's export; the CLI writes it last, as the mark of a finished image.
INDEX = "image.json"


class WordExport(NamedTuple):
    """One explained word and what the page shows with it (None: not known for this image, or not run)."""

    explanation: Explanation
    truth: GroundTruth | None = None
    sanity: SanityCascade | None = None

    def record(self) -> dict[str, Any]:
        """Everything the page shows for the word, JSON-ready."""
        return self.explanation.to_dict() | {"ground_truth": self.truth.to_dict() if self.truth else None,
                                             "sanity": self.sanity.to_dict() if self.sanity else None}


def image_export(image: Image.Image, caption: Caption | None, words: Sequence[WordExport], settings: Settings,
                 header: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """Path → bytes of one image's export (see the module), drawn with `settings`; `header` goes into the index.
    The index comes last."""
    files = {"image.png": png(image)}
    entries = []
    for word in words:
        folder = word_folder(word.explanation)
        files |= {f"{folder}/{name}": data for name, data in export_files(image, word, settings).items()}
        entries.append({"folder": folder, **_summary(word.explanation)})
    index = dict(header or {}) | {"caption": caption.to_dict() if caption else None, "explanations": entries}
    return files | {INDEX: json.dumps(index, indent=2).encode()}


def export_files(image: Image.Image, word: WordExport | Explanation, settings: Settings) -> dict[str, bytes]:
    """File name → bytes of one word's folder (drawn with `settings`, at the image's full size)."""
    word = word if isinstance(word, WordExport) else WordExport(word)
    explanation = word.explanation
    files = {"explanation.json": json.dumps(word.record(), indent=2).encode()}
    for key, picture in draw_maps(image, explanation, settings, max_side=None).items():
        files[f"{key}_overlay.png"] = png(picture)
        files[f"{key}.png"] = png(Image.fromarray((explanation.maps[key].values * 255).round().astype(np.uint8)))
    grounding = explanation.grounding
    if grounding is not None:
        files["region.png"] = png(draw_region(image, grounding.mask, max_side=None))
        files["region_mask.png"] = png(Image.fromarray(grounding.mask.astype(np.uint8) * 255))
    return files


def word_folder(explanation: Explanation) -> str:
    """`03-dog` for caption word 3, `query-red-car` for a free query."""
    if explanation.in_caption:
        return f"{explanation.words[0].index:02d}-{safe_name(' '.join(w.text for w in explanation.words))}"
    return f"query-{safe_name(explanation.query)}"


def _summary(explanation: Explanation) -> dict[str, Any]:
    summary = explanation.to_dict()
    return {key: summary[key] for key in ("query", "in_caption", "words", "word_indices", "word_logprob",
                                          "word_probability", "verification")}


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
