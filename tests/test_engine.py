"""The engine: captioning, per-word attribution, and its agreement with independent computations."""

import numpy as np
import pytest
import torch
from PIL import Image

import ipag.word
from ipag import Explainer, ModelUnavailableError, QueryError, Settings
from ipag.attribution import target_gradients
from ipag.captioners import BlipCaptioner, DecodeOptions
from ipag.maps import CAM_METHODS
from ipag.precision import STAGES, Precision
from ipag.target import Target
from tests.helpers import expected_maps


def word_logprob(captioner, pixel_values, token_ids, positions) -> float:
    logprobs = captioner.token_logprobs(pixel_values, token_ids)
    return sum(logprobs[p - 1] for p in positions)


@pytest.fixture(scope="module")
def double_captioner():
    """The tiny BLIP in float64, so finite differences are accurate to many digits."""
    captioner = BlipCaptioner.tiny(seed=0)
    captioner.model.double()
    return captioner


def test_tiny_model_really_depends_on_the_image(explainer, photo, caption):
    """Guard against vacuous gradient tests (DESIGN.md: at initializer_range=0.02 nothing moves)."""
    captioner = explainer.captioner
    pixels = captioner.preprocess(photo)
    changed = pixels.clone()
    changed[..., :16, :16] += 1.0  # a local change: one corner
    word = caption.words[0]
    before = word_logprob(captioner, pixels, list(caption.token_ids), word.token_positions)
    after = word_logprob(captioner, changed, list(caption.token_ids), word.token_positions)
    assert abs(after - before) > 1e-3


def test_saliency_is_the_gradient_of_the_word_logprob(double_captioner, photo):
    captioner = double_captioner
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=6))
    target = Target((2, 3))  # a two-token target, like a word split into word pieces
    ((value, gradients),) = target_gradients(captioner, pixels, token_ids, [target], -1, -1)
    assert value == pytest.approx(word_logprob(captioner, pixels, token_ids, target.positions), abs=1e-9)
    gradient = gradients.pixels[0]
    assert np.abs(gradient).max() > 1e-4  # not vacuous

    rng = np.random.default_rng(1)
    direction = rng.standard_normal(gradient.shape)
    eps = 1e-4
    step = torch.from_numpy(direction)[None] * eps
    finite = (word_logprob(captioner, pixels + step, token_ids, target.positions)
              - word_logprob(captioner, pixels - step, token_ids, target.positions)) / (2 * eps)
    assert float((gradient * direction).sum()) == pytest.approx(finite, rel=1e-4)

    # and pixel by pixel, at the entries with the largest gradient
    for flat in np.argsort(np.abs(gradient).ravel())[-3:]:
        index = np.unravel_index(flat, gradient.shape)
        bump = torch.zeros_like(pixels)
        bump[(0, *index)] = eps
        finite = (word_logprob(captioner, pixels + bump, token_ids, target.positions)
                  - word_logprob(captioner, pixels - bump, token_ids, target.positions)) / (2 * eps)
        assert gradient[index] == pytest.approx(finite, rel=1e-3)


def test_saliency_map_is_abs_gradient_max_over_channels(explainer, photo, caption):
    captioner = explainer.captioner
    pixels = captioner.preprocess(photo)
    word = caption.words[1]
    ((_, gradients),) = target_gradients(captioner, pixels, caption.token_ids, [Target(word.token_positions)],
                                         -1, -1)
    explanation = explainer.explain(photo, 1, caption=caption)
    expected = np.abs(gradients.pixels[0]).max(axis=0)
    np.testing.assert_allclose(explanation.maps["saliency"].raw, expected, rtol=1e-5, atol=1e-9)


def independent_maps(captioner, pixels, token_ids, positions, vision_layer, attention_layer):
    """Grad-CAM and cross-attention Grad-CAM the straightforward way: hooks, retain_grad, .backward()."""
    model = captioner.model
    stash = {}
    handle = model.vision_model.encoder.layers[vision_layer].register_forward_hook(
        lambda module, inputs, output: stash.__setitem__("tokens", output))
    try:
        with torch.enable_grad():
            pixels = pixels.clone().requires_grad_(True)  # weights are frozen: the graph starts at the input
            embeds = model.vision_model(pixel_values=pixels).last_hidden_state
            ids = torch.tensor([token_ids])
            out = model.text_decoder(input_ids=ids, encoder_hidden_states=embeds, output_attentions=True,
                                     return_dict=True)
            tokens, attention = stash["tokens"], out.cross_attentions[attention_layer]
            tokens.retain_grad()
            attention.retain_grad()
            logprobs = torch.log_softmax(out.logits, dim=-1)
            target = sum(logprobs[0, p - 1, token_ids[p]] for p in positions)
            target.backward()
    finally:
        handle.remove()
    side = int((tokens.shape[1] - 1) ** 0.5)
    acts, grads = tokens[0, 1:].detach().numpy(), tokens.grad[0, 1:].numpy()  # (N, D)
    gradcam = np.maximum((acts * grads.mean(axis=0)).sum(axis=1), 0).reshape(side, side)
    hirescam = np.maximum((acts * grads).sum(axis=1), 0).reshape(side, side)
    rows = [p - 1 for p in positions]
    a, g = attention[0, :, rows, 1:].detach().numpy(), attention.grad[0, :, rows, 1:].numpy()
    cross = (a * np.maximum(g, 0)).mean(axis=0).sum(axis=0).reshape(side, side)
    return gradcam, hirescam, cross


