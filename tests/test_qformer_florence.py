"""BLIP-2, InstructBLIP and Florence-2 through their adapters (`captioners/qformer.py`, `captioners/florence2.py`):
tiny random models of each family, written by `save_pretrained` and loaded back by path as a user's download would
be."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Explainer, ModelUnavailableError, Settings
from ipag.attribution import target_gradients
from ipag.captioners import DecodeOptions, Florence2Captioner, QFormerCaptioner, load_captioner
from ipag.captioners.tiny_vlms import save_tiny
from ipag.maps import AttentionMap, MapContext, SaliencyMap
from ipag.target import Target
from tests.helpers import assert_only_the_answer_is_clickable, expected_maps

CPU = torch.device("cpu")
#: Each family and a seed whose random model writes words (not only punctuation) for the test photo.
KINDS = {"blip2": 1, "instructblip": 1, "florence2": 0}
CLASSES = {"blip2": QFormerCaptioner, "instructblip": QFormerCaptioner, "florence2": Florence2Captioner}
UNAVAILABLE = {"blip2": "relevancy", "instructblip": "relevancy", "florence2": "legrad"}
ALL_MAPS = Settings(occlusion=True, integrated_gradients=True)


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def captioner(kind, tmp_path_factory):
    return load_captioner(str(save_tiny(kind, tmp_path_factory.mktemp(kind), seed=KINDS[kind])), CPU)


@pytest.fixture(scope="module")
def explainer(captioner):
    return Explainer(captioner, clip=None)


@pytest.fixture(scope="module")
def caption(explainer, photo):
    return explainer.caption(photo)


def test_a_downloaded_folder_loads_as_its_family(captioner, kind):
    assert type(captioner) is CLASSES[kind]
    assert captioner.short_name == {"blip2": "BLIP-2", "instructblip": "InstructBLIP", "florence2": "Florence-2"}[kind]


def test_captions_continue_the_prompt_and_only_the_answer_is_clickable(captioner, caption):
    prompt = captioner.start_ids()
    assert_only_the_answer_is_clickable(captioner, caption, prompt)


def test_the_prompt_is_the_models_own(captioner, kind):
    """BLIP-2 captions from no text; InstructBLIP is asked the default instruction (its Q-Former reads it too);
    Florence-2's task token becomes the processor's text prompt, and the decoder starts with </s> and <s>."""
    strings = captioner.token_strings(captioner.start_ids())
    images = strings.count("<image>")
    assert strings[:images] == ["<image>"] * images and images == {"blip2": 8, "instructblip": 8, "florence2": 17}[kind]
    text = captioner.tokenizer.decode(captioner.start_ids()[images:], skip_special_tokens=True).strip()
    assert text == {"blip2": "", "instructblip": "describe this image in one sentence.",
                    "florence2": "what does the image describe?"}[kind]
    if kind == "florence2":
        assert strings[-3:] == ["</s>", "</s>", "<s>"]  # the prompt's end, then the decoder's start


def test_generation_scores_equal_teacher_forcing_on_the_answer(captioner):
    """A caption's scores come from generation's own logits: on the answer they must be the teacher-forced ones
    (the prompt's positions are given, not predicted)."""
    rng = np.random.default_rng(3)
    pixels = captioner.preprocess(Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)))
    for beams in (1, 3):
        ids, logprobs = captioner.generate_scored(pixels, DecodeOptions(beams, max_new_tokens=8, min_new_tokens=3))
        start = captioner.answer_start(ids)
        assert len(ids) - start >= 3
        assert logprobs[start - 1:] == pytest.approx(captioner.token_logprobs(pixels, ids)[start - 1:], abs=1e-4)


def test_every_applicable_map_is_finite_at_the_photo_size_and_the_others_say_why(captioner, explainer, caption, photo,
                                                                                 kind):
    explanation = explainer.explain(photo, 0, caption=caption, settings=ALL_MAPS)
    assert set(explanation.maps) == expected_maps(captioner, ALL_MAPS, clip=False)
    assert {"gradcam", "cross_attention", "attention", "saliency", "input_x_gradient", "occlusion",
            "integrated_gradients"} <= set(explanation.maps)
    for key, heatmap in explanation.maps.items():
        assert heatmap.values.shape == (47, 61) and np.isfinite(heatmap.values).all(), key
        assert heatmap.values.max() == pytest.approx(1.0), key
    assert UNAVAILABLE[kind] not in explanation.maps
    assert len(explanation.unavailable_maps[UNAVAILABLE[kind]]) > 40  # a sentence saying why, in the map's place
    assert explanation.maps["cross_attention"].layer == {"blip2": "Q-Former layer 1 cross-attention",
                                                         "instructblip": "Q-Former layer 1 cross-attention",
                                                         "florence2": "decoder layer 1 cross-attention"}[kind]


