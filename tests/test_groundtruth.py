"""The shipped synthetic models and the ground-truth benchmark (python -m ipag evaluate-groundtruth)."""

import json
from itertools import combinations
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from ipag import Explainer, ModelUnavailableError, ui
from ipag.cli import build_parser, load_explainer, main
from ipag.evaluation.grounding import ablation
from ipag.evaluation.groundtruth import (EVALUATED, VARIANTS, quick_check, rank_agreement, sanity_summary, scene_record,
                                         true_caption)
from ipag.evaluation.localisation import region_record, region_summary
from ipag.maps import MAP_TYPES
from ipag.segmenters import Superpixels
from ipag.settings import DEFAULTS
from ipag.synthetic import generate_scene
from ipag.synthetic.check import caption_check
from ipag.synthetic.data import held_out_examples
from ipag.synthetic.models import FAMILIES, MODELS, SCENE_SUPERPIXELS, model_names
from ipag.synthetic.scenes import evidence_for, find_scene
from ipag.synthetic.train import zero_shot

#: Held-out scenes the shipped models are checked on (the benchmark's first 500 include them).
CHECK_SEEDS = range(50)
#: Thresholds a little under what the shipped models measured (models/README.md: each captioner's exact match 0.995,
#: colour words 1.000, shape words 0.998 on 200 held-out scenes; CLIP's zero-shot 0.877 among 30 pairs and 0.858
#: among 5 shapes; right object 0.995 with the default grounding, docs/evaluation.md#grounding): a retrained model,
#: or a grounding change, that does worse fails here.
MIN_EXACT_MATCH = 0.92
MIN_COLOUR_WORDS = 0.98
MIN_SHAPE_WORDS = 0.95
#: The synthetic LLaVA measured lower (exact match 0.945, shape words 0.974; three objects 0.919): its own floor.
MIN_CAPTIONS = {"llava": {"exact_match": 0.8, "colour_words": 0.97, "shape_words": 0.92}}
MIN_CLIP_PAIRS, MIN_CLIP_SHAPES = 0.82, 0.80
MIN_RIGHT_OBJECT = 0.95


@pytest.fixture(scope="module")
def synthetic():
    return Explainer.synthetic()


def test_the_shipped_models_fit_in_the_repository():
    files = [path for path in MODELS.rglob("*") if path.is_file()]
    assert files and sum(path.stat().st_size for path in files) <= 20e6


def test_the_shipped_models_caption_and_ground_held_out_scenes(synthetic):
    check = quick_check(synthetic, CHECK_SEEDS)
    assert check["exact_match"] >= MIN_EXACT_MATCH
    assert check["right_object"] >= MIN_RIGHT_OBJECT


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_shipped_captioner_knows_colours_and_shapes_at_every_object_count(family):
    report = caption_check(model_names(None, family)[0], CHECK_SEEDS)
    floor = MIN_CAPTIONS.get(family, {"exact_match": MIN_EXACT_MATCH, "colour_words": MIN_COLOUR_WORDS,
                                      "shape_words": MIN_SHAPE_WORDS})
    for counted in [report, *report["by_objects"].values()]:
        assert all(counted[key] >= floor[key] for key in floor), (family, counted)
    assert set(report["by_objects"]) == {"1", "2", "3"}


def test_the_shipped_clip_tells_colours_and_shapes_apart(synthetic):
    single = [example for example in held_out_examples(300) if example.count == 1]
    accuracy = zero_shot(synthetic.clip, single)
    assert accuracy["colour_shape_among_30"] >= MIN_CLIP_PAIRS
    assert accuracy["shape_among_5"] >= MIN_CLIP_SHAPES


def test_the_shipped_models_load_by_path_and_by_the_cli_flag(synthetic):
    scene = generate_scene(3)
    captioner, clip = model_names()
    loaded = Explainer.from_pretrained(captioner, clip, "superpixels", "cpu")
    assert loaded.caption(scene.image).text == synthetic.caption(scene.image).text
    args = build_parser().parse_args(["explain", "x.png", "--out", "out", "--synthetic"])
    assert load_explainer(args).caption(scene.image).text == synthetic.caption(scene.image).text


