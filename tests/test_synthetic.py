"""Generated scenes, the metrics scored on them, and training the synthetic models (a few steps only)."""

import numpy as np
import pytest
import torch

from ipag.evaluation.localisation import centre_prior, random_map, score_map
from ipag.synthetic import generate_scene
from ipag.synthetic.models import new_captioner, new_clip
from ipag.synthetic.scenes import COLOURS, FUNCTION_WORDS, GAP, SHAPES, SIZE, TRAINING_SEEDS_START
from ipag.synthetic.train import (
    caption_ids,
    clip_batch,
    clip_pixels,
    grounding_texts,
    grounding_views,
    matches,
    pixel_batch,
    train_captioner,
    train_clip,
    training_scenes,
)

SEEDS = range(200)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


# ---------------------------------------------------------------- the generator

def test_a_scene_is_a_function_of_its_seed():
    first, again, other = generate_scene(7), generate_scene(7), generate_scene(8)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image)) and first.caption == again.caption
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(first.evidence, again.evidence) if a is not None)
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))


def test_scenes_follow_the_rules(scenes):
    counts, sizes = set(), set()
    for scene in scenes:
        objects = scene.objects
        counts.add(len(objects))
        sizes |= {obj.box[2] - obj.box[0] + 1 for obj in objects}
        assert scene.image.size == (SIZE, SIZE) and scene.image.mode == "RGB"
        assert len({obj.colour for obj in objects}) == len({obj.shape for obj in objects}) == len(objects)
        lefts, rights = [obj.box[0] for obj in objects], [obj.box[2] for obj in objects]
        assert lefts[0] >= GAP and rights[-1] <= SIZE - 1 - GAP
        assert all(right + GAP < left for right, left in zip(rights, lefts[1:]))  # left to right, never overlapping
    assert counts == {1, 2, 3} and len(sizes) > 10
    named = {obj.colour for s in scenes for obj in s.objects}, {obj.shape for s in scenes for obj in s.objects}
    assert named == (set(COLOURS), set(SHAPES))


def test_the_caption_and_its_evidence(scenes):
    assert generate_scene(2).caption == "a green square, an orange cross and a red circle"
    for scene in scenes:
        words = [word for word, _ in scene.evidence]
        assert scene.caption.replace(",", "").split() == words
        for index, (word, mask) in enumerate(scene.evidence):
            owner = scene.object_of(index)
            if word in FUNCTION_WORDS:
                assert mask is None and owner is None
            else:
                assert word in (scene.objects[owner].colour, scene.objects[owner].shape)
                assert mask is scene.masks[owner]


def test_masks_are_exactly_the_pixels_painted_in_the_objects_colour(scenes):
    for scene in scenes:
        pixels = np.asarray(scene.image)
        for obj, mask in zip(scene.objects, scene.masks):
            assert mask.dtype == bool and mask.shape == (SIZE, SIZE) and mask.sum() > 150
            assert np.array_equal(np.all(pixels == obj.rgb, axis=-1), mask)  # no background pixel has its colour
        assert np.logical_or.reduce(scene.masks).sum() == sum(mask.sum() for mask in scene.masks)  # disjoint


def test_a_counterfactual_changes_only_the_removed_object(scenes):
    for scene in scenes[:40]:
        pixels = np.asarray(scene.image)
        for index, mask in enumerate(scene.masks):
            removed = scene.without(index)
            changed = np.any(np.asarray(removed.image) != pixels, axis=-1)
            assert np.array_equal(changed, mask)
            assert np.array_equal(np.asarray(removed.image)[mask], scene.background[mask])
            assert removed.objects == scene.objects[:index] + scene.objects[index + 1:]
    with pytest.raises(IndexError):
        scenes[0].without(len(scenes[0].objects))


def test_training_never_draws_a_held_out_seed():
    assert min(scene.seed for scene in training_scenes(0, 0, 4) + training_scenes(1, 0, 4)) >= TRAINING_SEEDS_START


# ---------------------------------------------------------------- metrics on maps with known answers

