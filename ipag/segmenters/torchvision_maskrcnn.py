"""torchvision's Mask R-CNN R50-FPN v2 with COCO weights: the detector that installs from PyPI alone.

It proposes "things" only (no sky or grass); Detectron2's panoptic FPN is preferred where it is installed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2

from ipag.errors import ModelUnavailableError
from ipag.segmenters.base import Segment, Segmenter

WEIGHTS = MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1


class TorchvisionMaskRCNN(Segmenter):
    """Instance masks from torchvision's `maskrcnn_resnet50_fpn_v2`, labelled with COCO category names."""

    name = "torchvision"

    def __init__(
        self,
        device: str = "cpu",
        pretrained: bool = True,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        min_size: int = 800,
        max_size: int = 1333,
        max_segments: int | None = 24,
        proposals: int = 300,
        **model_options: Any,
    ) -> None:
        """Build the model; COCO weights are downloaded once into torch hub's cache (with progress).

        `pretrained=False` gives random weights without any download (tests). `min_size`/`max_size` are
        the model's internal resize (shorter/longer side); masks come back at the input size regardless.
        `proposals`: how many of the region proposal network's best-ranked boxes the box head examines
        (torchvision's default is 1000). v2's box head runs four 3×3 convolutions on each, 0.23 GFLOP a proposal:
        at 1000 that is more than the backbone, while we keep at most `max_segments` confident detections, which
        come from the best-ranked proposals (Faster R-CNN itself was evaluated with 300). On a 640×480 photo, 2
        cores: 3.4 s → 2.5 s. `model_options` go to torchvision's `MaskRCNN`.
        """
        super().__init__(max_segments)
        self.pretrained = pretrained
        self.mask_threshold = mask_threshold
        self.device = torch.device(device)
        try:
            network = maskrcnn_resnet50_fpn_v2(
                weights=WEIGHTS if pretrained else None,
                weights_backbone=None,
                num_classes=len(WEIGHTS.meta["categories"]),
                box_score_thresh=score_threshold,
                # The mask head's cost grows with the detections kept: compute no more than we return.
                box_detections_per_img=max_segments or 100,
                rpn_post_nms_top_n_test=proposals,
                min_size=min_size,
                max_size=max_size,
                **model_options,
            )
        except OSError as err:  # urllib's URLError and socket errors are OSErrors
            cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))
            raise ModelUnavailableError(
                f"Cannot download the torchvision Mask R-CNN R50-FPN v2 COCO weights from {WEIGHTS.url} ({err}). "
                f"Connect to the internet once (they are cached), or copy that file to {cached}; the "
                "'superpixels' segmenter needs no weights at all."
            ) from err
        # Channels-last: oneDNN's CPU convolutions run it without reordering every activation (same masks; 640×480
        # photo, 2 cores: 2.85 → 2.6 s).
        self.network = network.eval().to(self.device, memory_format=torch.channels_last)

    def describe(self) -> str:
        return f"torchvision Mask R-CNN R50-FPN v2 ({'COCO' if self.pretrained else 'random weights'})"

    def _segment(self, rgb: np.ndarray) -> list[Segment]:
        tensor = torch.tensor(rgb, dtype=torch.float32, device=self.device).permute(2, 0, 1) / 255.0
        with torch.inference_mode():
            output = self.network([tensor])[0]
        masks = (output["masks"][:, 0] > self.mask_threshold).cpu().numpy()
        categories = WEIGHTS.meta["categories"]
        return [
            Segment(mask, categories[label], float(score), self.name)
            for mask, label, score in zip(masks, output["labels"].tolist(), output["scores"].tolist(), strict=True)
        ]
