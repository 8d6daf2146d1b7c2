"""Vision-language models through the one adapter: tiny random models of each family, written by `save_pretrained`
and loaded back by path as a user's download would be."""

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Explainer, ModelUnavailableError, Settings
from ipag.captioners import VlmCaptioner, load_captioner
from ipag.captioners.tiny_vlms import save_tiny
from ipag.captioners.vlm import DEFAULT_INSTRUCTION, FAMILIES, refuse_if_too_big, weight_count
from tests.helpers import expected_maps

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=list(FAMILIES))
def vlm(request, tmp_path_factory):
    # Seed 1: seed 0's random PaliGemma answers the test photo with blank "▁" tokens only, nothing to click.
    return load_captioner(str(save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=1)), CPU)


def test_a_downloaded_folder_loads_as_its_family(vlm):
    assert isinstance(vlm, VlmCaptioner) and vlm.model.config.model_type in FAMILIES


def test_captions_continue_the_prompt_and_only_the_answer_is_clickable(vlm, photo):
    explainer = Explainer(vlm, clip=None)
    caption = explainer.caption(photo)
    prompt = vlm.start_ids()
    assert list(caption.token_ids[:len(prompt)]) == prompt and vlm.answer_start(caption.token_ids) == len(prompt)
    assert caption.words, "a random tiny model writes a few words"
    answer = vlm.tokenizer.decode(caption.token_ids[len(prompt):])
    for word in caption.words:  # every clickable word lies in the answer, none in the prompt
        assert caption.text[word.span[0]:word.span[1]] == word.text and word.text in answer.lower()
        assert all(position >= len(prompt) for position in word.token_positions)


def test_every_applicable_map_is_finite_at_the_photo_size(vlm, photo):
    explainer = Explainer(vlm, clip=None)
    caption = explainer.caption(photo)
    settings = Settings(occlusion=True, integrated_gradients=True)
    explanation = explainer.explain(photo, 0, caption=caption, settings=settings)
    assert set(explanation.maps) == expected_maps(vlm, settings, clip=False)
    assert {"gradcam", "cross_attention", "relevancy", "saliency"} <= set(explanation.maps)
    for key, heatmap in explanation.maps.items():
        assert heatmap.values.shape == (47, 61) and np.isfinite(heatmap.values).all(), key
        assert heatmap.values.max() == pytest.approx(1.0), key
    attention = explanation.maps["cross_attention"]
    assert "language model layer" in attention.layer


def test_the_image_tokens_lie_on_one_grid_over_the_input(vlm, photo):
    ids = vlm.start_ids()
    images = ids.count(vlm._image_token)
    layout = vlm.attention_layout(ids, len(ids), (8, 8))
    assert layout.grid[0] * layout.grid[1] == images and ids[layout.first] == vlm._image_token
    assert all(token == vlm._image_token for token in ids[layout.first:layout.count])


def test_geometry_a_change_inside_a_box_of_the_photo_stays_inside_that_box_of_the_input(vlm):
    """The photo is squashed onto the whole input (nothing cropped), so a box keeps its fractional place: the maps,
    stretched back onto the photo, put each input pixel where it came from."""
    photo = Image.new("RGB", (120, 60), "gray")
    changed = photo.copy()
    changed.paste((255, 0, 0), (60, 30, 90, 60))  # right half's lower half: x in [0.5, 0.75), y in [0.5, 1)
    difference = (vlm.preprocess(changed) - vlm.preprocess(photo)).abs().sum(dim=(0, 1))
    height, width = difference.shape
    rows, cols = np.nonzero(difference.numpy() > 1e-3)
    assert rows.min() >= 0.45 * height and cols.min() >= 0.45 * width and cols.max() <= 0.8 * width


def test_an_instruction_changes_the_prompt_not_the_answer_start(vlm):
    asked = vlm.start_ids(instruction="What does this picture show?")
    assert asked != vlm.start_ids()
    assert vlm.answer_start(asked + vlm.tokenize("a dog")) == len(asked)
    assert vlm.answer_start(vlm.tokenize("a dog")) == 0  # a query alone has no prompt


