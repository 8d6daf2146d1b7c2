"""What a batch run works on: image files named on the command line or found in folders, reference captions,
and which caption words to explain.

Both the batch `explain` command and the evaluations read their inputs here, so an image set means the same
thing everywhere (same files found, same order, same names in the outputs).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..explainer import Query
from ..results import Caption


class DatasetError(ValueError):
    """A reference-caption file cannot be read; the message names the file, the line and the expected format."""


def image_extensions() -> frozenset[str]:
    """File suffixes Pillow can open (lower case, with the dot)."""
    return frozenset(Image.registered_extensions())


def collect_images(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(images, ignored): files named explicitly are always taken (a bad one is reported when it is read);
    folders contribute their files with an image suffix, sorted, not recursing. `ignored` lists the other
    files found in folders, so the caller can say what it skipped instead of skipping silently."""
    suffixes = image_extensions()
    images: list[Path] = []
    ignored: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            images.append(path)
            continue
        for child in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            (images if child.suffix.lower() in suffixes else ignored).append(child)
    return list(dict.fromkeys(images)), ignored


def output_names(images: Sequence[Path]) -> dict[Path, str]:
    """A folder name per image: its stem, or the stem plus a hash of its path where two inputs share a stem
    (a/x.jpg and b/x.png). Deterministic, so a resumed run finds the same folders again."""
    counts: dict[str, int] = {}
    for image in images:
        counts[image.stem] = counts.get(image.stem, 0) + 1
    return {image: image.stem if counts[image.stem] == 1 else
            f"{image.stem}-{hashlib.blake2b(str(image.resolve()).encode(), digest_size=4).hexdigest()}"
            for image in images}


def parse_words(spec: str) -> tuple[str, ...] | None:
    """`--words`: "all" → None (every caption word), else the comma-separated words, in order, deduplicated."""
    if spec.strip().lower() == "all":
        return None
    words = tuple(dict.fromkeys(word.strip() for word in spec.split(",") if word.strip()))
    if not words:
        raise ValueError("--words needs 'all' or a comma-separated list of words, e.g. --words dog,grass.")
    return words


def select_queries(caption: Caption, words: Sequence[str] | None) -> list[Query]:
    """The queries to explain for `caption`: every word by index, or the given words (the first occurrence of a
    caption word; a word the caption lacks is explained as a free query, as in the playground)."""
    return list(range(len(caption.words))) if words is None else list(words)


def read_references(path: str | Path) -> dict[str, list[str]]:
    """Image file name → its reference captions, in file order.

    Two formats, told apart by the suffix: Flickr8k's `captions.txt` (CSV with the header `image,caption`,
    one reference per line; a caption may contain commas, quoted or not) and COCO's caption annotations
    (`captions_val2017.json`: `images` with `id` and `file_name`, `annotations` with `image_id` and `caption`).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"No such captions file: {path}")
    references = _read_coco(path) if path.suffix.lower() == ".json" else _read_flickr(path)
    if not references:
        raise DatasetError(f"{path} holds no reference captions.")
    return references


def _read_flickr(path: Path) -> dict[str, list[str]]:
    references: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:  # tolerate a BOM
        rows = csv.reader(handle)
        header = [cell.strip().lower() for cell in next(rows, [])]
        if header[:2] != ["image", "caption"]:
            raise DatasetError(f"{path} must start with the header line 'image,caption' (Flickr8k's captions.txt "
                               f"format), found {','.join(header)[:60]!r}. COCO annotations must be a .json file.")
        for line, row in enumerate(rows, start=2):
            if not any(cell.strip() for cell in row):
                continue
            caption = ",".join(row[1:]).strip()
            if len(row) < 2 or not row[0].strip() or not caption:
                raise DatasetError(f"{path}, line {line}: expected 'image,caption', got {','.join(row)[:80]!r}.")
            references.setdefault(row[0].strip(), []).append(caption)
    return references


def _read_coco(path: Path) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = {image["id"]: image["file_name"] for image in data["images"]}
        references: dict[str, list[str]] = {}
        for annotation in data["annotations"]:
            references.setdefault(names[annotation["image_id"]], []).append(annotation["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DatasetError(f"{path} is not a COCO caption annotation file (needs 'images' with id/file_name and "
                           f"'annotations' with image_id/caption): {type(err).__name__}: {err}") from err
    return references


def match_images(folder: str | Path, references: dict[str, list[str]],
                 limit: int | None = None) -> tuple[dict[str, Path], list[str]]:
    """(name → image path for the referenced images found in `folder`, sorted and cut to `limit`; the
    referenced names missing from the folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"No such images folder: {folder}")
    found = {name: folder / name for name in sorted(references) if (folder / name).is_file()}
    missing = [name for name in sorted(references) if name not in found]
    if limit is not None:
        found = dict(list(found.items())[:limit])
    return found, missing
