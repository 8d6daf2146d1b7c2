"""Segmenters: the mask contract (bool, input size, best first), superpixel tilings, and real inference of the
torchvision and Detectron2 backends on tiny random-weight models (no download). The Detectron2 tests skip
where it is not installed (it is not on PyPI); they run wherever it is built."""

import copy
import importlib
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from ipag import segmenters
from ipag.segmenters import ModelUnavailableError, Segment, Segmenter, available_segmenters, load_segmenter
from ipag.segmenters import detectron2 as detectron2_backend
from ipag.segmenters.detectron2 import Detectron2Segmenter
from ipag.segmenters.superpixels import METHODS, Superpixels
from ipag.segmenters.torchvision_maskrcnn import WEIGHTS, TorchvisionMaskRCNN

NO_DETECTRON2 = "detectron2 is not installed (not on PyPI); build it from source to run these tests"
#: Small enough for a CPU test: a 64-px input, few proposals, and stuff regions of any size kept.
TINY_DETECTRON2 = [
    "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT", 0,
]


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def halves(height: int, width: int) -> np.ndarray:
    """Noisy red left half, noisy blue right half: every method must find the edge, none may cross it."""
    image = np.zeros((height, width, 3))
    image[:, : width // 2], image[:, width // 2 :] = (200, 40, 40), (40, 40, 200)
    return np.clip(image + np.random.default_rng(0).normal(0, 20, image.shape), 0, 255).astype(np.uint8)


def assert_tiles(segments: list[Segment], shape: tuple[int, int]) -> None:
    """Every pixel in exactly one segment, and every mask bool at the input size."""
    assert all(s.mask.dtype == np.bool_ and s.mask.shape == shape for s in segments)
    coverage = np.sum([s.mask for s in segments], axis=0)
    assert coverage.min() == 1 and coverage.max() == 1


# --- The shared contract -------------------------------------------------------------------------------------

class Fixed(Segmenter):
    """Returns given (mask, score) pairs and records the array `_segment` was handed."""

    name = "fixed"

    def __init__(self, regions, max_segments=24):
        super().__init__(max_segments)
        self.regions = regions
        self.seen: list[np.ndarray] = []

    def describe(self) -> str:
        return "fixed regions"

    def _segment(self, rgb):
        self.seen.append(rgb)
        return [Segment(mask, None, score, self.name) for mask, score in self.regions]


def band(rows: slice, shape=(4, 6)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows] = True
    return mask


def test_segment_hands_rgb_uint8_to_backends_whatever_the_input():
    segmenter = Fixed([(band(slice(0, 1)), None)])
    rgba = np.zeros((4, 6, 4))  # float RGBA in [0, 1]: must arrive as H×W×3 uint8
    rgba[..., 0], rgba[..., 3] = 1.0, 1.0
    segmenter.segment(rgba)
    segmenter.segment(Image.new("L", (6, 4), 7))
    (first, second) = segmenter.seen
    assert first.shape == (4, 6, 3) and first.dtype == np.uint8 and (first == (255, 0, 0)).all()
    assert second.shape == (4, 6, 3) and (second == 7).all()


def test_segment_orders_by_score_then_area_drops_empty_and_caps():
    empty, small, large = band(slice(0, 0)), band(slice(0, 1)), band(slice(1, 4))
    regions = [(small, None), (empty, 0.99), (small, 0.2), (large, None), (large, 0.9)]
    ranked = Fixed(regions).segment(noise(4, 6))
    assert [(s.score, s.area) for s in ranked] == [(0.9, 18), (0.2, 6), (None, 18), (None, 6)]
    assert [s.score for s in Fixed(regions, max_segments=2).segment(noise(4, 6))] == [0.9, 0.2]


@pytest.mark.parametrize(("mask", "message"), [(np.ones((4, 5), dtype=bool), "fixed"),  # names the segmenter
                                               (np.ones((4, 6), dtype=np.uint8), "bool")])  # refused by Segment
def test_segment_rejects_masks_not_bool_at_input_size(mask, message):
    with pytest.raises(ValueError, match=message):
        Fixed([(mask, None)]).segment(noise(4, 6))


# --- Superpixels ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_superpixels_tile_a_photo_within_n_segments(method):
    photo = data.astronaut()
    segmentation = load_segmenter("superpixels", method=method, n_segments=12).segment(photo)
    assert 1 < len(segmentation) <= 12
    assert_tiles(segmentation, photo.shape[:2])
    assert {(s.source, s.label, s.score) for s in segmentation} == {("superpixels", None, None)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(37, 23), (23, 37)])
def test_superpixels_masks_at_odd_input_size_through_a_smaller_work_size(method, shape):
    segmentation = Superpixels(method, n_segments=6, work_size=9).segment(halves(*shape))
    assert 1 < len(segmentation) <= 6
    assert_tiles(segmentation, shape)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("image", [noise(1, 1), np.full((10, 7, 3), 90, dtype=np.uint8)], ids=["1x1", "flat"])
