"""Every captioner behind the one interface: captioning, word alignment, every map type, loading by config."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, GPT2Config, ViTConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel

from ipag import Explainer, ModelUnavailableError, Settings
from ipag.attribution import target_gradients
from ipag.captioners import (
    BlipCaptioner,
    ClipCapCaptioner,
    DecodeOptions,
    VitGpt2Captioner,
    known_captioners,
    load_captioner,
    tiny_captioner,
)
from ipag.captioners.clipcap import DEFAULT_CHECKPOINT
from ipag.maps import CrossAttentionMap, GradCAMMap, MapContext, SaliencyMap, map_titles
from ipag.target import Target
from tests.helpers import expected_maps

CPU = torch.device("cpu")
NAMES = ["blip-base", "vit-gpt2", "clipcap"]  # blip-large is the same class as blip-base


@pytest.fixture(scope="module", params=NAMES)
def captioner(request):
    return tiny_captioner(request.param, seed=0)


@pytest.fixture(scope="module")
def vit_gpt2():
    return VitGpt2Captioner.tiny(seed=0)


@pytest.fixture(scope="module")
def vit_gpt2_explainer(vit_gpt2):
    return Explainer(vit_gpt2, clip=None)


def test_friendly_names_and_their_tiny_stand_ins():
    assert known_captioners() == {"blip-base": "Salesforce/blip-image-captioning-base",
                                  "blip-large": "Salesforce/blip-image-captioning-large",
                                  "vit-gpt2": "nlpconnect/vit-gpt2-image-captioning",
                                  "clipcap": str(DEFAULT_CHECKPOINT)}
    assert isinstance(tiny_captioner("blip-base"), BlipCaptioner)
    assert isinstance(tiny_captioner("blip-large"), BlipCaptioner)
    assert isinstance(tiny_captioner("vit-gpt2"), VitGpt2Captioner)
    assert isinstance(tiny_captioner("clipcap"), ClipCapCaptioner)
    with pytest.raises(ValueError, match="Choose one of: blip-base, blip-large, vit-gpt2, clipcap"):
        tiny_captioner("gpt-4")


def test_each_captioner_captions_and_explains_every_map_type(captioner, photo):
    explainer = Explainer(captioner, clip=None)
    caption = explainer.caption(photo)
    assert caption.token_ids[0] == captioner.start_ids()[0]
    assert len(caption.words) >= 2
    for word in caption.words:  # spans and texts come from the captioner's pieces
        assert caption.text[word.span[0]:word.span[1]] == word.text and word.logprob < 0
    explanation = explainer.explain(photo, 1, caption=caption, settings=Settings(occlusion=True,
                                                                                integrated_gradients=True))
    settings = Settings(occlusion=True, integrated_gradients=True)
    assert set(explanation.maps) == expected_maps(captioner, settings, clip=False)  # every map this captioner has
    assert set(explanation.unavailable_maps) == set(map_titles()) - expected_maps(captioner, settings) - {
        "clip_relevance"}  # and for the others, why not (ClipCap: no cross-attention)
    for key, heatmap in explanation.maps.items():
        assert heatmap.values.shape == (47, 61) and heatmap.values.dtype == np.float32
        assert heatmap.values.min() >= 0 and heatmap.values.max() == pytest.approx(1.0)
        grids = {"occlusion": (15, 15)}  # its windows; pixel maps at the input's size, the others on the patch grid
        expected = grids.get(key, (64, 64) if heatmap.layer == "input pixels" else (8, 8))
        assert heatmap.raw.shape == expected, key
    assert explanation.word_logprob == pytest.approx(caption.words[1].logprob, abs=1e-5)


def test_each_captioner_gives_gradients_for_every_map_type(captioner, photo):
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=6))
    ((value, gradients),) = target_gradients(captioner, pixels, token_ids, [Target((1, 2))], -1, -1)
    assert value < 0
    assert gradients.pixels.shape == (1, 3, 64, 64)
    assert gradients.vision_activations.shape == gradients.vision_gradients.shape == (32, 8, 8)
    if captioner.num_decoder_layers:
        assert gradients.attention.shape == gradients.attention_gradients.shape == (4, 2, 65)  # heads, rows, keys
    else:
        assert gradients.attention is gradients.attention_gradients is gradients.attention_layer is None
    for gradient in (gradients.pixels, gradients.vision_gradients, gradients.attention_gradients):
        assert gradient is None or np.abs(gradient).max() > 1e-6  # every map's input is reached by the backward
    map_types = [GradCAMMap(), SaliencyMap()] + [CrossAttentionMap()] * (gradients.attention is not None)
    for map_type in map_types:
        heatmap = map_type.attribute(MapContext((61, 47), gradients=gradients))
        assert heatmap.values.shape == (47, 61) and np.isfinite(heatmap.values).all()


@pytest.mark.parametrize("image_seed", [0, 1])
@pytest.mark.parametrize("beams", [1, 3])
def test_generation_scores_equal_teacher_forcing(captioner, image_seed, beams):
    """A caption is scored from generation's own logits (no second forward), greedy or beam search (along the
    winning beam): they must be the teacher-forced log-probabilities."""
    rng = np.random.default_rng(image_seed)
    pixels = captioner.preprocess(Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)))
    ids, logprobs = captioner.generate_scored(pixels, DecodeOptions(beams, max_new_tokens=8, min_new_tokens=3))
    assert len(ids) >= 4 and len(logprobs) == len(ids) - 1
    assert logprobs == pytest.approx(captioner.token_logprobs(pixels, ids), abs=1e-4)


def test_vit_gpt2_depends_on_the_image(vit_gpt2, photo):
    """Guard against vacuous gradient tests (DESIGN.md: at initializer_range=0.02 nothing moves)."""
    pixels = vit_gpt2.preprocess(photo)
    token_ids = vit_gpt2.generate(pixels, DecodeOptions(max_new_tokens=5))
    changed = pixels.clone()
    changed[..., :16, :16] += 1.0
    before, after = vit_gpt2.token_logprobs(pixels, token_ids), vit_gpt2.token_logprobs(changed, token_ids)
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3


def test_vit_gpt2_cross_attention_is_eager_probabilities_in_the_graph(vit_gpt2, photo):
    pixels = vit_gpt2.preprocess(photo)
    token_ids = vit_gpt2.generate(pixels, DecodeOptions(max_new_tokens=5))
    decoded = vit_gpt2.forward_for_attribution(pixels, token_ids, vision_layer=0, cross_attention_layer=1)
    assert decoded.cross_attention.shape == (1, 4, len(token_ids), 65)  # CLS + 8×8 patches
    assert decoded.cross_attention.requires_grad and decoded.vision_output.requires_grad
    torch.testing.assert_close(decoded.cross_attention.sum(-1), torch.ones(1, 4, len(token_ids)))
    assert decoded.vision_layer == "encoder.layers.0" and decoded.grid == (8, 8)
    config = copy.deepcopy(vit_gpt2.model.config)  # _from_config would switch the shared config to SDPA
    sdpa = VisionEncoderDecoderModel._from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager attention"):
        VitGpt2Captioner(sdpa, vit_gpt2.image_processor, vit_gpt2.tokenizer, CPU, "sdpa")


def test_vit_gpt2_saliency_is_the_gradient_of_the_word_logprob(photo):
    captioner = VitGpt2Captioner.tiny(seed=0)
    captioner.model.double()
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=4))
    positions = (2, 3)
    ((value, gradients),) = target_gradients(captioner, pixels, token_ids, [Target(positions)], -1, -1)

    def word_logprob(values):
        logprobs = captioner.token_logprobs(values, token_ids)
        return sum(logprobs[p - 1] for p in positions)

    assert value == pytest.approx(word_logprob(pixels), abs=1e-9)
    direction = torch.from_numpy(np.random.default_rng(1).standard_normal(gradients.pixels.shape))
    eps = 1e-4
    finite = (word_logprob(pixels + eps * direction) - word_logprob(pixels - eps * direction)) / (2 * eps)
    assert abs(finite) > 1e-3
    assert float((gradients.pixels * direction.numpy()).sum()) == pytest.approx(finite, rel=1e-4)


def test_vit_gpt2_generation_strips_start_and_end(vit_gpt2, photo):
    pixels = vit_gpt2.preprocess(photo)
    end = vit_gpt2.model.config.decoder.eos_token_id
    for options in (DecodeOptions(max_new_tokens=3), DecodeOptions(num_beams=3, max_new_tokens=6)):
        ids = vit_gpt2.generate(pixels, options)
        assert ids[0] == vit_gpt2.start_ids()[0] == end  # GPT-2: bos = eos
        assert end not in ids[1:] and 1 <= len(ids) - 1 <= options.max_new_tokens


def test_gpt2_word_starts_continuations_and_punctuation(vit_gpt2, vit_gpt2_explainer):
    tokenizer = vit_gpt2.tokenizer
    ids = vit_gpt2.start_ids() + tokenizer("a man, riding skateboards. two dog's", add_special_tokens=False).input_ids
    tokens = vit_gpt2.token_strings(ids)
    assert tokens[1] == "a" and tokens[2] == "Ġman"  # the caption's first word has no leading space
    caption = vit_gpt2_explainer.caption_from_ids(vit_gpt2.preprocess(Image.new("RGB", (8, 8))), ids)
    assert caption.text == "a man, riding skateboards. two dog's"
    assert [w.text for w in caption.words] == ["a", "man", "riding", "skateboards", "two", "dog's"]
    skateboards, dogs = caption.words[3], caption.words[5]
    assert [tokens[p] for p in skateboards.token_positions] == ["Ġskateboard", "s"]
    assert tokens[dogs.token_positions[0]].startswith("Ġ") and len(dogs.token_positions) >= 2
    assert [p.kind for p in vit_gpt2.pieces(ids)][:4] == ["special", "start", "start", "punct"]


def test_gpt2_queries_match_words_inside_the_caption(vit_gpt2, vit_gpt2_explainer, photo):
    assert vit_gpt2.token_strings(vit_gpt2.tokenize("  riding ")) == ["Ġriding"]
    assert vit_gpt2.tokenize("   ") == []
    ids = vit_gpt2.start_ids() + vit_gpt2.tokenizer("a man riding a bus", add_special_tokens=False).input_ids
    caption = vit_gpt2_explainer.caption_from_ids(vit_gpt2.preprocess(photo), ids)
    explanation = vit_gpt2_explainer.explain(photo, "riding", caption=caption)
    assert explanation.in_caption and explanation.words == (caption.words[2],)
    free = vit_gpt2_explainer.explain(photo, "kite", caption=caption)
    assert not free.in_caption and free.context == "a picture of" and free.tokens == ("Ġkite",)


@pytest.mark.parametrize("make, expected", [(VitGpt2Captioner.tiny, VitGpt2Captioner),
                                            (BlipCaptioner.tiny, BlipCaptioner)])
def test_a_saved_tiny_model_loads_back_as_the_right_class(tmp_path, photo, make, expected):
    original = make(seed=1)
    original.save_pretrained(tmp_path)
    loaded = load_captioner(str(tmp_path), CPU)
    assert type(loaded) is expected and loaded.model_id == str(tmp_path)
    pixels = original.preprocess(photo)
    torch.testing.assert_close(loaded.preprocess(photo), pixels)
    ids = original.generate(pixels)
    assert loaded.generate(pixels) == ids
    assert loaded.token_logprobs(pixels, ids) == pytest.approx(original.token_logprobs(pixels, ids), abs=1e-5)
    ((_, gradients),) = target_gradients(loaded, pixels, ids, [Target((1,))], -1, -1)
    assert np.abs(gradients.attention_gradients).max() > 0  # cross-attention still returned after loading


def test_a_model_of_another_type_gets_a_clear_error(tmp_path):
    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match="'gpt2' model, which the playground cannot explain"):
        load_captioner(str(tmp_path), CPU)


def test_a_vision_encoder_decoder_without_gpt2_gets_a_clear_error(tmp_path):
    decoder = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         is_decoder=True, add_cross_attention=True)
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder).save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match="vit encoder and a bert decoder.*vit encoder with a gpt2"):
        load_captioner(str(tmp_path), CPU)


def test_a_missing_friendly_named_model_gives_a_clear_error():
    with pytest.raises(ModelUnavailableError) as info:
        load_captioner("vit-gpt2", CPU)
    message = str(info.value)
    assert "nlpconnect/vit-gpt2-image-captioning" in message and "Fix:" in message


def test_vit_gpt2_settings_pick_layers_by_index(vit_gpt2_explainer, photo):
    caption = vit_gpt2_explainer.caption(photo)
    explanation = vit_gpt2_explainer.explain(photo, 0, caption=caption,
                                             settings=Settings(vision_layer=0, cross_attention_layer=0))
    assert explanation.maps["gradcam"].layer == "encoder.layers.0"
    assert explanation.maps["cross_attention"].layer == "decoder layer 0 cross-attention"
    with pytest.raises(ValueError, match="out of range"):
        vit_gpt2_explainer.explain(photo, 0, caption=caption, settings=Settings(vision_layer=2))
