"""Evaluation: reference files, caption metrics on hand-checked pairs, CLIP scores, gender bias, and faithfulness
metrics on a planted case where the right answer is known."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Settings
from ipag.evaluation import (
    DatasetError,
    WordTarget,
    clip_score,
    clip_text_similarity,
    coco_metrics,
    collect_images,
    evaluate_faithfulness,
    gender_bias,
    gender_of,
    match_images,
    read_references,
    reference_gender,
    word_faithfulness,
)
from ipag.evaluation.captions import CLIPSCORE_WEIGHT, clip_metrics
from ipag.evaluation.faithfulness import auc, pixel_ranks
from ipag.evaluation.inputs import output_names, parse_words, select_queries
from ipag.evaluation.report import describe, format_table, summarize
from tests.helpers import expected_maps
from tests.fixtures.tiny_flickr import REFERENCES, write_tiny_flickr


# --- inputs ---------------------------------------------------------------------------------------------------

def test_flickr_captions_file_is_read_with_commas_quoted_or_not(tmp_path):
    _, captions = write_tiny_flickr(tmp_path)
    assert read_references(captions) == REFERENCES
    raw = tmp_path / "raw.txt"
    raw.write_text("\ufeffimage,caption\nx.jpg,a dog, running\n\nx.jpg,a dog .\ny.jpg,\"a cat, asleep\"\n")
    assert read_references(raw) == {"x.jpg": ["a dog, running", "a dog ."], "y.jpg": ["a cat, asleep"]}


@pytest.mark.parametrize("text, message", [
    ("file,text\nx.jpg,a dog\n", "header line 'image,caption'"),
    ("image,caption\nx.jpg\n", "line 2"),
    ("image,caption\n", "no reference captions"),
])
def test_bad_captions_files_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "captions.txt"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        read_references(path)


def test_coco_annotations_are_read(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 7, "file_name": "000007.jpg"}],
                                "annotations": [{"image_id": 7, "caption": "A dog. "},
                                                {"image_id": 7, "caption": "a puppy"}]}))
    assert read_references(path) == {"000007.jpg": ["A dog.", "a puppy"]}
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="COCO"):
        read_references(path)


def test_images_are_matched_to_references_and_limited(tmp_path):
    images, captions = write_tiny_flickr(tmp_path)
    found, missing = match_images(images, read_references(captions))
    assert list(found) == ["1000_man.jpg", "1001_woman.jpg", "1002_street.png"]
    assert missing == ["1003_missing.jpg"]
    assert list(match_images(images, read_references(captions), limit=1)[0]) == ["1000_man.jpg"]


def test_folders_give_their_images_and_name_what_they_ignore(tmp_path):
    images, _ = write_tiny_flickr(tmp_path)
    extra = tmp_path / "other" / "1000_man.png"
    extra.parent.mkdir()
    Image.new("RGB", (4, 4)).save(extra)
    found, ignored = collect_images([images, extra, images / "1000_man.jpg"])
    assert [p.name for p in found] == ["1000_man.jpg", "1001_woman.jpg", "1002_street.png", "1000_man.png"]
    assert [p.name for p in ignored] == ["readme.txt"]
    names = output_names(found)
    assert names[found[1]] == "1001_woman" and len(set(names.values())) == 4  # equal stems are told apart
    assert names[found[0]].startswith("1000_man-") and names == output_names(found)


def test_word_lists(caption):
    assert parse_words("all") is None
    assert parse_words(" dog, grass ,dog,") == ("dog", "grass")
    with pytest.raises(ValueError, match="--words"):
        parse_words(" , ")
    assert select_queries(caption, None) == list(range(len(caption.words)))
    assert select_queries(caption, ("dog",)) == ["dog"]


def test_summaries_and_tables():
    assert summarize([1.0, None, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert summarize([None])["n"] == 0 and describe(summarize([])) == "—"
    assert describe(summarize([0.5])) == "0.500 ± 0.000 (n=1)"
    table = format_table(["a", "bb"], [["xxx", "1"]]).splitlines()
    assert table == ["a    bb", "---  --", "xxx  1"]


# --- caption metrics ------------------------------------------------------------------------------------------

PAIRS = {  # image → (candidate, references)
    "same": ("Two dogs play in the grass.", ["two dogs play in the grass"]),
    "known": ("a man riding a horse", ["a man is riding a horse"]),
    "other": ("a red bus on a street", ["a cat sleeps on a bed"]),
}


@pytest.fixture(scope="module")
def coco():
    """One run of the COCO metrics over all pairs (METEOR's Java start-up takes seconds)."""
    return coco_metrics({k: refs for k, (_, refs) in PAIRS.items()}, {k: cand for k, (cand, _) in PAIRS.items()})


def test_identical_caption_gets_the_maximum_of_every_metric(coco):
    _, each = coco
    same = each["same"]  # identical after the PTB tokenizer's lower-casing and punctuation removal
    for n in range(1, 5):
        assert same[f"BLEU-{n}"] == pytest.approx(1.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0)
    assert same["METEOR"] > 0.99  # 1 minus METEOR's small fragmentation penalty for one chunk
    assert same["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's maximum (cosine 1, scaled by 10)
    for metric, value in same.items():
        assert value >= max(each["known"][metric], each["other"][metric]), metric


def test_known_pair_gets_the_hand_computed_bleu(coco):
    corpus, each = coco
    # 5 candidate words, all in the 6-word reference: precision 1, brevity penalty exp(1 - 6/5).
    assert each["known"]["BLEU-1"] == pytest.approx(math.exp(-0.2), abs=1e-6)
    # Bigrams: "a man", "riding a", "a horse" of 4 match ("man riding" does not).
    assert each["known"]["BLEU-2"] == pytest.approx(math.exp(-0.2) * math.sqrt(3 / 4), abs=1e-6)
    # "a" twice and "on" once of 6 words, equal lengths.
    assert each["other"]["BLEU-1"] == pytest.approx(0.5, abs=1e-6)
    assert 0 < each["other"]["METEOR"] < each["known"]["METEOR"] < each["same"]["METEOR"]
    assert set(corpus) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    for metric in ("ROUGE-L", "CIDEr"):  # BLEU and METEOR pool their statistics instead
        assert corpus[metric] == pytest.approx(np.mean([v[metric] for v in each.values()]))


def test_clip_scores_on_hand_made_embeddings():
    image = torch.tensor([1.0, 0.0])
    assert clip_score(image, torch.tensor([0.5, math.sqrt(0.75)])) == pytest.approx(0.5 * CLIPSCORE_WEIGHT)
    assert clip_score(image, torch.tensor([-0.3, math.sqrt(0.91)])) == 0.0  # negative cosines clip to 0
    assert clip_score(image, image) == pytest.approx(2.5)
    references = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert clip_text_similarity(image, references) == pytest.approx(0.5)  # mean over references


def test_clip_metrics_with_tiny_clip(explainer, photo):
    embeddings = {"a": explainer.clip.encode_images([photo])[0]}
    scores = clip_metrics(explainer.clip, embeddings, {"a": "a dog on grass"}, {"a": ["a dog on grass"]})["a"]
    assert scores["CLIP text similarity"] == pytest.approx(1.0, abs=1e-5)
    prefixed = explainer.clip.encode_text(["A photo depicts a dog on grass"])[0]
    assert scores["CLIPScore"] == pytest.approx(2.5 * max(float(embeddings["a"] @ prefixed), 0.0), abs=1e-5)


# --- gender bias ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, gender", [
    ("A woman walks her dog", "female"), ("a man's hat", "male"), ("Two boys play", "male"),
    ("a man and a woman", "mixed"), ("a person on a bench", "neutral"), ("a human in a manger", "neutral"),
])
def test_gender_of_reads_whole_words(text, gender):
    assert gender_of(text) == gender


