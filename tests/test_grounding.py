"""Grounding: proposals, composites, CLIP scoring and the choice among regions, all offline.

Most choice tests inject fake scorers whose preferences are known (a colour detector, a detail detector),
so the assertions say which region must win and why; the tiny random CLIP covers the real model's plumbing.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import Normalize

from ipag.errors import ModelUnavailableError, QueryError
from ipag.grounding import ClipModel, Grounder, composite, noun_phrase
from ipag.grounding.clip import TINY_MODEL, recorded_attention
from ipag.grounding.composite import backdrop, crop_to, paste
from ipag.grounding.proposals import position, region_label
from ipag.images import BACKGROUND, normalize_map, resize_map
from ipag.maps import ClipRelevanceMap, MapContext
from ipag.segmenters import Segment, Superpixels

SIZE = 128
COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def box(top: int, left: int, side: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def paint(regions: dict[str, np.ndarray], size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A grey image with each colour painted where its mask is."""
    pixels = np.full((size[1], size[0], 3), BACKGROUND, dtype=np.uint8)
    for colour, mask in regions.items():
        pixels[mask] = COLOURS[colour.split()[0]]
    return Image.fromarray(pixels)


class ColourScorer:
    """A fake CLIP: an image's embedding is the fraction of its pixels of pure red, green and blue (plus a
    constant, so a bigger patch of the colour scores higher); a text's is the colours it names.

    "Pure" (channel excess over 90% of the range) makes blurred patches stop counting, as blurred-away
    objects stop matching for CLIP. Counts its calls.
    """

    logit_scale = 50.0

    def __init__(self) -> None:
        self.image_calls = 0
        self.images_seen = 0
        self.text_calls = 0

    def encode_images(self, images):
        self.image_calls += 1
        self.images_seen += len(images)
        rows = []
        for image in images:
            rgb = np.asarray(image, dtype=np.float64) / 255.0
            excess = [rgb[..., c] - np.delete(rgb, c, axis=2).max(axis=2) for c in range(3)]
            rows.append([float((e > 0.8).mean()) for e in excess] + [0.02])
        return torch.tensor(rows)

    def encode_text(self, texts):
        self.text_calls += 1
        return torch.tensor([[float(colour in text) for colour in COLOURS] + [0.0] for text in texts])


class DetailScorer:
    """A fake CLIP that likes fine detail whatever the text: blurring anything lowers the score."""

    logit_scale = 100.0

    def encode_images(self, images):
        rows = []
        for image in images:
            grey = np.asarray(image, dtype=np.float64).mean(axis=2) / 255.0
            detail = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
            rows.append([detail, 0.01])
        return torch.tensor(rows)

    def encode_text(self, texts):
        return torch.tensor([[1.0, 0.0]] * len(texts))


@pytest.fixture(scope="module")
def tiny_clip() -> ClipModel:
    return ClipModel.tiny(seed=0)


@pytest.fixture()
def scene():
    """Three small pure-colour squares on grey, each a labelled segment, plus a segment for the rest."""
    masks = {"red": box(10, 10, 14), "green": box(10, 90, 14), "blue": box(90, 50, 14)}
    rest = ~np.logical_or.reduce(list(masks.values()))
    segments = [Segment(mask, f"{colour} thing", 0.9, "test") for colour, mask in masks.items()]
    segments.append(Segment(rest, "background", None, "test"))
    return paint(masks), segments, masks


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


# ---------------------------------------------------------------- choosing a region

def test_the_planted_red_region_wins_for_red(scene):
    image, segments, masks = scene
    grounder = Grounder(ColourScorer())
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert not result.baseline_won
    assert np.array_equal(result.mask, masks["red"])
    assert result.label == "red thing" and result.source == "test"
    assert result.prompt == "a photo of red"
    assert result.similarity > result.image_similarity and result.clip_prefers_region
    assert result.candidates[0].members == (0,)


def test_different_queries_choose_different_regions(scene):
    image, segments, masks = scene
    grounder = Grounder(ColourScorer())
    prepared = grounder.prepare(image, segments)
    chosen = {colour: grounder.ground(prepared, colour).mask for colour in COLOURS}
    for colour, mask in chosen.items():
        assert np.array_equal(mask, masks[colour]), colour
    assert not np.array_equal(chosen["red"], chosen["blue"])


def test_the_whole_image_wins_when_no_region_scores_better():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    segments = [Segment(box(0, 0, 64), "left", 0.8, "test"), Segment(box(40, 40, 80), "right", 0.7, "test")]
    grounder = Grounder(DetailScorer())
    result = grounder.ground(grounder.prepare(image, segments), "anything")
    assert result.baseline_won
    assert result.mask.all() and result.mask.shape == (SIZE, SIZE)
    assert result.label == "whole image" and result.candidates[0].members == ()
    assert result.similarity == result.image_similarity and not result.clip_prefers_region


