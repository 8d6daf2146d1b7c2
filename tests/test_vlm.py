"""Vision-language models through the one adapter: tiny random models of each family, written by `save_pretrained`
and loaded back by path as a user's download would be."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig

from ipag import Explainer, ModelUnavailableError, Settings
from ipag.captioners import VlmCaptioner, load_captioner
from ipag.captioners.base import capture_output
from ipag.captioners.tiny_vlms import save_tiny
from ipag.captioners.vlm import DEFAULT_INSTRUCTION, FAMILIES, refuse_if_too_big, weight_count
from tests.helpers import assert_only_the_answer_is_clickable, expected_maps

CPU = torch.device("cpu")
#: Photo shapes (width, height): slightly wide, very wide, tall — so tile grids, aspects and token counts differ.
SHAPES = [(61, 47), (160, 40), (40, 130)]
#: The views a family's processor resamples from the whole canvas (the rest are crops or patches of it), by index.
RESAMPLED = {"llava_next": 0, "llava_onevision": 0, "idefics3": -1, "smolvlm": -1}


@pytest.fixture(scope="module", params=list(FAMILIES))
def folder(request, tmp_path_factory):
    # Seed 1: seed 0's random PaliGemma answers the test photo with blank "▁" tokens only, nothing to click.
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=1)


@pytest.fixture(scope="module")
def vlm(folder):
    return load_captioner(str(folder), CPU)


def textured(shape: tuple[int, int], seed: int = 1) -> Image.Image:
    """A random RGB photo of `shape` = (width, height). Seed 1: every tiny family writes words about both of the
    first two shapes (with seed 0, Gemma 3's answer to the 61 × 47 one holds none)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (shape[1], shape[0], 3), dtype=np.uint8))


def test_a_downloaded_folder_loads_as_its_family(vlm):
    assert isinstance(vlm, VlmCaptioner) and vlm.model.config.model_type in FAMILIES
    # The language model's attention probabilities are read; the vision tower's only where LeGrad can use them.
    config = vlm.model.config
    assert config.text_config._attn_implementation == "eager"
    assert config.vision_config._attn_implementation == ("sdpa" if vlm.canvas.no_vision_attention else "eager")


def test_captions_continue_the_prompt_and_only_the_answer_is_clickable(vlm, photo):
    explainer = Explainer(vlm, clip=None)
    caption = explainer.caption(photo)
    prompt = vlm.start_ids(vlm.preprocess(photo))
    assert_only_the_answer_is_clickable(vlm, caption, prompt)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_every_applicable_map_is_finite_at_the_photo_size(vlm, shape):
    photo = textured(shape)
    explainer = Explainer(vlm, clip=None)
    caption = explainer.caption(photo)
    settings = Settings(occlusion=True, integrated_gradients=True)
    explanation = explainer.explain(photo, 0, caption=caption, settings=settings)
    assert set(explanation.maps) == expected_maps(vlm, settings, clip=False)
    assert {"gradcam", "cross_attention", "relevancy", "saliency"} <= set(explanation.maps)
    for key, heatmap in explanation.maps.items():
        assert heatmap.values.shape == shape[::-1] and np.isfinite(heatmap.values).all(), key
        assert heatmap.values.max() == pytest.approx(1.0), key
    attention = explanation.maps["cross_attention"]
    assert "language model layer" in attention.layer
    assert set(explanation.unavailable_maps) == ({"legrad"} if vlm.canvas.no_vision_attention else set())


def test_a_free_query_is_asked_with_the_captions_own_prompt(vlm, photo):
    explainer = Explainer(vlm, clip=None)
    caption = explainer.caption(photo)
    explanation = explainer.explain(photo, "red bus", caption=caption)
    assert not explanation.in_caption and explanation.maps
    assert all(np.isfinite(heatmap.values).all() for heatmap in explanation.maps.values())


def test_generation_scores_each_token_as_teacher_forcing_does(vlm, photo):
    """Generation gets the same inputs as every teacher-forced pass (Qwen: the 3-D positions from its grid)."""
    pixel_values = vlm.preprocess(photo)
    token_ids, scores = vlm.generate_scored(pixel_values)
    start = vlm.answer_start(token_ids)
    forced = vlm.token_logprobs(pixel_values, token_ids)
    np.testing.assert_allclose(scores[start - 1:], forced[start - 1:], atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_canvas_becomes_what_the_processor_makes_of_it(vlm, shape):
    """The differentiable inputs made from the canvas equal the processor's for the squashed photo: exactly for crops
    and patches, up to its uint8 rounding for the views it resamples (thumbnails)."""
    photo = textured(shape)
    canvas = vlm.preprocess(photo)
    squashed = photo.resize((canvas.shape[-1], canvas.shape[-2]), Image.BICUBIC)
    expected = vlm.image_processor(images=squashed, return_tensors="pt")
    made = vlm.canvas.pixel_inputs(canvas)
    resampled = RESAMPLED.get(vlm.model.config.model_type)
    for key, value in made.items():
        want = expected[key]
        assert value.shape == want.shape, key
        if resampled is not None and key == "pixel_values" and value.shape[1] > 1:
            difference = (value[:, resampled] - want[:, resampled]).abs()
            assert difference.mean() < 0.02 and difference.max() < 0.2
            keep = [view for view in range(value.shape[1]) if view != resampled % value.shape[1]]
            value, want = value[:, keep], want[:, keep]
        assert torch.equal(value, want.to(value.dtype)), key


@pytest.mark.parametrize("shape", SHAPES)
def test_geometry_a_change_inside_a_box_of_the_photo_stays_inside_that_box_of_the_canvas(vlm, shape):
    """The photo is squashed onto the whole canvas (nothing cropped or padded), so a box keeps its fractional place:
    the maps, stretched back onto the photo, put each canvas pixel where it came from."""
    photo = Image.new("RGB", shape, "gray")
    changed = photo.copy()
    width, height = shape
    changed.paste((255, 0, 0), (width // 2, height // 2, 3 * width // 4, height))  # x in [0.5, 0.75), y in [0.5, 1)
    difference = (vlm.preprocess(changed) - vlm.preprocess(photo)).abs().sum(dim=(0, 1)).numpy()
    top, left, bottom, right = extent(difference > 1e-3)
    assert top >= 0.4 and left >= 0.4 and right <= 0.85 and bottom == 1.0


@pytest.fixture(scope="module")
def local(folder):
    """The family's tiny model with every vision block's attention output zeroed: each vision token then depends on
    its own patch only, so a token's gradient shows exactly which pixels it sees."""
    captioner = load_captioner(str(folder), CPU)
    for block in captioner.model.model.get_submodule(captioner.family.vision_blocks):
        attention = getattr(block, "self_attn", None) or block.attn
        projection = getattr(attention, "out_proj", None) or attention.proj
        torch.nn.init.zeros_(projection.weight)
        torch.nn.init.zeros_(projection.bias)
    return captioner


@pytest.mark.parametrize("shape", SHAPES)
def test_geometry_each_vision_token_is_placed_where_its_pixels_are(local, shape):
    """A value placed on one cell of the Grad-CAM grid (`vision_layout`) lands on the canvas pixels whose gradient
    reaches that cell's token."""
    canvas = local.preprocess(textured(shape)).requires_grad_(True)
    with capture_output(local.vision_layers[-1]) as captured:
        local._forward(canvas, torch.tensor([local.start_ids(canvas)]), None)
    grid = local.vision_grid(captured[0])
    rows, columns = grid.shape[-2:]
    layout = local.vision_layout(canvas, len(local.vision_layers) - 1, (rows, columns))
    for cell in sample(rows * columns):
        (gradient,) = torch.autograd.grad(grid[0, :, cell // columns, cell % columns].sum(), canvas,
                                          retain_graph=True)
        assert_placed_on_its_pixels(layout.place(one_hot(cell, rows * columns)), gradient, f"cell {cell}")


@pytest.mark.parametrize("shape", SHAPES)
def test_geometry_each_image_token_of_the_language_model_is_placed_where_its_pixels_are(local, shape):
    """A value placed on one image token of the prompt (`attention_layout`) lands on the canvas pixels whose gradient
    reaches that token's embedding; tokens without pixels (LLaVA-NeXT's row ends) have no place."""
    canvas = local.preprocess(textured(shape)).requires_grad_(True)
    ids = local.start_ids(canvas)
    inputs = local.model(**local.canvas.pixel_inputs(canvas), **local._inputs(torch.tensor([ids])),
                         output_hidden_states=True).hidden_states[0]
    layout = local.attention_layout(ids, len(ids), (1, 1))
    positions = [index for index, token in enumerate(ids) if token == local._image_token]
    for position in [positions[i] for i in sample(len(positions))]:
        (gradient,) = torch.autograd.grad(inputs[0, position].sum(), canvas, retain_graph=True)
        assert_placed_on_its_pixels(layout.place(one_hot(position, len(ids))), gradient, f"token {position}")


def test_the_prompt_follows_the_canvas(vlm):
    """Families whose image-token count depends on the photo make a prompt per canvas size, which the model accepts
    with that canvas (it checks its image tokens against the image's features); each answer starts after its own."""
    canvases = [vlm.preprocess(textured(shape)) for shape in SHAPES]
    prompts = [vlm.start_ids(canvas) for canvas in canvases]
    for canvas, prompt in zip(canvases, prompts):
        assert vlm.token_logprobs(canvas, prompt)
        assert vlm.answer_start(prompt + vlm.tokenize("a dog")) == len(prompt)
    sizes = {tuple(canvas.shape[-2:]) for canvas in canvases}
    assert len({tuple(prompt) for prompt in prompts}) == len(sizes)


def test_qwen_positions_are_the_models_3d_rotary_ones(tmp_path, photo):
    vlm = load_captioner(str(save_tiny("qwen2_5_vl", tmp_path, seed=1)), CPU)
    canvas = vlm.preprocess(photo)
    ids = torch.tensor([vlm.start_ids(canvas)])
    inputs = {**vlm.canvas.pixel_inputs(canvas), **vlm._inputs(ids)}
    positions, _ = vlm.model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"])
    assert not torch.equal(positions[1], positions[2])  # height and width positions differ over the image
    forced = vlm.model(**inputs).logits
    torch.testing.assert_close(forced, vlm.model(**inputs, position_ids=positions).logits)


def test_an_instruction_changes_the_prompt_not_the_answer_start(vlm):
    asked = vlm.start_ids(instruction="What does this picture show?")
    assert asked != vlm.start_ids()
    assert vlm.answer_start(asked + vlm.tokenize("a dog")) == len(asked)
    assert vlm.answer_start(vlm.tokenize("a dog")) == 0  # a query alone has no prompt


def test_tokens_without_a_prompt_made_here_have_no_image_layout(vlm):
    with pytest.raises(ValueError, match="do not begin with a prompt"):
        vlm.attention_layout(vlm.tokenize("a dog"), 2, (1, 1))


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
    pixels = vlm.preprocess(photo)  # the prompt's image tokens follow the photo's canvas
    assert list(prompt) == vlm.start_ids(pixels, "What does this show?") != vlm.start_ids(pixels)
    assert "▁what" in vlm.token_strings(list(prompt)) and "▁what" not in own.tokens[:vlm.answer_start(own.token_ids)]
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
    AutoConfig.for_model("mllama").save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError, match="'mllama' model.*llava, paligemma, gemma3, llava_next"):
        load_captioner(str(tmp_path), CPU)


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


# --- helpers --------------------------------------------------------------------------------------------------

def sample(count: int, most: int = 24) -> list[int]:
    """Up to `most` indices spread over range(count), first and last included."""
    return sorted(set(np.linspace(0, count - 1, min(count, most)).round().astype(int).tolist()))


def one_hot(index: int, count: int) -> np.ndarray:
    values = np.zeros(count, dtype=np.float32)
    values[index] = 1.0
    return values


def extent(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of a 2-D mask's true cells, as fractions of its height and width."""
    rows, columns = np.nonzero(mask)
    height, width = mask.shape
    return rows.min() / height, columns.min() / width, (rows.max() + 1) / height, (columns.max() + 1) / width


def assert_placed_on_its_pixels(placed: np.ndarray, gradient: torch.Tensor, what: str) -> None:
    """The placed value (a map over the canvas) covers where the token's pixel gradient is: its mass (at least 80%;
    all of it for crops and patches, most of it for a resampled thumbnail, whose kernel reaches past the cell) and
    its centre, and is not much larger than the pixels it sees. No gradient: no place either."""
    pixels = gradient[0].abs().sum(dim=0).numpy()
    if not pixels.any():
        assert not np.nan_to_num(placed).any(), f"{what} sees no pixel but has a place"
        return
    inside = np.asarray(Image.fromarray((placed > 0).astype(np.uint8)).resize(pixels.shape[::-1], Image.NEAREST),
                        dtype=bool)
    assert pixels[inside].sum() >= 0.8 * pixels.sum(), what
    rows, columns = np.indices(pixels.shape)
    centre = (round(float((rows * pixels).sum() / pixels.sum())), round(float((columns * pixels).sum() / pixels.sum())))
    assert inside[centre], what
    top, left, bottom, right = extent(pixels > 0)
    assert inside.sum() <= 1.5 * (bottom - top) * (right - left) * pixels.size, what


def test_a_template_without_the_instruction_takes_none():
    """The synthetic LLaVA's chat template leaves the text out (it was trained on captions alone): asking it
    something would change nothing, so it takes no instruction and its captions name none."""
    synthetic = Explainer.synthetic(captioner="llava", precision="float32")
    assert not synthetic.captioner.takes_instruction
    assert synthetic.resolve(Settings(instruction="What is shown?")).instruction is None