def test_changing_the_instruction_recaptions_with_its_prompt_and_its_words_follow(vlm, photo, monkeypatch):
    """The instruction is part of the caption's key and of its prompt: another instruction captions again and
    changes the prompt's tokens (every later key holds them); asking the default by name is asking nothing."""
    explainer = Explainer(vlm, clip=None)
    generated = []
    original = vlm.generate_scored
    monkeypatch.setattr(vlm, "generate_scored", lambda *args, **kwargs: generated.append(1) or original(*args, **kwargs))
    own = explainer.caption(photo, Settings(max_new_tokens=4))
    asked = explainer.caption(photo, Settings(max_new_tokens=4, instruction="What does this show?"))
    assert len(generated) == 2 and own.instruction == vlm.default_instruction == DEFAULT_INSTRUCTION
    assert asked.instruction == "What does this show?" and asked.to_dict()["instruction"] == asked.instruction
    prompt = asked.token_ids[:vlm.answer_start(asked.token_ids)]
    assert list(prompt) == vlm.start_ids(instruction="What does this show?") != vlm.start_ids()
    assert "▁what" in vlm.token_strings(list(prompt)) and "▁what" not in own.tokens
    assert explainer.caption(photo, Settings(max_new_tokens=4, instruction=DEFAULT_INSTRUCTION)) is own
    assert explainer.caption(photo, Settings(max_new_tokens=4, instruction="What does this show?")) is asked
    assert len(generated) == 2  # both served from the cache
    # a word is explained on its caption's prompt, and says which instruction that was, whatever is asked now
    typed = explainer.explain(photo, "red car", asked, Settings(max_new_tokens=4))
    assert typed.token_ids[:len(prompt)] == prompt and typed.settings.instruction == "What does this show?"
    assert explainer.resolve(Settings()).instruction == DEFAULT_INSTRUCTION


def test_captioners_that_take_no_instruction_ignore_it(explainer, photo):
    assert not explainer.captioner.takes_instruction and explainer.captioner.default_instruction is None
    asked = explainer.caption(photo, Settings(instruction="What does this show?"))
    assert asked is explainer.caption(photo) and asked.instruction is None  # the same caption, from the cache
    assert explainer.resolve(Settings(instruction="What does this show?")).instruction is None


def test_an_unsupported_type_lists_the_supported_ones(tmp_path):
    folder = save_tiny("qwen2_vl", tmp_path)
    with pytest.raises(ModelUnavailableError, match="llava, paligemma, gemma3"):
        load_captioner(str(folder), CPU)


def test_a_model_too_big_for_the_memory_is_refused_before_loading(tmp_path):
    folder = save_tiny("llava", tmp_path)
    weights = weight_count(str(folder), local_files_only=True)
    assert 10_000 < weights < 1_000_000  # read from the safetensors header
    with pytest.raises(ModelUnavailableError, match=r"needs about .* GiB.*Fix: run on a GPU"):
        refuse_if_too_big("llava-hf/llava-1.5-7b-hf", 7_000_000_000, available=16 * 2**30)
    refuse_if_too_big(str(folder), weights, available=16 * 2**30)  # a small one loads


def test_the_synthetic_llava_saves_small_and_loads_as_synthetic_mode_names_it(tmp_path):
    from ipag.synthetic.models import FAMILIES as SYNTHETIC, model_names, new_llava

    new_llava().save_pretrained(tmp_path / SYNTHETIC["llava"].folder)
    size = sum(file.stat().st_size for file in (tmp_path / SYNTHETIC["llava"].folder).iterdir())
    assert size < 3e6  # measured: 1.9 MB
    captioner = load_captioner(model_names(tmp_path, "llava")[0], CPU)
    assert isinstance(captioner, VlmCaptioner)
    prompt = captioner.start_ids()
    assert prompt.count(captioner._image_token) == 144  # the scene's 12 × 12 patches, then the start of text
    assert captioner.token_strings(prompt[-1:]) == ["<|endoftext|>"]