def test_the_scene_superpixels_tile_every_object_exactly():
    segmenter = Superpixels(**SCENE_SUPERPIXELS)
    for seed in range(30):
        scene = generate_scene(seed)
        segments = segmenter.segment(scene.image)
        for mask in scene.masks:
            assert any(np.array_equal(segment.mask, mask) for segment in segments)


def test_a_scene_record_scores_every_map_and_both_baselines(synthetic):
    record = scene_record(synthetic, 5, sanity=True)
    scene = generate_scene(5)
    content = [index for index, (_, mask) in enumerate(scene.evidence) if mask is not None]
    assert [word["word_index"] for word in record["words"]] == content
    expected = {f"gradcam:{EVALUATED.cam_method}", *(key for key, _ in VARIANTS), "random", "centre",
                *(map_type.key for map_type in MAP_TYPES if map_type.key != "gradcam")}
    for word in record["words"]:
        assert set(word["maps"]) == expected
        assert all(0 <= score <= 1 for scores in word["maps"].values() for score in scores.values())
        assert word["kind"] in ("colour", "shape") and 0 <= word["grounding"]["iou"] <= 1
        assert word["grounding"]["recall"] and 0 < word["grounding"]["area"] <= 1  # scene superpixels tile objects
        assert {"precision", "coverage", "probability", "decided", "best_iou"} <= set(word["grounding"])
    blocks = {item["blocks"] for item in record["sanity"]}
    assert blocks == set(range(1, len(synthetic.captioner.vision_layers) + 1))