def test_the_model_depends_on_the_image(captioner, caption, photo):
    """Guard against vacuous gradient tests (DESIGN.md): a local change of the photo moves the words' scores."""
    pixels = captioner.preprocess(photo)
    changed = pixels.clone()
    changed[..., :16, :16] += 1.0
    before = np.array(captioner.token_logprobs(pixels, caption.token_ids))
    after = np.array(captioner.token_logprobs(changed, caption.token_ids))
    assert np.abs(before - after)[captioner.answer_start(caption.token_ids):].max() > 1e-3


def test_the_attention_to_the_image_is_the_words_own(captioner, caption, photo, kind):
    """The raw attention differs from word to word: BLIP-2 weighs the queries' cross-attention by how much each
    word reads each query in the language model; Florence-2's decoder rows are the words' (shifted by the prompt)."""
    pixels = captioner.preprocess(photo)
    targets = [Target(word.token_positions) for word in caption.words[:2]]
    results = list(target_gradients(captioner, pixels, caption.token_ids, targets, -1, -1))
    maps = [AttentionMap().attribute(MapContext((61, 47), gradients=gradients)).raw for _, gradients in results]
    assert not np.allclose(maps[0], maps[1])
    for target, (_, gradients) in zip(targets, results):
        if kind == "florence2":  # the decoder's rows that predict the word, not the whole sequence's
            encoder = captioner.answer_start(caption.token_ids) - 2  # the decoder's input starts with </s> <s>
            assert gradients.rows == tuple(row - encoder for row in target.rows) and gradients.row_weights is None
            assert gradients.attention.shape[1] == len(target.rows)
        else:  # every query's row, weighed by the word's attention to the query tokens
            queries = captioner.model.config.num_query_tokens
            assert gradients.attention.shape[1] == queries and gradients.row_weights.shape == (queries,)
            assert (gradients.row_weights >= 0).all() and 0 < gradients.row_weights.sum() <= len(target.rows)
        assert np.abs(gradients.attention_gradients).max() > 1e-6


