"""How a vision-language model sees the photo: the canvas, the model's pixel inputs made from it, and where each of
the model's tokens lies on it.

Each family's processor prepares the photo its own way: it squashes it onto one input (LLaVA 1.5, PaliGemma,
Gemma 3), picks one of a few resolutions for it and cuts that into tiles beside a thumbnail (LLaVA-NeXT,
LLaVA-OneVision), resizes it to whole tiles (Idefics3, SmolVLM), or to multiples of merged patches and flattens those
(Qwen2-VL, Qwen2.5-VL). Whatever the family, the captioner's `pixel_values` are one (B, 3, H, W) *canvas*: the photo
squashed to the size the family's processor would choose for it (so nothing is padded or cropped away, and every map
goes back onto the photo by the exact inverse stretch), normalised by the processor. `Canvas.pixel_inputs` turns a
canvas batch into what the model takes with the processor's own torch methods — tiles are crops of the canvas, the
thumbnail the processor's resampling of it, Qwen's patches its reshape — all differentiable, so gradients, occlusion,
integrated gradients and the trust numbers work on the canvas unchanged. The layouts (`ipag.layout`) say where each
token lies on the canvas: the vision tower's tokens for Grad-CAM (all tiles' grids stacked, for the tiled families)
and the language model's image tokens for its attention to the image.
"""

from __future__ import annotations

import inspect
import math
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.image_processing_utils import BaseImageProcessor, select_best_resolution
from transformers.image_transforms import divide_to_patches
from transformers.image_utils import SizeDict

from ..layout import Layout, grid_boxes, tile_boxes, union_boxes

#: Why LeGrad is not offered for a tiled family: a word's pass keeps the vision attention of the first input of the
#: tower's batch only, here one tile of several.
TILED = ("LeGrad reads the vision tower's attention over one input, and this model's vision tower sees the photo as "
         "several tiles.")