def test_probabilities_are_a_softmax_over_every_candidate_and_the_baseline(scene):
    image, segments, _ = scene
    scorer = ColourScorer()
    grounder = Grounder(scorer, top_k=None)
    prepared = grounder.prepare(image, segments)
    result = grounder.ground(prepared, "green")
    probabilities = np.array([c.probability for c in result.candidates])
    similarities = np.array([c.similarity for c in result.candidates])
    assert len(result.candidates) == len(prepared.proposals)
    assert sum(c.label == "whole image" for c in result.candidates) == 1
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-9)
    # No clipping, no ties merged: exactly the softmax of logit_scale · cosine, sorted best first.
    np.testing.assert_allclose(probabilities, softmax(scorer.logit_scale * similarities), rtol=1e-9)
    assert np.all(np.diff(probabilities) <= 0)
    assert result.score == probabilities[0]


def test_top_k_limits_the_candidates_reported(scene):
    image, segments, _ = scene
    grounder = Grounder(ColourScorer(), top_k=2)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert len(result.candidates) == 2
    assert result.candidates[0].probability >= result.candidates[1].probability


def test_a_union_of_one_class_wins_for_a_plural_word():
    apples = {"red 1": box(10, 10, 14), "red 2": box(80, 90, 14)}
    image = paint({**apples, "blue": box(60, 10, 20)})
    segments = [Segment(mask, "apple", 0.9, "test") for mask in apples.values()]
    segments.append(Segment(box(60, 10, 20), "plate", 0.95, "test"))
    grounder = Grounder(ColourScorer())
    result = grounder.ground(grounder.prepare(image, segments), "red apples")
    assert result.label == "apple ×2" and result.candidates[0].members == (0, 1)
    assert np.array_equal(result.mask, apples["red 1"] | apples["red 2"])


def test_ground_reuses_the_embeddings_computed_by_prepare(scene):
    image, segments, _ = scene
    scorer = ColourScorer()
    grounder = Grounder(scorer)
    prepared = grounder.prepare(image, segments)
    assert scorer.image_calls == 1 and scorer.images_seen == len(prepared.proposals)
    for query in ("red", "blue", "green"):
        grounder.ground(prepared, query)
    assert scorer.image_calls == 1
    assert scorer.text_calls == 3


def test_unions_are_bounded_with_many_segments():
    rng = np.random.default_rng(2)
    segments = []
    for index in range(30):
        top, left = rng.integers(0, SIZE - 20, size=2)
        segments.append(Segment(box(top, left, int(rng.integers(5, 20))), ("cat", "dog", "car")[index % 3],
                                float(rng.random()), "test"))
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    scorer = ColourScorer()
    for max_unions in (0, 5, 16):
        prepared = Grounder(scorer, max_unions=max_unions).prepare(image, segments)
        unions = [p for p in prepared.proposals if len(p.members) > 1]
        assert len(prepared.proposals) <= 1 + len(segments) + max_unions
        assert len(unions) <= max_unions
    # Whole-class unions come first: what "cats" or "dogs" would name.
    assert {p.label for p in unions[:3]} == {"cat ×10", "dog ×10", "car ×10"}
    assert all(len(p.members) == 2 for p in unions[3:])


def test_duplicate_and_whole_image_segments_are_not_proposed_twice(scene):
    image, segments, masks = scene
    full = Segment(np.ones((SIZE, SIZE), dtype=bool), "everything", 0.5, "test")
    copy = Segment(masks["red"].copy(), "red again", 0.5, "test")
    prepared = Grounder(ColourScorer()).prepare(image, segments + [full, copy])
    labels = [p.label for p in prepared.proposals]
    assert "everything" not in labels and "red again" not in labels
    assert labels[0] == "whole image"


