"""Detectron2 proposals: COCO panoptic FPN (things and stuff, the default) or Mask R-CNN (things only).

Panoptic FPN is preferred because it proposes "stuff" too (sky, grass, road), which the systems we replace
had to fake with the complement of all instances. Detectron2 is not on PyPI, so it is imported only when a
segmenter is built: this module imports fine without it. Two Detectron2 traps are avoided here:
`detectron2.model_zoo` imports `pkg_resources` (gone from setuptools ≥ 81), so config files are found with
`importlib.resources` and checkpoint URLs are spelled out; and its models expect the channel order of
`cfg.INPUT.FORMAT` (BGR by default), where the system we replace fed RGB.
"""

from __future__ import annotations

import importlib.resources
import os
from importlib.util import find_spec
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ipag.errors import ModelUnavailableError
from ipag.segmenters.base import Segment, Segmenter

INSTALL_HINT = (
    "Detectron2 is not installed (it is not on PyPI). Build it from source after torch: "
    "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
    "(needs a C++ compiler; see https://detectron2.readthedocs.io/en/latest/tutorials/install.html), "
    "or use the 'torchvision' segmenter, which installs from PyPI alone."
)

#: Where Detectron2's model zoo lives; `detectron2.model_zoo.model_zoo._ModelZooUrls.S3_PREFIX`.
MODEL_ZOO_URL = "https://dl.fbaipublicfiles.com/detectron2/"

Variant = Literal["panoptic", "maskrcnn"]


@dataclass(frozen=True)
class ZooModel:
    """A model-zoo entry. `checkpoint` is copied from `_ModelZooUrls.CONFIG_PATH_TO_URL_SUFFIX`, which cannot
    be imported without `pkg_resources`."""

    config: str  #: relative to detectron2's configs/ folder
    checkpoint: str
    title: str

    @property
    def url(self) -> str:
        return MODEL_ZOO_URL + self.config.removesuffix(".yaml") + "/" + self.checkpoint


MODELS: dict[str, ZooModel] = {
    "panoptic": ZooModel(
        "COCO-PanopticSegmentation/panoptic_fpn_R_50_3x.yaml", "139514569/model_final_c10459.pkl", "panoptic FPN R50"
    ),
    "maskrcnn": ZooModel(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml", "137849600/model_final_f10217.pkl", "Mask R-CNN R50-FPN"
    ),
}


