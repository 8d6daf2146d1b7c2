"""Occlusion maps: they find what the word depends on, batching changes nothing, and the cost is reported."""

import numpy as np
import pytest
import torch
from torch import nn

from ipag.captioners import Captioner, DecodeOptions, tiny_captioner
from ipag.maps import Occlusion
from ipag.target import Target

CPU = torch.device("cpu")
ROWS, COLUMNS = slice(16, 24), slice(40, 48)  # the planted square, in 64 × 64 model-input pixels
WORD = Target((1,))  # token_ids [start, word]: the word is position 1


class PlantedCaptioner(Captioner):
    """A stand-in whose one word gets likelier (`sign=1`) or less likely (`sign=-1`) the brighter one square is.

    It goes through the same code as a real captioner: `Occlusion` only calls `batch_token_logprobs`, which
    calls `_forward`; every other method is never reached.
    """

    name = "planted"

    def __init__(self, sign: float = 1.0) -> None:
        super().__init__(nn.Identity(), None, CPU, "planted")
        self.sign = sign
        self.batch_sizes: list[int] = []

    def _forward(self, pixel_values, token_ids, cross_attention_layer):
        self.batch_sizes.append(pixel_values.shape[0])
        brightness = pixel_values[:, :, ROWS, COLUMNS].mean(dim=(1, 2, 3))
        logits = torch.zeros(*token_ids.shape, 3)
        logits[:, :, 1] = self.sign * 4.0 * brightness[:, None]
        return logits, torch.zeros(*token_ids.shape[:1], 1, token_ids.shape[1], 65)

    @classmethod
    def load(cls, model_id, device):
        raise NotImplementedError

    vision_layers = []
    num_decoder_layers = 1

    def _generate_inputs(self, pixel_values):
        raise NotImplementedError

    def _caption_end(self, sequence):
        raise NotImplementedError

    def tokenize(self, text):
        raise NotImplementedError

    def start_ids(self):
        raise NotImplementedError

    def token_strings(self, token_ids):
        raise NotImplementedError

    def pieces(self, token_ids):
        raise NotImplementedError


@pytest.fixture()
def planted_pixels():
    generator = torch.Generator().manual_seed(0)
    pixels = 0.1 * torch.randn(1, 3, 64, 64, generator=generator)
    pixels[:, :, ROWS, COLUMNS] = 0.5  # bright enough to matter, not so bright that p(word) saturates
    return pixels


@pytest.mark.parametrize("baseline", ["blur", "mean"])
def test_the_planted_region_is_ranked_first(planted_pixels, baseline):
    (heatmap,), _ = Occlusion(baseline=baseline).attribute_targets(PlantedCaptioner(), planted_pixels, [0, 1], [WORD],
                                                           image_size=(96, 64))
    assert heatmap.raw.shape == (15, 15)  # 8 px windows every 4 px
    assert np.unravel_index(heatmap.raw.argmax(), heatmap.raw.shape) == (4, 10)  # the window at (16, 40)
    assert heatmap.raw.max() > 0.2  # a real drop in log p, not noise
    assert heatmap.values.shape == (64, 96) and heatmap.values.dtype == np.float32
    assert heatmap.values.min() == 0.0 and heatmap.values.max() == pytest.approx(1.0)
    top, left = np.unravel_index(heatmap.values.argmax(), heatmap.values.shape)
    assert 16 <= top < 24 and 60 <= left < 72  # the square, stretched to 96 px wide
    inside = heatmap.values[16:24, 60:72].sum() / heatmap.values.sum()
    assert inside > 0.4
    assert heatmap.method.startswith(f"occlusion ({baseline}") and heatmap.layer == "input pixels"


def test_evidence_against_the_word_is_negative_and_not_shown(planted_pixels):
    (heatmap,), _ = Occlusion(baseline="mean").attribute_targets(PlantedCaptioner(sign=-1.0), planted_pixels, [0, 1],
                                                         [WORD], image_size=(64, 64))
    assert np.unravel_index(heatmap.raw.argmin(), heatmap.raw.shape) == (4, 10) and heatmap.raw.min() < -0.5
    assert heatmap.values.max() == 0.0  # occluding anything only made the word likelier


@pytest.mark.parametrize("batch_size, passes", [(1, 226), (7, 33), (256, 1)])
def test_batching_changes_nothing_and_the_cost_is_reported(planted_pixels, batch_size, passes):
    captioner = PlantedCaptioner()
    (reference,), _ = Occlusion(batch_size=16).attribute_targets(captioner, planted_pixels, [0, 1], [WORD], (64, 64))
    captioner.batch_sizes.clear()
    (heatmap,), cost = Occlusion(batch_size=batch_size).attribute_targets(captioner, planted_pixels, [0, 1], [WORD],
                                                                  (64, 64))
    np.testing.assert_allclose(heatmap.raw, reference.raw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(heatmap.values, reference.values, rtol=1e-6, atol=1e-7)
    assert cost.images == 15 * 15 + 1 == sum(captioner.batch_sizes)  # every window, plus the clean image
    assert cost.forward_passes == passes == len(captioner.batch_sizes)
    assert max(captioner.batch_sizes) <= batch_size
    assert cost.seconds > 0
    assert cost.to_dict() == {"images": 226, "forward_passes": passes, "seconds": cost.seconds}


@pytest.mark.parametrize("name", ["blip-base", "vit-gpt2"])
def test_occlusion_matches_rescoring_each_occluded_image(name, photo):
    """Each window's value is log p(word | image) − log p(word | image with the window painted its mean colour)."""
    captioner = tiny_captioner(name, seed=0)
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=5))
    targets = [Target((1,)), Target((2, 3))]
    occlusion = Occlusion(patch=0.25, stride=1.0, baseline="mean", batch_size=5)
    heatmaps, cost = occlusion.attribute_targets(captioner, pixels, token_ids, targets, photo.size)
    assert cost.images == 17 and cost.forward_passes == 4
    clean = captioner.token_logprobs(pixels, token_ids)
    mean = pixels.mean(dim=(-2, -1), keepdim=True)
    for heatmap, target in zip(heatmaps, targets):
        assert heatmap.raw.shape == (4, 4) and heatmap.values.shape == (47, 61)
        for row, column in [(0, 0), (1, 2), (3, 3)]:
            occluded = pixels.clone()
            box = (..., slice(16 * row, 16 * row + 16), slice(16 * column, 16 * column + 16))
            occluded[box] = mean.expand_as(pixels)[box]
            logprobs = captioner.token_logprobs(occluded, token_ids)
            expected = sum(clean[p - 1] - logprobs[p - 1] for p in target.positions)
            assert heatmap.raw[row, column] == pytest.approx(expected, abs=1e-4)
        assert np.abs(heatmap.raw).max() > 1e-3  # the tiny model really depends on the image
    assert not np.allclose(heatmaps[0].raw, heatmaps[1].raw)


@pytest.mark.parametrize("settings, message", [
    (dict(patch=0.0), "patch"), (dict(patch=0.6), "patch"), (dict(stride=0.0), "stride"),
    (dict(baseline="grey"), "baseline"), (dict(batch_size=0), "batch size"),
])
def test_bad_settings_get_a_clear_message(settings, message):
    with pytest.raises(ValueError, match=message):
        Occlusion(**settings)


def test_bad_target_positions_get_a_clear_message(planted_pixels):
    with pytest.raises(ValueError, match="must lie in 1..1"):
        Occlusion().attribute_targets(PlantedCaptioner(), planted_pixels, [0, 1], [Target((2,))], (64, 64))