def test_large_images_are_scored_at_a_working_size_and_answered_at_full_size():
    size = (1000, 700)
    image = paint({"red": box(100, 100, 150, size), "blue": box(400, 600, 150, size),
                   "green": box(50, 700, 150, size)}, size)
    pole = np.zeros((700, 1000), dtype=bool)
    pole[:, 500] = True  # one pixel wide: must survive shrinking to the working size
    flag = box(90, 90, 200, size)
    segments = [Segment(flag, "flag", 0.9, "test"), Segment(pole, "pole", 0.8, "test"),
                Segment(box(400, 600, 150, size), "box", 0.7, "test")]
    grounder = Grounder(ColourScorer(), stage2=True, top_k=None, work_size=SIZE)
    prepared = grounder.prepare(image, segments)
    assert prepared.pixels.shape == (round(700 * SIZE / 1000), SIZE, 3)
    assert "pole" in [p.label for p in prepared.proposals]
    red = grounder.ground(prepared, "red")
    assert red.label == "flag" and np.array_equal(red.mask, flag)  # exact outline at the input size
    parts = [c for c in red.candidates if c.refined]
    assert parts and all(c.mask.shape == (700, 1000) and not (c.mask & ~flag).any() for c in parts)
    assert np.array_equal(grounder.ground(prepared, "blue").mask, segments[2].mask)


# ---------------------------------------------------------------- stage II and fusion

@pytest.mark.parametrize("method", ["slic", "felzenszwalb", "quickshift"])
def test_stage_two_keeps_a_part_that_scores_higher(method):
    colours = {"red": box(20, 10, 24), "blue": box(20, 40, 24)}
    image = paint({**colours, "green": box(90, 90, 20)})
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[10:54, 0:74] = True  # red, blue and some grey: "red" matches only part of it
    segments = [Segment(region, "flag", 0.9, "test"), Segment(box(90, 90, 20), "grey", 0.9, "test")]
    plain = Grounder(ColourScorer()).ground(Grounder(ColourScorer()).prepare(image, segments), "red")
    grounder = Grounder(ColourScorer(), stage2=True, superpixels=method, top_k=None)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert plain.label == "flag" and not plain.refined
    assert result.refined and result.label.startswith("part of flag, upper left, ")
    assert not (result.mask & ~region).any()
    assert result.mask[colours["red"]].mean() > 0.5 and not result.mask[colours["blue"]].any()
    winner = next(c for c in result.candidates if c.members == (0,) and not c.refined)
    assert result.similarity > winner.similarity
    assert sum(c.probability for c in result.candidates) == pytest.approx(1.0)


def test_stage_two_keeps_the_winner_when_no_part_scores_higher():
    colours = {"red 1": box(20, 10, 20), "red 2": box(20, 50, 20)}
    image = paint({**colours, "green": box(90, 90, 20)})
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[10:50, 0:80] = True  # two red squares: any part has less red than the whole region
    segments = [Segment(region, "flags", 0.9, "test")]
    grounder = Grounder(ColourScorer(), stage2=True, top_k=None)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert result.label == "flags" and not result.refined
    parts = [c for c in result.candidates if c.refined]
    assert parts, "the parts were scored"
    assert all(part.similarity < result.similarity for part in parts)


def test_stage_two_parts_are_computed_once_per_winner(scene):
    image, segments, _ = scene
    scorer = ColourScorer()
    grounder = Grounder(scorer, stage2=True)
    prepared = grounder.prepare(image, segments)
    grounder.ground(prepared, "red")
    calls = scorer.image_calls
    grounder.ground(prepared, "red things")
    assert scorer.image_calls == calls


def test_fusion_weight_zero_is_clip_alone_and_a_large_weight_follows_the_cam(scene):
    image, segments, masks = scene
    cam = np.zeros((SIZE, SIZE), dtype=np.float32)
    cam[masks["blue"]] = 1.0
    clip_alone = Grounder(ColourScorer(), top_k=None)
    prepared = clip_alone.prepare(image, segments)
    reference = clip_alone.ground(prepared, "red")
    unweighted = Grounder(ColourScorer(), top_k=None, fusion_weight=0.0).ground(prepared, "red", cam=cam)
    assert np.array_equal(unweighted.mask, masks["red"])
    np.testing.assert_array_equal([c.probability for c in unweighted.candidates],
                                  [c.probability for c in reference.candidates])
    assert {c.label: c.cam_mass for c in unweighted.candidates}["blue thing"] == pytest.approx(1.0)
    assert {c.label: c.cam_mass for c in unweighted.candidates}["red thing"] == 0.0
    # The CAM agrees best with the blue square alone (J = 1), not with unions that contain it (J = ½).
    followed = Grounder(ColourScorer(), fusion_weight=100.0).ground(prepared, "red", cam=cam)
    assert np.array_equal(followed.mask, masks["blue"])
    assert followed.fusion_weight == 100.0 and followed.candidates[0].cam_mass == pytest.approx(1.0)
    assert reference.candidates[0].cam_mass is None