class Detectron2Segmenter(Segmenter):
    """Detectron2 inference on one image, as `DefaultPredictor` does it, returning panoptic or instance masks."""

    name = "detectron2"

    @classmethod
    def available(cls) -> bool:
        """Whether Detectron2 can be imported, without importing it (that takes seconds and a C extension)."""
        return find_spec("detectron2") is not None

    def __init__(
        self,
        model: Variant = "panoptic",
        device: str = "cpu",
        weights: str | None = None,
        score_threshold: float = 0.5,
        cfg_overrides: Sequence[Any] = (),
        max_segments: int | None = 24,
    ) -> None:
        """Build the model and load its weights.

        `weights`: None for the model zoo's COCO checkpoint (downloaded once into Detectron2's file cache),
        a local path or URL, or "" for random initialisation (tests). `score_threshold` applies to instances
        (and, for panoptic, to the instances kept in the panoptic map). `cfg_overrides` is a flat
        KEY, VALUE, … list merged last, e.g. ``["INPUT.MIN_SIZE_TEST", 320]``.
        """
        if model not in MODELS:
            raise ValueError(f"Unknown Detectron2 model {model!r}; choose one of {', '.join(MODELS)}.")
        _import_detectron2()
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import MetadataCatalog, transforms
        from detectron2.modeling import build_model

        super().__init__(max_segments)
        self.zoo = MODELS[model]
        cfg = get_cfg()
        cfg.merge_from_file(str(config_file(self.zoo.config)))
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = self.zoo.url if weights is None else weights
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
        cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = score_threshold
        cfg.merge_from_list(list(cfg_overrides))
        cfg.freeze()
        self.cfg = cfg
        self.network = build_model(cfg).eval()
        if cfg.MODEL.WEIGHTS:
            DetectionCheckpointer(self.network).load(_local_checkpoint(cfg.MODEL.WEIGHTS, self.zoo.title))
        metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        self._thing_classes: list[str] = metadata.get("thing_classes", []) if metadata else []
        self._stuff_classes: list[str] = metadata.get("stuff_classes", []) if metadata else []
        self._resize = transforms.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    def describe(self) -> str:
        weights = self.cfg.MODEL.WEIGHTS
        trained = "COCO" if weights == self.zoo.url else "random weights" if not weights else f"weights {weights}"
        return f"detectron2 {self.zoo.title} ({trained})"

    def _segment(self, rgb: np.ndarray) -> list[Segment]:
        from detectron2.data.detection_utils import convert_PIL_to_numpy

        height, width = rgb.shape[:2]
        image = convert_PIL_to_numpy(Image.fromarray(rgb), self.cfg.INPUT.FORMAT)
        image = self._resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
        with torch.no_grad():
            output = self.network([{"image": tensor, "height": height, "width": width}])[0]
        if "panoptic_seg" in output:
            return self._panoptic_segments(*output["panoptic_seg"])
        instances = output["instances"].to("cpu")
        return [
            Segment(mask.numpy(), _class_name(self._thing_classes, int(label)), float(score), self.name)
            for mask, label, score in zip(instances.pred_masks, instances.pred_classes, instances.scores, strict=True)
        ]

    def _panoptic_segments(self, panoptic: torch.Tensor, segments_info: list[dict[str, Any]]) -> list[Segment]:
        """One segment per panoptic id; things carry their detector score, stuff has none."""
        ids = panoptic.cpu().numpy()
        return [
            Segment(
                ids == info["id"],
                _class_name(self._thing_classes if info["isthing"] else self._stuff_classes, info["category_id"]),
                float(info["score"]) if info["isthing"] else None,
                self.name,
            )
            for info in segments_info
        ]


class Detectron2MaskRCNN(Detectron2Segmenter):
    """Detectron2's Mask R-CNN (things only), under a registry name of its own."""

    name = "detectron2-maskrcnn"

    def __init__(self, device: str = "cpu", **options: Any) -> None:
        super().__init__("maskrcnn", device, **options)


def config_file(config_path: str) -> Path:
    """Path of a config file shipped with Detectron2, `config_path` relative to its configs/ folder.

    Looked up in the `detectron2` package rather than through `detectron2.model_zoo`, whose `__init__`
    imports `pkg_resources`. Installs place the configs in detectron2/model_zoo/configs (a copy, or a
    symlink for editable installs).
    """
    _import_detectron2()
    path = Path(str(importlib.resources.files("detectron2"))) / "model_zoo" / "configs" / config_path
    if not path.is_file():
        raise ModelUnavailableError(
            f"Detectron2 config {config_path} is missing ({path}); this detectron2 install lacks its model-zoo "
            f"configs. Reinstall it from source. {INSTALL_HINT}"
        )
    return path


def _import_detectron2() -> None:
    """Fail with install instructions, not a bare ModuleNotFoundError, when Detectron2 is absent."""
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise ModelUnavailableError(INSTALL_HINT) from err


def _local_checkpoint(weights: str, title: str) -> str:
    """A local file for `weights` (downloaded into Detectron2's cache if it is a URL), or a clear error."""
    from detectron2.utils.file_io import PathManager

    try:
        path = PathManager.get_local_path(weights)
    except OSError as err:
        raise ModelUnavailableError(
            f"Cannot download the Detectron2 {title} weights from {weights} ({err}). Connect to the internet "
            "once (Detectron2 caches them under $FVCORE_CACHE, default ~/.torch/iopath_cache), or download the "
            "file elsewhere and pass its path as weights=..."
        ) from err
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"Detectron2 {title} weights not found: {weights} is not a file.")
    return path


def _class_name(classes: list[str], index: int) -> str | None:
    """The class name for a model's class index, or None when the config names no dataset with classes."""
    return classes[index] if 0 <= index < len(classes) else None