def test_superpixels_of_a_single_pixel_or_flat_image_is_one_segment(method, image):
    (only,) = Superpixels(method).segment(image)
    assert only.mask.shape == image.shape[:2] and only.mask.all() and only.source == "superpixels"


@pytest.mark.parametrize("method", METHODS)
def test_superpixels_merge_by_colour_down_to_n_segments(method):
    """Quickshift and felzenszwalb cut noisy halves into many pieces; merging must not cross the colour edge."""
    left = np.zeros((40, 60), dtype=bool)
    left[:, :30] = True
    masks = [s.mask for s in Superpixels(method, n_segments=2).segment(halves(40, 60))]
    assert len(masks) == 2
    assert any(np.array_equal(m, left) for m in masks) and any(np.array_equal(m, ~left) for m in masks)


def test_superpixels_reject_unknown_method():
    with pytest.raises(ValueError, match="slic"):
        Superpixels("watershed")


# --- torchvision Mask R-CNN ----------------------------------------------------------------------------------

def _no_download(*args, **kwargs):
    raise AssertionError("a random-weight model must not download anything")


@pytest.fixture(scope="module")
def torchvision_segmenter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("torchvision.models._api.load_state_dict_from_url", _no_download)
        torch.manual_seed(0)
        return load_segmenter("torchvision", pretrained=False, score_threshold=0.0, min_size=64, max_size=96,
                              max_segments=6, proposals=50)


def test_torchvision_random_weights_give_labelled_input_size_masks(torchvision_segmenter):
    segmentation = torchvision_segmenter.segment(noise(37, 23))
    assert isinstance(torchvision_segmenter, TorchvisionMaskRCNN) and 1 <= len(segmentation) <= 6
    assert all(s.mask.dtype == np.bool_ and s.mask.shape == (37, 23) for s in segmentation)
    assert {s.label for s in segmentation} <= set(WEIGHTS.meta["categories"][1:])  # never "__background__"
    scores = [s.score for s in segmentation]
    assert scores == sorted(scores, reverse=True) and {s.source for s in segmentation} == {"torchvision"}
    assert torchvision_segmenter.describe() == "torchvision Mask R-CNN R50-FPN v2 (random weights)"
    assert torchvision_segmenter.network.rpn.post_nms_top_n() == 50  # the box head sees only these proposals


def test_torchvision_runs_channels_last_with_the_same_masks(torchvision_segmenter):
    """The convolutions' weights are stored channels-last (faster on CPU), and the masks are those of the same
    network in the default layout."""
    conv = torchvision_segmenter.network.backbone.body.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    image = noise(37, 23)
    default = copy.deepcopy(torchvision_segmenter)
    default.network.to(memory_format=torch.contiguous_format)
    expected, found = default.segment(image), torchvision_segmenter.segment(image)
    assert len(found) == len(expected) >= 1
    assert all(np.mean(a.mask == b.mask) > 0.99 and a.label == b.label for a, b in zip(found, expected))


def test_torchvision_mask_threshold_applies(torchvision_segmenter, monkeypatch):
    monkeypatch.setattr(torchvision_segmenter, "mask_threshold", 1.0)  # mask probabilities never exceed 1
    assert torchvision_segmenter.segment(noise(37, 23)) == []


def test_torchvision_download_failure_names_the_file_and_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(ModelUnavailableError) as error:
        TorchvisionMaskRCNN(pretrained=True)
    message = str(error.value)
    assert WEIGHTS.url in message and torch.hub.get_dir() in message and "name resolution" in message


# --- Detectron2 ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detectron2():
    return pytest.importorskip("detectron2", reason=NO_DETECTRON2)


def tiny_detectron2(model="panoptic", overrides=(), weights="", **options):
    """A small-input Detectron2 segmenter, random weights ("") unless told, every detection kept."""
    torch.manual_seed(0)
    return load_segmenter("detectron2" if model == "panoptic" else "detectron2-maskrcnn", weights=weights,
                          score_threshold=0.0, cfg_overrides=TINY_DETECTRON2 + list(overrides), **options)


@pytest.fixture(scope="module")
def panoptic(detectron2):
    return tiny_detectron2()


def test_detectron2_panoptic_gives_disjoint_things_and_stuff(panoptic):
    from detectron2.data import MetadataCatalog

    metadata = MetadataCatalog.get(panoptic.cfg.DATASETS.TEST[0])
    segmentation = panoptic.segment(noise(37, 23))
    assert all(s.mask.dtype == np.bool_ and s.mask.shape == (37, 23) for s in segmentation)
    assert np.sum([s.mask for s in segmentation], axis=0).max() == 1  # panoptic regions never overlap
    things = [s for s in segmentation if s.score is not None]
    stuff = [s for s in segmentation if s.score is None]
    assert things and stuff and segmentation == things + stuff
    assert {s.label for s in things} <= set(metadata.thing_classes)
    assert {s.label for s in stuff} <= set(metadata.stuff_classes[1:])  # class 0 is the "things" placeholder
    assert panoptic.describe() == "detectron2 panoptic FPN R50 (random weights)"