def test_an_empty_cam_changes_nothing_and_a_flat_one_favours_the_whole_image(scene):
    image, segments, _ = scene
    grounder = Grounder(ColourScorer(), top_k=None, fusion_weight=100.0)
    prepared = grounder.prepare(image, segments)
    plain = grounder.ground(prepared, "red")
    empty = grounder.ground(prepared, "red", cam=np.zeros((SIZE, SIZE), dtype=np.float32))
    np.testing.assert_array_equal([c.probability for c in empty.candidates],
                                  [c.probability for c in plain.candidates])
    assert not plain.baseline_won
    # With CLIP indifferent (a query naming no colour), a CAM that localises nothing picks the whole image.
    flat = grounder.ground(prepared, "grey", cam=np.full((SIZE, SIZE), 0.5, dtype=np.float32))
    assert set(c.similarity for c in flat.candidates) == {0.0}
    assert flat.baseline_won


def test_bad_inputs_are_refused_with_clear_errors(scene):
    image, segments, _ = scene
    grounder = Grounder(ColourScorer(), fusion_weight=1.0)
    prepared = grounder.prepare(image, segments)
    with pytest.raises(QueryError):
        grounder.ground(prepared, "   ")
    with pytest.raises(ValueError, match="2-D map"):
        grounder.ground(prepared, "red", cam=np.zeros((10, 10, 3)))
    with pytest.raises(ValueError, match="Segment 0"):
        grounder.prepare(image, [Segment(np.ones((5, 5), dtype=bool), "x", None, "test")])
    with pytest.raises(ValueError, match="template"):
        Grounder(ColourScorer(), template="a photo of")


def test_to_dict_is_json_ready_and_summarises_masks(scene):
    image, segments, _ = scene
    grounder = Grounder(ColourScorer())
    summary = grounder.ground(grounder.prepare(image, segments), "red").to_dict()
    restored = json.loads(json.dumps(summary))
    assert restored["label"] == "red thing" and restored["baseline_won"] is False
    assert restored["mask"] == {"area": pytest.approx(14 * 14 / SIZE**2), "bbox": [10, 10, 24, 24]}
    assert len(restored["candidates"]) == 5 and restored["candidates"][0]["members"] == [0]


# ---------------------------------------------------------------- composites

def test_composite_keeps_the_region_exact_and_blurs_the_rest():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    mask = np.zeros((90, 70), dtype=bool)
    mask[20:50, 10:40] = True
    out = np.asarray(composite(Image.fromarray(pixels), mask))
    assert np.array_equal(out[mask], pixels[mask])
    outside = ~mask
    assert np.abs(out[outside].astype(int) - pixels[outside]).mean() > 20
    # Blurred means smooth: neighbouring pixels outside differ far less than in the original.
    rough = np.abs(np.diff(pixels.astype(int), axis=1))[outside[:, 1:] & outside[:, :-1]].mean()
    smooth = np.abs(np.diff(out.astype(int), axis=1))[outside[:, 1:] & outside[:, :-1]].mean()
    assert smooth < rough / 4


def test_grey_composite_replaces_the_outside_by_neutral_grey():
    pixels = np.random.default_rng(4).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    mask = box(5, 5, 10, size=(40, 30))
    out = np.asarray(composite(Image.fromarray(pixels), mask, mode="grey"))
    assert np.array_equal(out[mask], pixels[mask])
    assert (out[~mask] == BACKGROUND).all()


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (2000, 1500)])
def test_composite_works_for_tiny_and_large_images(size):
    width, height = size
    pixels = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[: max(1, height // 2), : max(1, width // 2)] = True
    out = np.asarray(composite(Image.fromarray(pixels), mask))
    assert out.shape == pixels.shape and np.array_equal(out[mask], pixels[mask])
    if width > 100:  # the blur is relative to the image: a large one is blurred as much as a small one
        assert np.abs(np.diff(out[~mask].astype(int))).mean() < 5


def test_composite_refuses_a_mask_of_the_wrong_size():
    with pytest.raises(ValueError, match="shape"):
        composite(Image.new("RGB", (10, 10)), np.ones((5, 5), dtype=bool))


# ---------------------------------------------------------------- the tiny CLIP

def test_tiny_clip_encodes_normalised_image_dependent_embeddings(tiny_clip):
    rng = np.random.default_rng(6)
    images = [Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255)),
              Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))]
    embeddings = tiny_clip.encode_images(images)
    texts = tiny_clip.encode_text(["a photo of a dog", "a photo of a red car"])
    assert embeddings.shape == (3, 32) and texts.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    cosines = embeddings @ embeddings.T
    assert cosines[0, 1] < 0.95 and cosines[0, 2] < 0.95
    assert texts[0] @ texts[1] < 0.99
    assert isinstance(tiny_clip.logit_scale, float) and tiny_clip.logit_scale > 1
    assert not any(p.requires_grad for p in tiny_clip.model.parameters()) and not tiny_clip.model.training