def test_a_map_equal_to_the_mask_scores_one_and_its_complement_zero():
    mask = np.zeros((20, 30), bool)
    mask[4:9, 10:18] = True
    assert score_map(mask.astype(float), mask) == {"pointing": 1.0, "mass": 1.0, "rank": 1.0, "auroc": 1.0}
    assert score_map((~mask).astype(float), mask) == {"pointing": 0.0, "mass": 0.0, "rank": 0.0, "auroc": 0.0}


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_a_constant_map_scores_chance(value):
    mask = np.zeros((20, 30), bool)
    mask[4:9, 10:18] = True
    scores = score_map(np.full(mask.shape, value), mask)
    assert scores["auroc"] == pytest.approx(0.5)
    for metric in ("pointing", "mass", "rank"):
        assert scores[metric] == pytest.approx(mask.mean())


def test_metrics_on_a_hand_checked_map():
    mask = np.array([[True, True, False, False]])
    heatmap = np.array([[0.9, 0.2, 0.5, 0.1]])
    scores = score_map(heatmap, mask)
    assert scores["pointing"] == 1.0
    assert scores["mass"] == pytest.approx(1.1 / 1.7)
    assert scores["rank"] == pytest.approx(0.5)  # top 2 pixels: 0.9 (in) and 0.5 (out)
    assert scores["auroc"] == pytest.approx(3 / 4)  # pairs (in, out): 0.9 beats both, 0.2 beats 0.1 only
    with pytest.raises(ValueError, match="shape"):
        score_map(heatmap, mask.T)
    with pytest.raises(ValueError, match="some"):
        score_map(heatmap, np.zeros_like(mask))


def test_baselines_score_about_chance_and_the_centre_prior_peaks_in_the_middle(scenes):
    rng = np.random.default_rng(0)
    masks = [mask for scene in scenes for mask in scene.masks]
    auroc = np.mean([score_map(random_map((SIZE, SIZE), (12, 12), rng), mask)["auroc"] for mask in masks])
    assert auroc == pytest.approx(0.5, abs=0.03)
    prior = centre_prior((SIZE, SIZE))
    assert np.unravel_index(prior.argmax(), prior.shape) in {(SIZE // 2 - 1, SIZE // 2 - 1), (SIZE // 2, SIZE // 2)}


# ---------------------------------------------------------------- training (a few steps: the loss falls)

def test_training_inputs_match_the_models_own_preprocessing(scenes):
    captioner, clip = new_captioner(), new_clip()
    images = [scene.image for scene in scenes[:3]]
    torch.testing.assert_close(pixel_batch(captioner, images), torch.cat([captioner.preprocess(i) for i in images]))
    torch.testing.assert_close(clip_pixels(clip, images), clip.pixels(images))


def test_training_targets_are_the_sequences_generation_produces(scenes):
    captioner = new_captioner()
    ids = caption_ids(captioner, [scene.caption for scene in scenes[:4]])
    for row, scene in zip(ids.tolist(), scenes):
        assert row[0] == captioner.start_ids()[0]
        end = row.index(captioner.tokenizer.sep_token_id)
        assert captioner.tokenizer.decode(row[1:end]) == scene.caption
        assert all(token == captioner.tokenizer.pad_token_id for token in row[end + 1:])
        assert captioner.tokenizer.unk_token_id not in row


def test_clip_learns_to_prefer_the_object_alone(scenes):
    scene = next(s for s in scenes if len(s.objects) == 3)
    views = grounding_views(scene, np.random.default_rng(0))
    texts = dict((text, query) for text, query in grounding_texts(scene))
    red_like = scene.objects[0]
    right = [index for index, (_, label) in enumerate(views) if matches(texts[red_like.colour], label)]
    assert len(right) == 1 and np.array_equal(views[right[0]][0], scene.masks[0])
    assert [matches(texts[scene.caption], label) for _, label in views].count(True) == 1
    images, prompts, positive = clip_batch([scene], np.random.default_rng(0), "a photo of {}")
    assert positive.shape == (len(prompts), len(images)) and positive.sum(dim=1).min() >= 1


def test_a_few_training_steps_lower_the_captioner_loss():
    _, log = train_captioner(steps=40, batch=8, lr=3e-3, progress=False)
    assert np.mean(log.losses[-5:]) < log.losses[0] - 1.0


def test_a_few_training_steps_lower_the_clip_loss():
    _, log = train_clip(steps=40, batch=4, lr=5e-3, progress=False)
    assert np.mean(log.losses[-5:]) < log.losses[0] - 0.1  # measured: 2.73 → 2.55 (the full run ends at 1.6)