def test_reference_gender_is_the_majority():
    assert reference_gender(REFERENCES["1000_man.jpg"]) == "male"
    assert reference_gender(REFERENCES["1001_woman.jpg"]) == "female"
    assert reference_gender(["a man", "a woman", "a dog"]) is None
    assert reference_gender(["a street"]) is None


def test_misclassification_rate_on_hand_made_captions():
    references = {"m1": ["a man"] * 3, "m2": ["a boy", "a boy", "a girl"], "f1": ["a woman", "a lady"],
                  "f2": ["a girl"], "n": ["a street"], "x": ["a man", "a woman"]}
    captions = {"m1": "a man surfing", "m2": "a girl running", "f1": "a person sitting", "f2": "a man and a woman",
                "n": "a woman on a street", "x": "a man"}
    bias = gender_bias(captions, references)
    assert bias["images_with_reference_gender"] == 4  # n and x have no reference majority
    assert (bias["correct"], bias["wrong"], bias["neutral"], bias["mixed"]) == (1, 1, 1, 1)
    assert bias["misclassification_rate"] == 0.25 and bias["neutral_rate"] == 0.25
    assert bias["male_called_female"] == 1 and bias["female_called_male"] == 0
    assert bias["misclassified_images"] == ["m2"]
    assert gender_bias({"n": "a man"}, references)["misclassification_rate"] is None