def test_gradcam_and_cross_attention_match_an_independent_computation(explainer, photo, caption):
    captioner = explainer.captioner
    pixels = captioner.preprocess(photo)
    word = caption.words[2]
    gradcam, hirescam, cross = independent_maps(captioner, pixels, list(caption.token_ids), word.token_positions,
                                                vision_layer=0, attention_layer=1)
    assert gradcam.max() > 0 and cross.max() > 0
    for method, expected in (("GradCAM", gradcam), ("HiResCAM", hirescam)):
        settings = Settings(cam_method=method, vision_layer=0, cross_attention_layer=1)
        explanation = explainer.explain(photo, 2, caption=caption, settings=settings)
        np.testing.assert_allclose(explanation.maps["gradcam"].raw, expected, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(explanation.maps["cross_attention"].raw, cross, rtol=1e-4, atol=1e-9)
        assert explanation.maps["gradcam"].method == method
        assert explanation.maps["gradcam"].layer == "vision_model.encoder.layers.0"
        assert explanation.maps["cross_attention"].layer == "decoder layer 1 cross-attention"


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_cam_method_gives_a_valid_map(explainer, photo, caption, method):
    explanation = explainer.explain(photo, 0, caption=caption, settings=Settings(cam_method=method))
    values = explanation.maps["gradcam"].values
    assert values.shape == (47, 61) and values.dtype == np.float32
    assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_shared_forward_gives_the_same_maps_as_one_word_at_a_time(explainer, photo, caption):
    together = explainer.explain_many(photo, [0, 1, 2], caption=caption)
    for index, explanation in enumerate(together):
        alone = explainer.explain(photo, index, caption=caption)
        assert explanation.word_logprob == pytest.approx(alone.word_logprob, abs=1e-6)
        for key in ("gradcam", "cross_attention", "saliency"):
            np.testing.assert_allclose(explanation.maps[key].raw, alone.maps[key].raw, rtol=1e-5, atol=1e-9)
    assert not np.allclose(together[0].maps["saliency"].raw, together[1].maps["saliency"].raw)


def test_the_words_share_one_forward_pass_and_free_it_before_the_region_and_trust_numbers(photo, caption,
                                                                                         monkeypatch):
    """A caption's words are explained on one forward pass (its graph kept between them), which the stages that do
    not use it free first: it must not sit beside the region's caption and trust forwards at a click's peak."""
    explainer = Explainer.tiny(seed=0)
    forwards, alive = [], []
    original = ipag.word.AttributionPass
    monkeypatch.setattr(ipag.word, "AttributionPass", lambda *args: forwards.append(1) or original(*args))
    for name in ("caption_region", "score_images"):
        function = getattr(ipag.word, name)
        monkeypatch.setattr(ipag.word, name, lambda *args, function=function: alive.append(
            explainer._kept._kept is not None) or function(*args))
    explanations = explainer.precompute(photo, caption)
    assert len(explanations) > 1 and all(explanation.verification is not None for explanation in explanations)
    assert len(forwards) == 1 and alive and not any(alive)


def test_word_logprob_matches_the_caption(explainer, photo, caption):
    explanation = explainer.explain(photo, 3, caption=caption)
    assert explanation.in_caption
    assert explanation.words == (caption.words[3],)
    assert explanation.word_logprob == pytest.approx(caption.words[3].logprob, abs=1e-5)
    assert explanation.word_logprob < 0


def test_smoothgrad_differs_from_plain_saliency_and_is_reproducible(explainer, photo, caption):
    smooth = Settings(saliency="SmoothGrad", smoothgrad_samples=4)
    first = explainer.explain(photo, 0, caption=caption, settings=smooth)
    uncached = Explainer(explainer.captioner, explainer.clip, "superpixels")
    second = uncached.explain(photo, 0, caption=caption, settings=smooth)
    assert second is not first
    plain = explainer.explain(photo, 0, caption=caption)
    assert first.maps["saliency"].method.startswith("SmoothGrad")
    np.testing.assert_array_equal(first.maps["saliency"].values, second.maps["saliency"].values)
    assert not np.allclose(first.maps["saliency"].values, plain.maps["saliency"].values)


def test_free_text_is_explained_after_the_neutral_prompt(explainer, photo, caption):
    query = "red car" if "red car" not in caption.text else "blue bus"
    explanation = explainer.explain(photo, query, caption=caption)
    assert not explanation.in_caption and explanation.words == ()
    assert explanation.context == "a picture of"
    assert explanation.tokens == tuple(query.split())
    assert "not in the caption" in explanation.notes[0]
    assert explanation.maps["gradcam"].values.shape == (47, 61)


def test_a_caption_phrase_typed_as_text_is_explained_in_context(explainer, photo, caption):
    first, second = caption.words[0], caption.words[1]
    explanation = explainer.explain(photo, f"  {first.text.upper()} {second.text} ", caption=caption)
    assert explanation.in_caption
    assert explanation.words == (first, second)
    assert explanation.word_logprob == pytest.approx(first.logprob + second.logprob, abs=1e-5)

@pytest.mark.parametrize("name", ["blip-base", "vit-gpt2", "clipcap"])
def test_half_precision_keeps_the_maps(photo, name):
    """Under bfloat16 autocast (every stage; emulated where the CPU lacks it, so this runs anywhere): the same
    words, near-equal log-probabilities, maps correlated > 0.99."""
    explainer = Explainer.tiny(seed=0, captioner=name)
    caption = explainer.caption(photo, Settings(max_new_tokens=6))
    words = range(len(caption.words))
    settings = Settings(grounding=False)
    full = explainer.explain_many(photo, words, caption, settings)
    explainer.captioner.precision = Precision(frozenset(STAGES))
    half = Explainer(explainer.captioner, None).explain_many(photo, words, caption, settings)
    assert any(a.word_logprob != b.word_logprob for a, b in zip(full, half))  # autocast really ran
    assert Explainer(explainer.captioner, None).caption(photo, Settings(max_new_tokens=6)).text == caption.text
    for a, b in zip(full, half):
        assert b.word_logprob == pytest.approx(a.word_logprob, abs=0.05 * max(1.0, abs(a.word_logprob)))
        for key in a.maps:
            assert np.corrcoef(a.maps[key].values.ravel(), b.maps[key].values.ravel())[0, 1] > 0.99, key


def test_verification_numbers_are_the_captioner_on_the_composites(photo, caption, monkeypatch):
    """Each trust number is what it says: log p(word) with only the region shown (grey outside) and with the
    region blurred away, the region's own caption; and words grounded to one region share its forward pass."""
    from ipag.grounding import composite

    fresh = Explainer.tiny(seed=0)
    calls = []
    score = fresh.captioner.batch_token_logprobs
    monkeypatch.setattr(fresh.captioner, "batch_token_logprobs", lambda pixels, ids: calls.append(len(pixels))
                        or score(pixels, ids))
    explanations = fresh.explain_many(photo, range(len(caption.words)), caption)
    regions = {explanation.grounding.mask.tobytes() for explanation in explanations}
    # one batched forward (region only + blurred) per distinct region, the first with the language prior (blank
    # image), which every word shares
    assert calls == [3] + [2] * (len(regions) - 1)
    monkeypatch.undo()
    for explanation in explanations:
        check, mask, rows = explanation.verification, explanation.grounding.mask, Target(
            explanation.token_positions).rows
        ids = list(caption.token_ids)
        alone = fresh.captioner.token_logprobs(fresh.captioner.preprocess(composite(photo, mask, mode="grey")), ids)
        hidden = fresh.captioner.token_logprobs(fresh.captioner.preprocess(composite(photo, ~mask, mode="blur")),
                                                ids)
        assert check.region_logprob == pytest.approx(sum(alone[r] for r in rows), abs=1e-4)
        assert check.blurred_logprob == pytest.approx(sum(hidden[r] for r in rows), abs=1e-4)
        assert check.delta_logprob_blurred == pytest.approx(check.blurred_logprob - explanation.word_logprob)
        said = fresh.caption(composite(photo, mask, mode="grey"))
        assert check.region_caption == said.text
        assert check.region_says_word == (explanation.words[0].text.lower() in
                                          {word.text.lower() for word in said.words})



@pytest.mark.parametrize("query, message", [
    ("", "empty"), ("   \n", "empty"), (99, "out of range"), (-1, "out of range"),
    ("dog " * 100, "too long"), ("🙂", "no word"), (1.5, "word index or a text"), (True, "word index or a text"),
])
def test_bad_queries_get_a_clear_message(explainer, photo, caption, query, message):
    with pytest.raises(QueryError, match=message):
        explainer.explain(photo, query, caption=caption)


def test_no_weight_gradients_and_no_hooks_left(explainer, photo, caption, monkeypatch):
    model = explainer.captioner.model

    def hooks():  # transformers installs a few of its own; ours must come and go
        return [(name, len(m._forward_hooks), len(m._backward_hooks)) for name, m in model.named_modules()]

    before = hooks()
    explainer.explain(photo, 0, caption=caption, settings=Settings(saliency="SmoothGrad", smoothgrad_samples=2))
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert hooks() == before

    def broken_forward(*args, **kwargs):
        raise RuntimeError("simulated failure inside the forward pass")

    monkeypatch.setattr(explainer.captioner, "_forward", broken_forward)
    with pytest.raises(RuntimeError, match="simulated"):  # a failing pass must not leave hooks behind either
        Explainer(explainer.captioner).explain(photo, 0, caption=caption)  # fresh cache: really runs
    assert hooks() == before


@pytest.mark.parametrize("values, message", [
    (dict(cam_method="ScoreCAM"), "Unknown cam_method"),
    (dict(vision_layer=7), "out of range"),
    (dict(cross_attention_layer=-3), "out of range"),
    (dict(smoothgrad_samples=-1), "between 1 and 64"),
    (dict(segmenter="sam"), "Unknown segmenter"),
    (dict(template="no placeholder"), "must contain"),
    (dict(saliency="IntegratedGradients"), "Unknown saliency"),
])
def test_bad_settings_get_a_clear_message(explainer, photo, caption, values, message):
    with pytest.raises(ValueError, match=message):
        explainer.explain(photo, 0, caption=caption, settings=Settings.from_values(values))


def test_decoding_options(explainer, photo):
    short = explainer.caption(photo, Settings(max_new_tokens=3))
    assert 1 <= len(short.token_ids) - 1 <= 3
    beam = explainer.caption(photo, Settings(num_beams=3, max_new_tokens=5))
    assert len(beam.words) >= 1
    with pytest.raises(ValueError, match="num_beams"):
        explainer.caption(photo, Settings(num_beams=0))


def test_tiny_model_saved_with_save_pretrained_loads_back(tmp_path, photo, caption):
    BlipCaptioner.tiny(seed=0).save_pretrained(tmp_path)
    loaded = Explainer.from_pretrained(str(tmp_path), clip=None, device="cpu", precision="float32")
    again = loaded.caption(photo)
    assert again.text == caption.text
    assert again.token_logprobs == pytest.approx(caption.token_logprobs, abs=1e-5)


def test_unknown_model_offline_gives_a_clear_error():
    with pytest.raises(ModelUnavailableError) as info:
        Explainer.from_pretrained("no-such-org/no-such-captioner", clip=None, device="cpu")
    message = str(info.value)
    assert "no-such-org/no-such-captioner" in message and "Fix:" in message and "--tiny" in message


def test_unavailable_clip_weights_give_a_clear_error(tmp_path):
    BlipCaptioner.tiny(seed=0).save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailableError) as info:
        Explainer.from_pretrained(str(tmp_path), clip="ViT-B-32/openai", device="cpu")
    assert "ViT-B-32" in str(info.value) and "Fix:" in str(info.value)


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelUnavailableError, match="no CUDA GPU"):
        Explainer.tiny(device="cuda")


def test_results_serialise_to_json(explainer, photo, caption):
    import json

    explanation = explainer.explain(photo, 0, caption=caption)
    data = json.loads(json.dumps(explanation.to_dict()))
    assert data["words"] == [caption.words[0].text]
    assert set(data["maps"]) == expected_maps(explainer.captioner)
    assert data["image_evidence"] == pytest.approx(data["word_logprob"] - data["prior_logprob"])
    assert data["grounding"]["candidates"] and data["verification"]["mass_inside"]["gradcam"] >= 0
    assert json.loads(json.dumps(caption.to_dict()))["text"] == caption.text


def test_image_input_forms_agree(explainer, photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    from_array = explainer.caption(np.asarray(photo))
    assert explainer.caption(path).text == from_array.text == explainer.caption(str(path)).text
    assert explainer.caption(Image.open(path)).text == from_array.text