def test_geometry_a_gradient_inside_a_box_of_the_photo_lands_inside_that_box(captioner, caption):
    """The photo is squashed onto the whole input: a box of the photo falls on the same fractional box of the input,
    and a pixel gradient that is non-zero only there is drawn back inside the box of the photo."""
    photo = Image.new("RGB", (120, 60), "gray")
    changed = photo.copy()
    box = (60, 30, 90, 60)  # x in [0.5, 0.75), y in [0.5, 1)
    changed.paste((255, 0, 0), box)
    inside = ((captioner.preprocess(changed) - captioner.preprocess(photo)).abs().sum(dim=(0, 1)) > 1e-3).numpy()
    height, width = inside.shape
    rows, cols = np.nonzero(inside)
    assert rows.min() >= 0.45 * height and cols.min() >= 0.45 * width and cols.max() <= 0.8 * width

    target = Target(caption.words[0].token_positions)
    ((_, gradients),) = target_gradients(captioner, captioner.preprocess(photo), caption.token_ids, [target], -1, -1)
    assert np.abs(gradients.pixels).max() > 1e-6
    box_of_input = np.zeros_like(inside)  # the box's fractional place on the input
    box_of_input[height // 2:, width // 2:width * 3 // 4] = True
    local = replace(gradients, pixels=gradients.pixels * box_of_input)  # non-zero only inside the box
    values = SaliencyMap().attribute(MapContext(photo.size, gradients=local)).values
    ys, xs = np.nonzero(values > 1e-3)
    x_slack, y_slack = 0.05 * photo.width, 0.05 * photo.height  # bicubic resampling there and back blurs the edges
    assert ys.min() >= box[1] - y_slack and xs.min() >= box[0] - x_slack and xs.max() <= box[2] + x_slack
    assert values[box[1]:box[3], box[0]:box[2]].sum() > 0.95 * values.sum()


def test_geometry_an_image_token_is_placed_where_it_looks(captioner, caption, kind):
    """The attention's layout puts each image token's value on the cell of the input that token was made from:
    BLIP-2's cross-attention keys are the ViT's tokens (CLS, then the patches: a change inside one patch changes
    only its token); Florence-2's image tokens are the mean of the last DaViT stage's cells, then the cells (a
    change of one cell changes only its token and the mean). Tokens without a place (CLS, the mean) are not drawn."""
    ids = list(caption.token_ids)
    pixels = captioner.preprocess(Image.new("RGB", (64, 64)))
    if kind == "florence2":
        tower, projector = captioner.model.model.vision_tower, captioner.model.model.multi_modal_projector
        features = tower(pixels).last_hidden_state
        changed = features.clone()
        changed[..., 2, 1] += 1.0  # the cell in row 2, column 1 of the last stage's 4 × 4 grid
        moved = np.nonzero(((projector(changed) - projector(features)).abs().sum(dim=-1)[0] > 1e-5).numpy())[0]
        assert moved.tolist() == [0, 1 + 2 * 4 + 1]  # the mean, and the cell's own token
        first = ids.index(captioner._image_token)
        keys, cell, placeless = first + 1 + 4 * 4, first + moved[1], first
    else:
        embeddings = captioner.model.vision_model.embeddings
        changed = pixels.clone()
        changed[..., 16:24, 8:16] += 1.0  # the patch in row 2, column 1 of the 8 × 8 grid (8-pixel patches)
        moved = np.nonzero(((embeddings(changed) - embeddings(pixels)).abs().sum(dim=-1)[0] > 1e-5).numpy())[0]
        assert moved.tolist() == [1 + 2 * 8 + 1]
        keys, cell, placeless = 1 + 8 * 8, moved[0], 0
    layout = captioner.attention_layout(ids, keys, (4, 4) if kind == "florence2" else (8, 8))
    placed = layout.place(np.eye(keys)[cell])
    assert placed[2, 1] == 1.0 and placed.sum() == 1.0
    assert not layout.place(np.eye(keys)[placeless]).any()


def test_an_instruction_changes_the_prompt_and_instructblips_q_former_reads_it(captioner, kind):
    instruction = "What does this picture show?"
    asked = captioner.start_ids(instruction=instruction)
    assert asked != captioner.start_ids()
    assert captioner.answer_start(asked + captioner.tokenize("a dog")) == len(asked)
    if kind == "instructblip":
        inputs = captioner._inputs(torch.tensor([asked + captioner.tokenize("a dog")]))
        assert inputs["qformer_input_ids"][0].tolist() == captioner.processor.qformer_tokenizer(instruction).input_ids


def test_grad_cam_takes_any_davit_stage(photo):
    """Florence-2's Grad-CAM is on a DaViT block's feature map: each stage has its own grid (128-pixel input,
    strides 4, 2, 2, 2)."""
    captioner = Florence2Captioner.tiny()
    explainer = Explainer(captioner, clip=None)
    caption = explainer.caption(photo)
    grids = [explainer.explain(photo, 0, caption=caption, settings=Settings(vision_layer=layer)).maps["gradcam"]
             .raw.shape for layer in range(len(captioner.vision_layers))]
    assert grids == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_a_blip2_with_an_encoder_decoder_language_model_is_refused_before_loading(tmp_path):
    from transformers import Blip2Config, T5Config

    Blip2Config(text_config=T5Config(d_model=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match=r"encoder–decoder language model \(t5\).*decoder-only"):
        load_captioner(str(tmp_path), CPU)


def test_an_unsupported_type_lists_these_families_among_the_supported(tmp_path):
    from transformers import GitConfig

    GitConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match=r"'git' model.*blip-2, instructblip, florence2"):
        load_captioner(str(tmp_path), CPU)


@pytest.mark.parametrize("kind", ["blip2", "florence2"])
def test_a_model_too_big_for_the_memory_is_refused_before_loading(kind, tmp_path, monkeypatch):
    monkeypatch.setattr("ipag.captioners.vlm.available_memory", lambda: 2**16)  # 64 KiB: less than the tiny weights
    with pytest.raises(ModelUnavailableError, match=r"needs about .* GiB.*Fix: run on a GPU"):
        load_captioner(str(save_tiny(kind, tmp_path)), CPU)