def test_detectron2_maskrcnn_gives_scored_thing_masks(detectron2):
    from detectron2.data import MetadataCatalog

    segmenter = tiny_detectron2("maskrcnn", max_segments=5)
    segmentation = segmenter.segment(noise(37, 23))
    assert 1 <= len(segmentation) <= 5
    assert all(s.mask.dtype == np.bool_ and s.mask.shape == (37, 23) for s in segmentation)
    assert {s.label for s in segmentation} <= set(MetadataCatalog.get("coco_2017_val").thing_classes)
    scores = [s.score for s in segmentation]
    assert None not in scores and scores == sorted(scores, reverse=True)
    assert segmenter.describe() == "detectron2 Mask R-CNN R50-FPN (random weights)"


@pytest.mark.parametrize("channel_order", ["BGR", "RGB"])
def test_detectron2_receives_the_colour_order_its_config_names(detectron2, monkeypatch, channel_order):
    segmenter = tiny_detectron2("maskrcnn", ["INPUT.FORMAT", channel_order])
    received = []
    network = segmenter.network
    monkeypatch.setattr(segmenter, "network", lambda inputs: received.extend(inputs) or network(inputs))
    red = np.zeros((20, 30, 3), dtype=np.uint8)
    red[..., 0] = 255
    segmenter.segment(red)
    (batch,) = received
    assert (batch["height"], batch["width"]) == (20, 30) and batch["image"].shape[1:] == (64, 96)
    image = batch["image"]
    red_channel = channel_order.index("R")
    assert (image[red_channel] == 255).all()
    assert (np.delete(image.numpy(), red_channel, axis=0) == 0).all()


def test_detectron2_config_lookup_does_not_need_pkg_resources(detectron2, monkeypatch):
    from ipag.segmenters.detectron2 import MODELS, config_file

    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # `import pkg_resources` now raises ImportError
    for name in [name for name in sys.modules if name.startswith("detectron2.model_zoo")]:
        monkeypatch.delitem(sys.modules, name)
    assert all(config_file(zoo.config).is_file() for zoo in MODELS.values())
    assert "detectron2.model_zoo" not in sys.modules


def test_detectron2_checkpoint_urls_match_its_model_zoo(detectron2, monkeypatch):
    from ipag.segmenters.detectron2 import MODELS

    monkeypatch.setitem(sys.modules, "pkg_resources", types.ModuleType("pkg_resources"))  # only imported there
    model_zoo = importlib.import_module("detectron2.model_zoo.model_zoo")
    assert all(zoo.url == model_zoo.get_checkpoint_url(zoo.config) for zoo in MODELS.values())


def test_detectron2_weights_that_cannot_be_fetched_raise_with_the_fix(detectron2, monkeypatch):
    from detectron2.utils.file_io import PathManager

    from ipag.segmenters.detectron2 import MODELS

    with pytest.raises(ModelUnavailableError, match="not a file"):
        tiny_detectron2(weights="/nonexistent/model_final.pkl")

    def offline(path, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    with pytest.raises(ModelUnavailableError) as error:
        tiny_detectron2(weights=None)
    assert MODELS["panoptic"].url in str(error.value) and "weights=" in str(error.value)


# --- Registry ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("installed", [True, False])
def test_auto_picks_detectron2_panoptic_iff_installed(monkeypatch, installed):
    def find_spec(name, package=None):
        assert name == "detectron2"
        return object() if installed else None

    built = []
    monkeypatch.setattr(detectron2_backend, "find_spec", find_spec)
    for segmenter in (Detectron2Segmenter, TorchvisionMaskRCNN):
        monkeypatch.setattr(segmenter, "load", classmethod(lambda cls, **options: built.append((cls.name, options))))
    load_segmenter("auto", device="cuda:1", score_threshold=0.3)
    assert built == [("detectron2" if installed else "torchvision", {"device": "cuda:1", "score_threshold": 0.3})]
    assert ("detectron2" in available_segmenters()) is installed
    assert ("detectron2-maskrcnn" in available_segmenters()) is installed


def test_unknown_segmenter_name_lists_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_segmenter("sam")
    assert "'sam'" in str(error.value) and all(name in str(error.value) for name in segmenters.segmenter_names())


@pytest.mark.parametrize("name", ["detectron2", "detectron2-maskrcnn"])
def test_missing_detectron2_error_names_the_fix(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # as if not installed, even where it is
    with pytest.raises(ModelUnavailableError) as error:
        load_segmenter(name)
    message = str(error.value)
    assert "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'" in message
    assert "detectron2.readthedocs.io" in message and "torchvision" in message
    assert "detectron2" not in available_segmenters()