def test_encode_images_batches_give_the_same_embeddings(tiny_clip):
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(5)]
    whole = tiny_clip.encode_images(images)
    batched = ClipModel(tiny_clip.model, tiny_clip.preprocess, tiny_clip.tokenizer, tiny_clip.device,
                        tiny_clip.name, batch_size=2).encode_images(images)
    torch.testing.assert_close(whole, batched, atol=1e-5, rtol=1e-5)


def test_clip_receives_the_image_colours_unchanged(tiny_clip):
    """The seed fed CLIP (img*255).astype(uint8) of a 0–255 image; here red must arrive as red."""
    normalize = next(t for t in tiny_clip.preprocess.transforms if isinstance(t, Normalize))
    mean, std = torch.tensor(normalize.mean)[:, None, None], torch.tensor(normalize.std)[:, None, None]
    received: list[torch.Tensor] = []
    handle = tiny_clip.model.visual.register_forward_pre_hook(lambda module, args: received.append(args[0]))
    red = Image.new("RGB", (50, 30), (255, 0, 0))
    try:
        tiny_clip.encode_images([red])
        Grounder(tiny_clip).prepare(red, [Segment(box(0, 0, 10, size=(50, 30)), "x", None, "test")])
        relevance_map(tiny_clip, red, "red")
    finally:
        handle.remove()
    assert len(received) == 3
    for pixels in received:
        colours = pixels.detach() * std + mean
        assert colours.shape[1:] == (3, 32, 32)
        torch.testing.assert_close(colours[:, 0], torch.ones_like(colours[:, 0]), atol=2e-3, rtol=0)
        torch.testing.assert_close(colours[:, 1:], torch.zeros_like(colours[:, 1:]), atol=2e-3, rtol=0)


def relevance_map(clip: ClipModel, image: Image.Image, text: str) -> np.ndarray:
    """CLIP relevance as the explainer computes it (the map type, `text` as the whole prompt), at the image size."""
    return ClipRelevanceMap("{}").attribute(MapContext(image.size, image=image, text=text, clip=clip)).values


def test_relevance_map_has_the_image_size_and_range(tiny_clip):
    image = Image.fromarray(np.random.default_rng(8).integers(0, 256, (23, 37, 3), dtype=np.uint8))
    relevance = relevance_map(tiny_clip, image, "a photo of a cat")
    assert relevance.shape == (23, 37) and relevance.dtype == np.float32
    assert np.isfinite(relevance).all() and relevance.min() >= 0 and relevance.max() == pytest.approx(1.0)
    assert relevance.std() > 0.01  # a real map, not a constant
    other = relevance_map(tiny_clip, image, "a red car on a street")
    assert not np.allclose(relevance, other), "the map depends on the text"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_clip.model.modules())


def test_relevance_hooks_are_removed_even_when_it_fails(tiny_clip):
    def fail(module, args, output):
        raise RuntimeError("boom")

    handle = tiny_clip.model.visual.ln_post.register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            relevance_map(tiny_clip, Image.new("RGB", (8, 8)), "x")
    finally:
        handle.remove()
    assert not any(m._forward_hooks for m in tiny_clip.model.modules())


def test_recorded_attention_reproduces_the_model_and_records_probabilities(tiny_clip):
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    expected = tiny_clip.encode_images([image])
    with torch.no_grad(), recorded_attention(tiny_clip.model.visual) as probabilities:
        embedding = tiny_clip.model.encode_image(tiny_clip.pixels([image]), normalize=True)
    torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=1e-5)
    assert len(probabilities) == 2  # one per vision block
    assert probabilities[0].shape == (1, 4, 17, 17)  # heads × (CLS + 4×4 patches)²
    torch.testing.assert_close(probabilities[1].sum(-1), torch.ones(1, 4, 17))


def test_recorded_attention_ignores_other_threads_using_the_model(tiny_clip):
    image = Image.new("RGB", (32, 32), (0, 128, 255))
    expected = tiny_clip.encode_images([image])
    seen: list[torch.Tensor] = []
    with recorded_attention(tiny_clip.model.visual) as probabilities:
        worker = threading.Thread(target=lambda: seen.append(tiny_clip.encode_images([image])))
        worker.start()
        worker.join()
    assert probabilities == []
    torch.testing.assert_close(seen[0], expected)