class Canvas:
    """The photo squashed onto one input of a fixed size (LLaVA 1.5, PaliGemma, Gemma 3): the model's pixel input is
    the canvas itself, and its image tokens one square grid over it. The families with tiles or patches subclass it.

    It holds the model only for parameter-free parts (its config, its feature packing), so that a copy of the
    captioner with re-initialised vision blocks (`ipag.sanity`) can share it."""

    #: Why LeGrad cannot be had for this family (None: it can).
    no_vision_attention: str | None = None

    def __init__(self, model: nn.Module, image_processor: BaseImageProcessor) -> None:
        self.model = model
        self.image_processor = image_processor
        self.image_token = model.config.image_token_id

    def size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the canvas for a photo of this size: here the processor's one input size."""
        return self._input_size

    @cached_property
    def _input_size(self) -> tuple[int, int]:
        pixels = self.image_processor(images=Image.new("RGB", (64, 64)), return_tensors="pt").pixel_values
        return tuple(pixels.shape[-2:])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """The processor's rescaling and normalisation of a (B, 3, H, W) uint8 canvas."""
        processor = self.image_processor
        return processor.rescale_and_normalize(pixels, processor.do_rescale, processor.rescale_factor,
                                               processor.do_normalize, _hashable(processor.image_mean),
                                               _hashable(processor.image_std))

    def pixel_inputs(self, canvas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's image arguments for a (B, 3, H, W) canvas batch, differentiable with respect to it."""
        return {"pixel_values": canvas}

    def vision_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """A vision block's tokens (or their gradient) as the grid Grad-CAM weights: (B, D, side, side)."""
        return square_grid(tokens)

    def vision_layout(self, size: tuple[int, int], grid: tuple[int, int]) -> Layout:
        """Where the cells of `vision_grid`'s `grid` lie on a canvas of `size`: here one grid over all of it."""
        return Layout.of_grid(*grid)

    def image_layout(self, token_ids: list[int], size: tuple[int, int]) -> Layout:
        """Where the language model's image tokens in `token_ids` lie on a canvas of `size`: here one square grid over
        all of it, from the first image token on."""
        side = math.isqrt(token_ids.count(self.image_token))
        return Layout.of_grid(side, side, first=token_ids.index(self.image_token))

    def _placed(self, token_ids: list[int], boxes: np.ndarray, size: tuple[int, int]) -> Layout:
        """A layout that gives the image tokens of `token_ids` their `boxes`, in order (other tokens have no place)."""
        positions = np.flatnonzero(np.asarray(token_ids) == self.image_token)
        if len(positions) != len(boxes):
            raise ValueError(f"The prompt holds {len(positions)} image tokens; a {size[1]} × {size[0]} canvas makes "
                             f"{len(boxes)}.")
        placed = np.full((positions[-1] + 1, 4), np.nan)
        placed[positions] = boxes
        return Layout(size, boxes=placed)


class AnyResolution(Canvas):
    """LLaVA-NeXT and LLaVA-OneVision: the photo at the best of the model's pinpoint resolutions (the canvas, so
    nothing is padded), cut into tiles of the vision tower's input after a thumbnail of the whole. The language model
    reads the thumbnail's tokens, then the tiles' as one big grid (which OneVision pools when it is large), each row
    ended by a learnt newline token."""

    no_vision_attention = TILED

    @property
    def side(self) -> int:
        """The side of a tile and of the thumbnail: the vision tower's input."""
        return self.model.config.vision_config.image_size

    def size(self, height: int, width: int) -> tuple[int, int]:
        return tuple(select_best_resolution((height, width), self.image_processor.image_grid_pinpoints))

    def pixel_inputs(self, canvas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The thumbnail (the processor's resampling of the whole canvas), then the tiles in reading order:
        (B, 1 + tiles, 3, side, side), and each image's size (the canvas's: nothing to unpad)."""
        side = self.side
        thumbnail = self.image_processor.resize(canvas, SizeDict(height=side, width=side),
                                                resample=self.image_processor.resample)
        sizes = torch.tensor([canvas.shape[-2:]], device=canvas.device).expand(len(canvas), -1)
        return {"pixel_values": torch.stack([thumbnail, *divide_to_patches(canvas, side)], dim=1), "image_sizes": sizes}

    def vision_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return stacked(square_grid(tokens))

    def _cells(self, size: tuple[int, int], side: int) -> np.ndarray:
        """Boxes of the vision tokens (side × side per view), view after view: the thumbnail's over the whole
        canvas, then each tile's over its tile."""
        return np.concatenate([grid_boxes(side, side), tile_boxes(size[0] // self.side, size[1] // self.side, side)])

    def vision_layout(self, size: tuple[int, int], grid: tuple[int, int]) -> Layout:
        return Layout(size, boxes=self._cells(size, grid[1]))

    def image_layout(self, token_ids: list[int], size: tuple[int, int]) -> Layout:
        """The model's own packing run on each vision token's box (its four numbers as the token's features), so
        that the order, OneVision's pooling (boxes interpolated as the features are) and the row-ending newline
        tokens (NaN: no place) are exactly the model's."""
        config = self.model.config
        side = self.side // config.vision_config.patch_size
        boxes = torch.from_numpy(self._cells(size, side)).float().reshape(-1, side * side, 4)
        pack = self.model.model.pack_image_features
        options = ({"vision_aspect_ratio": config.vision_aspect_ratio}
                   if "vision_aspect_ratio" in inspect.signature(pack).parameters
                   else {"vision_feature_select_strategy": config.vision_feature_select_strategy})
        packed, _ = pack([boxes], torch.tensor([size]), image_newline=torch.full((4,), torch.nan), **options)
        return self._placed(token_ids, packed[0].numpy(), size)


class Tiles(Canvas):
    """Idefics3 and SmolVLM: the photo resized to whole tiles of the vision tower's input (the canvas), cut into them
    in reading order, then squashed whole into one more (none when the canvas is one tile); the connector
    pixel-shuffles each tile's patch tokens, several into one language-model token."""

    no_vision_attention = TILED

    @property
    def side(self) -> int:
        """The side of a tile: the vision tower's input."""
        return self.image_processor.max_image_size["longest_edge"]

    def size(self, height: int, width: int) -> tuple[int, int]:
        _, rows, columns = self.image_processor.get_number_of_image_patches(height, width)
        return max(rows, 1) * self.side, max(columns, 1) * self.side

    def pixel_inputs(self, canvas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The processor's split: the tiles, then the whole canvas resampled to one tile (B, views, 3, side, side).
        No `pixel_attention_mask`: nothing is padded, and the model then takes every pixel as real."""
        frames, _, _ = self.image_processor.split_images(canvas, self.image_processor.max_image_size,
                                                         resample=self.image_processor.resample)
        return {"pixel_values": frames}

    def vision_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        return stacked(square_grid(tokens))

    def _cells(self, size: tuple[int, int], side: int) -> np.ndarray:
        """Boxes of the vision tokens (side × side per view), view after view: each tile's, then the whole's."""
        rows, columns = size[0] // self.side, size[1] // self.side
        whole = grid_boxes(side, side)
        return whole if rows * columns == 1 else np.concatenate([tile_boxes(rows, columns, side), whole])

    def vision_layout(self, size: tuple[int, int], grid: tuple[int, int]) -> Layout:
        return Layout(size, boxes=self._cells(size, grid[1]))

    def image_layout(self, token_ids: list[int], size: tuple[int, int]) -> Layout:
        """Each image token covers the patches it was shuffled from: the connector's own pixel shuffle, run on the
        patches' indices, names them."""
        config = self.model.config
        side = self.side // config.vision_config.patch_size
        patches = self._cells(size, side)
        indices = torch.arange(len(patches), dtype=torch.float32).reshape(-1, side * side, 1)
        sources = self.model.model.connector.pixel_shuffle(indices, config.scale_factor)
        return self._placed(token_ids, union_boxes(patches, sources.flatten(0, 1).long().numpy()), size)


class Patches(Canvas):
    """Qwen2-VL and Qwen2.5-VL: the photo resized to multiples of a merge block of patches within a pixel budget (the
    canvas), flattened by the processor into patches ordered block by block (the frame repeated over the temporal
    patch); the projector merges each block into one language-model token, so the image tokens are one grid over
    the canvas. Qwen2.5-VL's vision tower reorders the blocks window by window."""

    no_vision_attention = ("Qwen's vision tower computes attention per image or window without returning the "
                           "probabilities, which LeGrad needs.")

    def size(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        processor = self.image_processor
        return smart_resize(height, width, processor.patch_size * processor.merge_size,
                            processor.size["shortest_edge"], processor.size["longest_edge"])

    def pixel_inputs(self, canvas: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every image's patches, one after the other (B · patches, 3 · temporal · patch²), and each one's grid."""
        processor = self.image_processor
        patches, rows, columns = processor.patchify(canvas, processor.patch_size, processor.merge_size,
                                                    processor.temporal_patch_size)
        grid = torch.tensor([[1, rows, columns]], device=canvas.device).expand(len(canvas), -1)
        return {"pixel_values": patches.flatten(0, 1), "image_grid_thw": grid}

    def vision_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's flat sequence of patch tokens (N, D), every image's, as one column (its boxes place it)."""
        return tokens.T[None, :, :, None]

    def vision_layout(self, size: tuple[int, int], grid: tuple[int, int]) -> Layout:
        """Each patch token's box, in the tower's order: block by block (Qwen2.5-VL: its windows' blocks in turn)."""
        from transformers.vision_utils import get_vision_window_index

        merge, patch = self.image_processor.merge_size, self.image_processor.patch_size
        rows, columns = size[0] // patch, size[1] // patch
        boxes = tile_boxes(rows // merge, columns // merge, merge)
        visual = self.model.model.visual
        if getattr(visual, "window_size", None):
            window, _ = get_vision_window_index(torch.tensor([[1, rows, columns]]), merge, visual.window_size,
                                                visual.patch_size)
            boxes = boxes.reshape(-1, merge * merge, 4)[window.numpy()].reshape(-1, 4)
        return Layout(size, boxes=boxes)

    def image_layout(self, token_ids: list[int], size: tuple[int, int]) -> Layout:
        block = self.image_processor.patch_size * self.image_processor.merge_size
        return Layout.of_grid(size[0] // block, size[1] // block, first=token_ids.index(self.image_token))


def square_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens (B, N, D) as a (B, D, side, side) grid, a CLS token first dropped (CLIP has one, SigLIP none)."""
    count = tokens.shape[1]
    if math.isqrt(count) ** 2 != count:
        tokens, count = tokens[:, 1:], count - 1
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"Vision tokens ({tokens.shape[1]}) are not a square patch grid, with or without a CLS token.")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def stacked(grids: torch.Tensor) -> torch.Tensor:
    """Every view's grid (views, D, side, side), top to bottom in one (1, D, views · side, side) grid: Grad-CAM weighs
    the channels over all views at once, and the views' boxes place each cell."""
    return grids.transpose(0, 1).flatten(1, 2)[None]


def _hashable(value: float | list[float]) -> float | tuple[float, ...]:
    """A processor's mean or std as its cached normalisation takes it (lists are not hashable)."""
    return tuple(value) if isinstance(value, list) else value