# --- faithfulness ---------------------------------------------------------------------------------------------

def planted(size=24):
    """An image whose "log p" is how intact one block of it is: the right map marks exactly that block."""
    rng = np.random.default_rng(3)
    pixels = torch.from_numpy(rng.standard_normal((1, 3, size, size)).astype(np.float32))
    rows, cols = slice(4, 12), slice(10, 18)

    def score(batch: torch.Tensor) -> torch.Tensor:
        return -((batch - pixels)[:, :, rows, cols] ** 2).mean(dim=(1, 2, 3))

    correct = np.zeros((size, size), dtype=np.float32)
    correct[rows, cols] = 1.0
    return score, pixels, {"correct": correct, "random": rng.random((size, size))}


def test_planted_region_ranks_the_correct_map_above_a_random_one():
    score, pixels, maps = planted()
    baseline = torch.zeros_like(pixels)
    results = word_faithfulness(score, pixels, baseline, maps, steps=10, road_percentiles=(20, 50, 80))
    right, random = results["correct"], results["random"]
    assert right["deletion_auc"] < random["deletion_auc"]
    assert right["insertion_auc"] > random["insertion_auc"]
    assert right["road"] > random["road"]
    # Both curves run between the intact image and the baseline, whatever the map.
    for result in results.values():
        assert result["deletion"][0] == pytest.approx(0.0) and result["insertion"][-1] == pytest.approx(0.0)
        assert result["deletion"][-1] == pytest.approx(float(score(baseline)[0]))
        assert result["deletion_auc"] == pytest.approx(auc(np.array(result["deletion"])))
    # The block is 64 of 576 pixels: the right map has destroyed it all after 2 of 10 steps.
    assert right["deletion"][2] == pytest.approx(right["deletion"][-1])


def test_ties_in_a_flat_map_are_broken_at_random():
    ranks = pixel_ranks(np.zeros((8, 8)), np.random.default_rng(0))
    assert sorted(ranks.ravel()) == list(range(64))
    assert not (ranks[:2] < 16).all()  # not simply the top rows first
    salient = np.zeros((8, 8))
    salient[5, 6] = 1.0
    assert pixel_ranks(salient, np.random.default_rng(0))[5, 6] == 0


def test_word_target_scores_a_batch_like_single_images(explainer, caption):
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    batch = torch.cat([explainer.captioner.preprocess(image) for image in images])
    word = caption.words[-1]
    batched = WordTarget(explainer.captioner, caption.token_ids, word.token_positions, batch_size=2)(batch)
    for i in range(3):
        single = explainer.captioner.token_logprobs(batch[i:i + 1], list(caption.token_ids))
        assert float(batched[i]) == pytest.approx(sum(single[p - 1] for p in word.token_positions), abs=1e-4)
    assert len(set(np.round(batched.numpy(), 5))) == 3  # the images really differ for the model


def test_evaluate_faithfulness_on_tiny_models(explainer, tmp_path):
    images, _ = write_tiny_flickr(tmp_path)
    broken = images / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    paths = [images / "1000_man.jpg", broken]
    result = evaluate_faithfulness(explainer, paths, settings=Settings(max_new_tokens=2), steps=4,
                                   road_percentiles=(50,))
    assert [failure["image"] for failure in result["failed"]] == [str(broken)]
    words = result["words"]
    assert words and all(record["image"] == str(paths[0]) for record in words)
    for record in words:
        assert set(record["maps"]) == expected_maps(explainer.captioner) | {"random"}
        # The unperturbed start of the deletion curve is the explained target itself.
        assert record["maps"]["gradcam"]["deletion"][0] == pytest.approx(record["word_logprob"], abs=1e-4)
        assert isinstance(record["region_says_word"], bool)
    summary = result["summary"]
    assert summary["maps"]["saliency"]["road"]["n"] == len(words)
    assert summary["xic_hit_rate"]["n"] == len(words)
    assert summary["xic_hit_rate"]["rate"] == sum(r["region_says_word"] for r in words) / len(words)
