"""Generated scenes, the metrics scored on them, and training the synthetic models (a few steps only)."""

from dataclasses import fields

import numpy as np
import pytest
import torch

from ipag.evaluation.localisation import centre_prior, random_map, score_map
from ipag.synthetic import generate_scene
from ipag.synthetic.check import caption_report, caption_scores
from ipag.synthetic.data import LABELS, STREAMS, Example, example, training_examples, unit_pixels
from ipag.synthetic.models import (FAMILIES, blip_attention, clip_vision_attention, grammar_bpe, new_blip, new_clip,
                                   new_llava, sincos_positions)
from ipag.synthetic.scenes import COLOURS, FUNCTION_WORDS, GAP, SHAPES, SIZE, TRAINING_SEEDS_START
from ipag.synthetic.teacher import Distiller, Teacher, train_teacher
from ipag.synthetic.train import (
    caption_ids,
    captioner_loss,
    clip_loss,
    clip_pixels,
    descriptions,
    pixel_batch,
    train_captioner,
    train_clip,
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


def test_training_never_draws_a_held_out_seed_and_models_never_share_a_scene():
    captions = {stream: {e.caption + str(np.asarray(e.image).sum()) for step in (0, 1)
                         for e in training_examples(stream, step, 4)} for stream in STREAMS}
    assert all(len(found) == 8 for found in captions.values())
    assert len(set().union(*captions.values())) == 8 * len(STREAMS)
    first = TRAINING_SEEDS_START
    assert np.array_equal(np.asarray(training_examples("blip", 0, 1)[0].image), np.asarray(generate_scene(first).image))


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

def test_training_sees_pictures_captions_and_image_level_labels_only():
    """No mask, box or position of an object reaches a model: a step reads `Example`s, which hold none."""
    assert [f.name for f in fields(Example)] == ["image", "caption", "colours", "shapes", "count"]
    scene = generate_scene(2)
    found = example(2)
    assert found.caption == scene.caption and found.count == 3
    assert np.array_equal(np.asarray(found.image), np.asarray(scene.image))
    assert found.labels == [float(label in {"green", "orange", "red", "square", "cross", "circle", "3 objects"})
                            for label in LABELS]
    # Every loss runs on examples made by hand, with no scene behind them at all.
    by_hand = [Example(e.image, e.caption, e.colours, e.shapes, e.count) for e in training_examples("blip", 0, 3)]
    distiller = Distiller(Teacher(), 96)
    assert torch.isfinite(captioner_loss(new_blip(), by_hand, distiller))
    assert torch.isfinite(clip_loss(new_clip(), by_hand, Distiller(Teacher(), 96)))


def test_training_inputs_match_the_models_own_preprocessing(scenes):
    images = [scene.image for scene in scenes[:3]]
    for family in FAMILIES.values():
        captioner = family.build(0)
        torch.testing.assert_close(pixel_batch(captioner, images), torch.cat([captioner.preprocess(i) for i in images]))
    clip = new_clip()
    torch.testing.assert_close(clip_pixels(clip, images), clip.pixels(images))
    assert unit_pixels(images).min() >= -1 and unit_pixels(images).max() <= 1


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_targets_are_the_sequences_generation_produces(scenes, name):
    captioner = FAMILIES[name].build(0)
    captions = [scene.caption for scene in scenes[:4]]
    ids, written = caption_ids(captioner, captions)
    end = captioner.model.generation_config.eos_token_id
    start = captioner.start_ids()
    for row, mask, caption in zip(ids.tolist(), written.tolist(), captions):
        length = len(start) + sum(mask)
        assert mask == [False] * len(start) + [True] * sum(mask) + [False] * (len(row) - length)
        assert row[:len(start)] == start and row[length - 1] == end
        assert captioner._caption_end(row) == length - 1  # where generation stops reading
        assert captioner.tokenizer.decode(row[len(start):length - 1]).strip() == caption
        assert captioner.tokenizer.unk_token_id not in row[len(start):length - 1]


def test_the_gpt2_vocabulary_has_one_token_per_grammar_word():
    tokenizer = grammar_bpe()
    for word in (*FUNCTION_WORDS, *COLOURS, *SHAPES):
        assert len(tokenizer.tokenize(" " + word)) == 1 and len(tokenizer.tokenize(word)) == 1


@pytest.mark.parametrize("build, tower, attention", [
    (new_blip, lambda model: model.vision_model, blip_attention),
    (new_llava, lambda model: model.model.vision_tower, clip_vision_attention)])
def test_locality_init_makes_the_first_attention_local(build, tower, attention):
    """Mimetic initialisation: an untrained tower's patches attend mostly to their neighbours."""
    captioner = build()
    pixels = pixel_batch(captioner, [generate_scene(1).image])
    weights = tower(captioner.model)(pixel_values=pixels, output_attentions=True).attentions[0]
    weights = weights[0].mean(dim=0)[1:, 1:].numpy()
    side = int(np.sqrt(weights.shape[0]))
    rows, cols = np.divmod(np.arange(weights.shape[0]), side)
    distance = np.maximum(abs(rows[:, None] - rows[None]), abs(cols[:, None] - cols[None]))
    assert weights[distance <= 1].mean() > 3 * weights[distance >= 4].mean()  # measured: 5.6× (BLIP)
    positions = attention(tower(captioner.model)).positions
    torch.testing.assert_close(positions, sincos_positions(positions.shape))


def test_clip_texts_describe_a_scene_exactly():
    single, several = example(next(s for s in range(50) if example(s).count == 1)), example(2)
    (colour,), (shape,) = single.colours, single.shapes
    assert descriptions(single) == [single.caption, colour, shape, f"{colour} {shape}"]
    assert descriptions(several) == [several.caption]  # "red" alone does not describe three objects


def test_a_few_training_steps_lower_the_losses():
    teacher, log = train_teacher(steps=30, batch=8, lr=3e-3, progress=False)
    assert np.mean(log.losses[-5:]) < log.losses[0] - 0.05  # measured: 0.69 → 0.60
    for name in FAMILIES:
        _, log = train_captioner(name, steps=30, teacher=teacher, batch=8, lr=3e-3, progress=False)
        assert np.mean(log.losses[-5:]) < log.losses[0] - 1.0, name
    _, log = train_clip(steps=30, teacher=teacher, batch=8, lr=5e-3, progress=False)
    assert np.mean(log.losses[-5:]) < log.losses[0] - 0.1


def test_caption_scores_compare_words_in_place():
    truth = "a red circle and a blue square"
    assert caption_scores(truth, truth) == {"exact": True, "colour": [True, True], "shape": [True, True]}
    assert caption_scores(truth, "a red square and a blue square") == {"exact": False, "colour": [True, True],
                                                                        "shape": [False, True]}
    assert caption_scores(truth, "a red circle") == {"exact": False, "colour": [True, False], "shape": [True, False]}
    report = caption_report([{"truth": truth, "caption": truth, "objects": 2},
                             {"truth": "a red circle", "caption": "a red cross", "objects": 1}])
    assert report["exact_match"] == 0.5 and report["shape_words"] == pytest.approx(2 / 3)
    assert report["by_objects"]["1"] == {"scenes": 1, "exact_match": 0.0, "colour_words": 1.0, "shape_words": 0.0}


def test_training_is_deterministic_given_the_seed():
    teacher, _ = train_teacher(steps=2, batch=4, progress=False)
    again, _ = train_teacher(steps=2, batch=4, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), again.state_dict().values()))
    torch.rand(7)  # whatever ran before in the process must not matter
    runs = [train_captioner("vit-gpt2", steps=3, teacher=teacher, batch=4, seed=1, progress=False) for _ in range(2)]
    assert runs[0][1].losses == runs[1][1].losses
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0].model.state_dict().values(),
                                                 runs[1][0].model.state_dict().values()))
    clips = [train_clip(steps=2, teacher=teacher, batch=4, seed=1, progress=False)[1].losses for _ in range(2)]
    assert clips[0] == clips[1]