def test_relevance_map_matches_a_reference_from_the_native_attention_weights(tiny_clip):
    """The same rollout with gradients taken on nn.MultiheadAttention's own probabilities.

    Its `need_weights=True` output is a view of the tensor it multiplies the values by; gradients reach
    that tensor (the view's `_base`), which is how this reference gets them without our recomputation.
    """
    image = Image.fromarray(np.random.default_rng(11).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    text = "a photo of a cat"
    weights: list[torch.Tensor] = []

    def ask_for_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    def keep_weights(module, args, kwargs, output):
        weights.append(output[1])

    blocks = tiny_clip.model.visual.transformer.resblocks
    handles = [block.attn.register_forward_pre_hook(ask_for_weights, with_kwargs=True) for block in blocks]
    handles += [block.attn.register_forward_hook(keep_weights, with_kwargs=True) for block in blocks]
    try:
        with torch.enable_grad():
            pixels = tiny_clip.pixels([image]).requires_grad_(True)
            embedding = tiny_clip.model.encode_image(pixels, normalize=True)[0]
            used = [w._base for w in weights]
            gradients = torch.autograd.grad(embedding @ tiny_clip.encode_text([text])[0], used)
    finally:
        for handle in handles:
            handle.remove()
    relevance = torch.eye(17)
    for attention, gradient in zip(used, gradients):
        cam = (gradient.reshape(4, 17, 17) * attention.reshape(4, 17, 17)).clamp(min=0).mean(dim=0)
        relevance = relevance + cam @ relevance
    expected = normalize_map(resize_map(relevance[0, 1:].reshape(4, 4).detach().numpy(), image.size))
    np.testing.assert_allclose(relevance_map(tiny_clip, image, text), expected, atol=1e-5)


def test_relevance_map_of_a_single_pixel_image(tiny_clip):
    relevance = relevance_map(tiny_clip, Image.new("RGB", (1, 1), (10, 200, 30)), "green")
    assert relevance.shape == (1, 1) and 0.0 <= relevance[0, 0] <= 1.0


def test_unavailable_clip_raises_a_clear_error():
    with pytest.raises(ModelUnavailableError, match="no-such-clip") as error:
        ClipModel.from_pretrained("no-such-clip", "openai")
    assert isinstance(error.value, RuntimeError) and "Fix" in str(error.value)
    with pytest.raises(ModelUnavailableError, match="missing.pt"):
        ClipModel.from_pretrained("ViT-B-32", "/nonexistent/missing.pt")


def test_from_pretrained_loads_a_local_checkpoint(tiny_clip, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = ClipModel.from_pretrained(TINY_MODEL, str(path))
    image = Image.fromarray(np.random.default_rng(10).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    torch.testing.assert_close(loaded.encode_images([image]), tiny_clip.encode_images([image]))
    torch.testing.assert_close(loaded.encode_text(["a dog"]), tiny_clip.encode_text(["a dog"]))
    assert str(path) in loaded.name


# ---------------------------------------------------------------- degenerate images with the real model

def test_a_single_pixel_image_gets_the_whole_image(tiny_clip):
    image = Image.new("RGB", (1, 1), (200, 10, 10))
    grounder = Grounder(tiny_clip, stage2=True)
    result = grounder.ground(grounder.prepare(image, [Segment(np.ones((1, 1), bool), "dot", 0.9, "test")]),
                             "dot")
    assert result.baseline_won and result.mask.shape == (1, 1) and result.mask.all()
    assert result.score == pytest.approx(1.0)
    json.dumps(result.to_dict())


def test_a_flat_image_still_gives_a_valid_grounding(tiny_clip):
    image = Image.new("RGB", (61, 47), (90, 90, 90))
    segments = [Segment(box(5, 5, 20, size=(61, 47)), "square", 0.9, "test"),
                Segment(box(20, 30, 25, size=(61, 47)), None, None, "test")]
    grounder = Grounder(tiny_clip, stage2=True, top_k=None)
    result = grounder.ground(grounder.prepare(image, segments), "a square")
    assert result.mask.shape == (47, 61) and result.mask.dtype == bool
    probabilities = [c.probability for c in result.candidates]
    assert np.isfinite(probabilities).all() and sum(probabilities) == pytest.approx(1.0)
    assert {c.label for c in result.candidates} >= {"whole image", "square", "segment, lower right, 22% of the image"}


def test_relevance_hook_tolerates_other_threads_mid_registration():
    """torch may call a just-registered `with_kwargs` hook without kwargs from another thread's forward."""
    from torch import nn

    from ipag.grounding.clip import _explicit_attention

    hook = _explicit_attention([], owner=-1)  # "another thread" than every real one
    attention = nn.MultiheadAttention(8, 2)
    tokens = torch.zeros(3, 1, 8)
    output = attention(tokens, tokens, tokens)
    assert hook(attention, (tokens, tokens, tokens), output) is None
    assert hook(attention, (tokens, tokens, tokens), {}, output) is None


# ---------------------------------------------------------------- scoring that punishes background

def probability(result, label: str) -> float:
    return next(c.probability for c in result.candidates if c.label == label)


def test_a_crop_punishes_background_that_a_blurred_composite_does_not(scene):
    image, segments, masks = scene
    blur = Grounder(ColourScorer(), top_k=None)
    prepared = blur.prepare(image, segments)
    blurred = blur.ground(prepared, "red")
    cropped = Grounder(ColourScorer(), top_k=None, view="crop").ground(prepared, "red")
    # Blurred composites of the red square alone and with all the background hold the same red pixels: a tie.
    assert probability(blurred, "red thing") == pytest.approx(probability(blurred, "red thing + background"))
    # Cropped, the square fills its view and the background dilutes the other one.
    assert np.array_equal(cropped.mask, masks["red"])
    assert probability(cropped, "red thing") > 10 * probability(cropped, "red thing + background")
    assert not blurred.decided and cropped.decided  # the tie is a coin toss between two places; the crop is not


def test_the_area_penalty_costs_logits_in_proportion_to_the_area(scene):
    image, segments, masks = scene
    penalty = 4.0
    grounder = Grounder(ColourScorer(), top_k=None, area_penalty=penalty)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    # CLIP ties the two (see above): what separates them is the penalty on the background's share of the image.
    extra_area = (segments[3].mask | masks["red"]).mean() - masks["red"].mean()
    ratio = probability(result, "red thing") / probability(result, "red thing + background")
    assert np.log(ratio) == pytest.approx(penalty * extra_area)
    assert np.array_equal(result.mask, masks["red"])


def test_the_counterfactual_adds_the_drop_when_the_region_is_blurred_away(scene):
    image, segments, masks = scene
    scorer = ColourScorer()
    grounder = Grounder(scorer, top_k=None, counterfactual=True)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    plain = Grounder(scorer, top_k=None).ground(grounder.prepare(image, segments), "red")

    def cosine(picture: Image.Image) -> float:
        embedding, text = scorer.encode_images([picture])[0], scorer.encode_text(["a photo of red"])[0]
        return float(torch.nn.functional.cosine_similarity(embedding.double(), text.double(), dim=0))

    pixels, blurred = np.asarray(image), backdrop(image)
    logits = {}
    for label in ("red thing", "blue thing"):
        mask = masks[label.split()[0]]
        kept, removed = cosine(paste(pixels, blurred, mask)), cosine(paste(blurred, pixels, mask))
        logits[label] = scorer.logit_scale * (kept + cosine(image) - removed)
    expected = logits["red thing"] - logits["blue thing"]
    assert np.log(probability(result, "red thing") / probability(result, "blue thing")) == pytest.approx(expected)
    # Removing the red square loses the match, removing the blue one does not: red gains on blue.
    gained = np.log(probability(plain, "red thing") / probability(plain, "blue thing"))
    assert expected > gained + 1.0


def test_a_runner_up_that_is_mostly_the_winner_is_no_rival():
    red = box(10, 10, 14)
    sliver = red.copy()
    sliver[10:24, 24:26] = True  # the red square and a strip of grey beside it: IoU 0.875 with the square
    image = paint({"red": red, "blue": box(90, 90, 14)})
    segments = [Segment(red, "red thing", 0.9, "test"), Segment(sliver, "red and grey", 0.8, "test"),
                Segment(box(90, 90, 14), "blue thing", 0.7, "test")]
    grounder = Grounder(ColourScorer(), top_k=None, max_unions=0)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert probability(result, "red and grey") == pytest.approx(result.score)  # a tie, yet no doubt where red is
    assert result.rival.label != "red and grey" and result.decided
    assert result.to_dict()["decided"] and result.choose(1).rival is None


def test_two_equally_likely_places_leave_the_grounding_undecided():
    left, right = box(10, 10, 14), box(90, 90, 14)
    image = paint({"red": left, "red 2": right})
    segments = [Segment(left, "left thing", 0.9, "test"), Segment(right, "right thing", 0.8, "test")]
    grounder = Grounder(ColourScorer(), max_unions=0, view="crop")  # (blurred, the whole image holds both reds)
    result = grounder.ground(grounder.prepare(image, segments), "red")
    assert result.label == "left thing" and result.rival.label == "right thing"
    assert result.rival.probability == pytest.approx(result.score) and not result.decided


def test_views_must_be_known():
    with pytest.raises(ValueError, match="Unknown view"):
        Grounder(ColourScorer(), view="removed")


def test_a_crop_is_a_square_around_the_region_kept_inside_the_image():
    image = Image.new("RGB", (100, 60))
    mask = box(20, 40, 10, size=(100, 60))
    assert crop_to(image, mask).size == (13, 13)  # 10 px and 15% on each side, rounded up
    corner = box(0, 0, 10, size=(100, 60))
    assert crop_to(image, corner, margin=0.5).size == (20, 20)  # moved inside, not cut
    assert crop_to(image, np.ones((60, 100), dtype=bool)).size == (100, 60)  # wider than high: the image
    assert crop_to(image, np.zeros((60, 100), dtype=bool)).size == (100, 60)  # nothing to crop to


# ---------------------------------------------------------------- labels a person can read

def test_regions_are_labelled_by_class_or_by_place_and_size():
    upper_left = box(0, 0, 36)  # 8% of the image, centred in the upper left ninth
    lower_right = box(100, 100, 28)
    segments = [Segment(box(40, 40, 40), "dog", 0.9, "test"), Segment(upper_left, None, None, "test"),
                Segment(lower_right, None, None, "test"), Segment(box(0, 90, 10), "person", 0.8, "test"),
                Segment(box(90, 0, 10), "person", 0.7, "test")]
    assert region_label(segments, (0,), segments[0].mask) == "dog"
    assert region_label(segments, (3, 4), segments[3].mask | segments[4].mask) == "person ×2"
    assert region_label(segments, (1,), upper_left) == "segment, upper left, 8% of the image"
    assert region_label(segments, (1, 2), upper_left | lower_right) == "2 segments, centre, 13% of the image"
    assert region_label(segments, (0, 1), segments[0].mask | upper_left).startswith("dog + segment, ")
    assert region_label(segments, (0,), box(40, 40, 8), part=True) == "part of dog, centre, <1% of the image"


@pytest.mark.parametrize(("top", "left", "where"), [
    (0, 0, "upper left"), (0, 60, "top"), (0, 120, "upper right"), (60, 0, "left"), (60, 60, "centre"),
    (60, 120, "right"), (120, 0, "lower left"), (120, 60, "bottom"), (120, 120, "lower right")])
def test_a_region_is_placed_in_a_three_by_three_grid(top, left, where):
    assert position(box(top, left, 8)) == where


def test_the_page_grounding_uses_readable_labels_for_superpixels(scene):
    image, _, _ = scene
    grounder = Grounder(ColourScorer(), top_k=None)
    result = grounder.ground(grounder.prepare(image, Superpixels(n_segments=6).segment(image)), "red")
    assert all(c.label == "whole image" or "% of the image" in c.label for c in result.candidates)
    assert not any("region" in c.label for c in result.candidates)


# ---------------------------------------------------------------- the phrase a word is grounded in

def phrase(caption: str, word: str, occurrence: int = 1) -> str:
    spans = [match.span() for match in re.finditer(r"[\w'-]+", caption)]
    indices = [index for index, (start, end) in enumerate(spans) if caption[start:end] == word]
    return noun_phrase(caption, spans, indices[occurrence - 1])


@pytest.mark.parametrize(("caption", "word", "expected"), [
    ("a red circle, a blue square and a green triangle", "red", "red circle"),
    ("a red circle, a blue square and a green triangle", "square", "blue square"),
    ("a red circle, a blue square and a green triangle", "triangle", "green triangle"),
    ("a brown dog on the grass", "dog", "brown dog"),
    ("a brown dog on the grass", "grass", "grass"),
    ("two small brown dogs and a cat", "small", "two small brown dogs"),
    ("a man riding a horse on a beach", "man", "man"),
    ("a man riding a horse on a beach", "horse", "horse"),
    ("there is a cat sitting on a couch", "couch", "couch"),
    ("a tall building next to a parking lot", "building", "tall building"),
    ("a tall building next to a parking lot", "lot", "parking lot"),
    ("a painting of a woman", "painting", "painting"),
    ("a red, white and blue flag", "red", "red"),
    ("a black-and-white photo of a cat", "photo", "black-and-white photo"),
    ("a dog", "a", "a"),  # a function word is grounded as itself
    ("the man is riding", "riding", "riding"),
    ("pizza", "pizza", "pizza"),
])
def test_a_word_is_grounded_in_its_noun_phrase(caption, word, expected):
    assert phrase(caption, word) == expected


def test_the_phrase_keeps_the_caption_as_written_and_refuses_a_missing_word():
    caption = "A Red  Circle and a blue square"
    assert phrase(caption, "Circle") == "Red  Circle"
    with pytest.raises(IndexError):
        noun_phrase(caption, [(0, 1)], 3)