def test_evaluate_groundtruth_prints_the_tables_and_writes_json_and_a_plot(tmp_path, capsys):
    out, figure = tmp_path / "groundtruth.json", tmp_path / "groundtruth.png"
    assert main(["evaluate-groundtruth", "--scenes", "3", "--sanity-scenes", "1", "--out", str(out),
                 "--plot", str(figure)]) == 0
    result = json.loads(out.read_text())
    assert list(result["captioners"]) == list(FAMILIES)  # every synthetic captioner by default
    for name, found in result["captioners"].items():
        summary = found["summary"]
        assert summary["scenes"] == len(found["captions"]) == 3 and summary["words"] == len(found["words"]) > 0
        assert {"random", "centre", "gradcam:GradCAM", "saliency:SmoothGrad", "occlusion"} <= set(summary["maps"])
        assert set(summary["captions"]["by_objects"]) <= {"1", "2", "3"}
        assert (tmp_path / f"groundtruth-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["captioners"] for row in result["agreement"]] == [list(pair) for pair in combinations(FAMILIES, 2)]
    printed = capsys.readouterr().out
    assert "pointing game" in printed and "Grounding" in printed and "Sanity check" in printed
    assert "Kendall" in printed and "shape words" in printed


def test_evaluate_groundtruth_runs_one_named_captioner(tmp_path):
    out = tmp_path / "groundtruth.json"
    assert main(["evaluate-groundtruth", "--synthetic", "--captioner", "vit-gpt2", "--scenes", "1",
                 "--sanity-scenes", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["captioners"]) == ["vit-gpt2"] and result["agreement"] == []
    assert "vit-gpt2" in result["captioners"]["vit-gpt2"]["settings"]["captioner"]


def test_rank_agreement_is_kendalls_tau_over_the_methods():
    def summary(pointing, mass):
        maps = {key: {"all": {"pointing": {"mean": p}, "mass": {"mean": m}}}
                for key, p, m in zip("ABCD", pointing, mass)}
        return {"maps": maps | {"random": {"all": {"pointing": {"mean": 0.9}, "mass": {"mean": 0.0}}}}}

    # Pointing: of the 6 pairs of methods, only (A, B) is ordered differently → τ = (5 − 1) / 6.
    first, second = summary([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]), summary([0.2, 0.1, 0.3, 0.4], [4, 3, 2, 1])
    (row,) = rank_agreement({"one": first, "two": second})
    assert row["captioners"] == ["one", "two"] and row["methods"] == 4  # the baseline is left out
    assert row["pointing"] == pytest.approx(4 / 6) and row["mass"] == pytest.approx(-1.0)
    assert rank_agreement({"one": first}) == []


def test_a_synthetic_captioner_is_chosen_by_name(synthetic):
    args = build_parser().parse_args(["explain", "x.png", "--out", "out", "--synthetic", "--captioner", "vit-gpt2"])
    other = load_explainer(args)
    assert "vit-gpt2" in other.captioner.describe() and other.clip.name == synthetic.clip.name
    with pytest.raises(ModelUnavailableError, match="choose one of blip, vit-gpt2"):
        Explainer.synthetic(captioner="llama")


def test_the_trained_captioner_uses_the_evidence_we_score(synthetic):
    """Removing a word's own object costs that word more log-probability than removing another object."""
    records = [scene_record(synthetic, seed) for seed in range(6)]
    own = [word["counterfactual"]["own"] for record in records for word in record["words"]]
    other = [word["counterfactual"]["other"] for record in records for word in record["words"]
             if word["counterfactual"]["other"] is not None]
    assert np.mean(own) < np.mean(other) - 1.0


def test_a_map_that_survives_randomisation_fails_the_sanity_check():
    records = [{"map": "kept", "blocks": blocks, "spearman": 0.9} for blocks in (1, 2, 3)]
    records += [{"map": "changed", "blocks": blocks, "spearman": rho} for blocks, rho in ((1, 0.8), (2, 0.3), (3, 0.05))]
    summary = sanity_summary(records)
    assert summary["kept"]["fails"] and not summary["changed"]["fails"]
    assert summary["changed"]["all_blocks"] == pytest.approx(0.05)


# ---------------------------------------------------------------- the page's ground-truth view

def test_the_page_recognises_a_scene_by_its_pixels_only():
    scene = generate_scene(13)
    assert find_scene(scene.image).seed == 13
    assert find_scene(scene.without(0).image) is None  # a different picture, although of the same seed
    assert find_scene(scene.image.resize((97, 97))) is None


def test_a_wrong_shape_word_is_scored_on_the_object_it_was_said_of():
    scene = generate_scene(2)  # "a green square, an orange cross and a red circle"
    words = "a green circle an orange cross and a red circle".split()
    assert evidence_for(scene, words, 2) is scene.masks[0]
    assert evidence_for(scene, words, 0) is None  # "a" names nothing
    assert evidence_for(scene, "a green square".split(), 1) is None  # another structure: no evidence


def test_the_page_outlines_the_true_object_and_scores_each_map(synthetic):
    scene = generate_scene(1)
    _, session, _ = ui.caption_image(synthetic, scene.image, EVALUATED, ui.Session(), precompute=False)
    assert session.scene is not None and session.scene.seed == 1
    colour = next(index for index, word in enumerate(session.caption.words) if word.text in ("blue", "purple"))
    *_, (session, rendered) = ui.explain(synthetic, session, colour, EVALUATED)
    table = rendered.trust
    on_object = next(i for i, header in enumerate(table.headers) if header.startswith("On the true object"))
    assert len(table.rows) == len(session.explanation.maps)  # one row per map, with its mass on the true object
    assert all(row[on_object].endswith("%") for row in table.rows)
    assert "true object" in rendered.label
    assert rendered.picture.size == (384, 384)  # the 96 px scene, enlarged by whole pixels to fill the view


# ---------------------------------------------------------------- grounding: the query, the fusion, the diagnosis

def test_a_clicked_word_is_grounded_in_its_phrase_and_typed_text_as_typed(synthetic):
    scene = generate_scene(2)  # "a green square, an orange cross and a red circle"
    caption = true_caption(synthetic, scene)
    settings = replace(EVALUATED, occlusion=False, integrated_gradients=False)
    clicked = synthetic.explain_many(scene.image, [1, 2, 5], caption, settings)
    assert [explanation.grounding.query for explanation in clicked] == ["green square", "green square", "orange cross"]
    assert synthetic.explain(scene.image, "green", caption, settings).grounding.query == "green"
    alone = synthetic.explain(scene.image, 1, caption, replace(settings, ground_phrase=False))
    assert alone.grounding.query == "green" and alone.grounding.prompt == "a photo of green"


@pytest.mark.parametrize("key", ["saliency", "gradcam", "input_x_gradient"])
def test_the_region_is_fused_with_the_map_the_settings_name(synthetic, key):
    scene = generate_scene(4)
    settings = replace(EVALUATED, occlusion=False, integrated_gradients=False, fusion_map=key, fusion_weight=15.0)
    explanation = synthetic.explain(scene.image, 1, true_caption(synthetic, scene), settings)
    values = explanation.maps[key].values
    for candidate in explanation.grounding.candidates:  # each candidate's share of that map's mass
        assert candidate.cam_mass == pytest.approx(values[candidate.mask].sum() / values.sum(), abs=1e-6)


def test_fusion_with_a_map_that_is_not_computed_says_so_and_grounds_anyway(synthetic):
    scene = generate_scene(4)
    settings = replace(DEFAULTS, verify=False, fusion_map="occlusion")  # occlusion is off by default
    explanation = synthetic.explain(scene.image, 1, true_caption(synthetic, scene), settings)
    assert explanation.grounding is not None and explanation.grounding.candidates[0].cam_mass is None
    assert any("'occlusion' map is not computed" in note for note in explanation.notes)


def test_a_region_record_tells_a_missing_proposal_from_a_wrong_choice():
    truth = np.zeros((10, 10), dtype=bool)
    truth[:4, :4] = True  # 16 pixels
    chosen = np.zeros((10, 10), dtype=bool)
    chosen[:4, :8] = True  # the object and as much background: precision ½, coverage 1, IoU ½
    grounding = SimpleNamespace(mask=chosen, query="red circle", label="segment", score=0.4, decided=True,
                                baseline_won=False)
    record = region_record(grounding, truth, [np.ones((10, 10), dtype=bool), chosen, truth])
    assert record["right"] and record["recall"] and record["best_iou"] == 1.0
    assert (record["precision"], record["coverage"], record["area"]) == (0.5, 1.0, 0.32)
    missing = region_record(grounding, truth, [np.ones((10, 10), dtype=bool)])  # only the whole image proposed
    assert not missing["recall"] and missing["best_iou"] == pytest.approx(0.16)
    summary = region_summary([record, missing | {"right": False}])
    assert summary["recall"]["mean"] == 0.5 and summary["right_given_recall"]["mean"] == 1.0


def test_evaluate_grounding_ranks_a_grid_and_runs_the_ablation(tmp_path, capsys):
    out = tmp_path / "grounding.json"
    assert main(["evaluate-grounding", "--scenes", "2", "--first-seed", "5000", "--grid", "fusion_weight=0,15",
                 "--grid", "region_view=crop", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert set(variants) == {"fusion_weight=0, region_view=crop", "fusion_weight=15, region_view=crop"}
    goals = [min(v["summary"][kind]["right_object"]["mean"] for kind in ("colour", "shape")) for v in variants.values()]
    assert goals == sorted(goals, reverse=True)  # best first
    assert variants["fusion_weight=0, region_view=crop"]["settings"] == {"fusion_weight": 0.0, "region_view": "crop"}
    assert result["scenes"] == 2 and "right|recall" in capsys.readouterr().out
    assert main(["evaluate-grounding", "--scenes", "1", "--grid", "no_such_setting=1"]) == 2
    assert set(ablation()) >= {"before (word, blur, CLIP alone)", "before + crop", "defaults", "defaults − fusion"}
