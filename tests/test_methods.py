"""The newer map types and trust numbers, each against an independent straightforward computation: input ×
gradient, raw cross-attention, integrated gradients (completeness), the language prior, the sanity check."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Explainer, Settings
from ipag.grounding.composite import backdrop
from ipag.images import BACKGROUND
from ipag.maps import MAP_TYPES, MapContext, MapType
from ipag.sanity import FLAG_ABOVE, rank_correlation, randomize_top_blocks
from tests.helpers import registered


def direct_pass(captioner, pixels, token_ids, positions, attention_layer):
    """log p(word) and its pixel gradient and cross-attention, with a plain forward and `.backward()`."""
    model = captioner.model
    with torch.enable_grad():
        pixels = pixels.clone().requires_grad_(True)
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        out = model.text_decoder(input_ids=torch.tensor([list(token_ids)]), encoder_hidden_states=embeds,
                                 output_attentions=True, return_dict=True)
        logprobs = torch.log_softmax(out.logits, dim=-1)
        target = sum(logprobs[0, p - 1, token_ids[p]] for p in positions)
        target.backward()
    return target.item(), pixels.grad[0].numpy(), out.cross_attentions[attention_layer][0].detach().numpy()


def test_input_x_gradient_and_attention_match_a_direct_computation(explainer, photo, caption):
    word = caption.words[1]
    explanation = explainer.explain(photo, 1, caption=caption, settings=Settings(cross_attention_layer=0))
    pixels = explainer.captioner.preprocess(photo)
    value, gradient, attention = direct_pass(explainer.captioner, pixels, caption.token_ids, word.token_positions, 0)
    assert value == pytest.approx(explanation.word_logprob, abs=1e-5)
    expected = (pixels[0].numpy() * gradient).sum(axis=0)
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(explanation.maps["input_x_gradient"].raw, expected, rtol=1e-3, atol=1e-6)
    rows = [p - 1 for p in word.token_positions]
    expected = attention[:, rows, 1:].mean(axis=0).sum(axis=0).reshape(8, 8)
    np.testing.assert_allclose(explanation.maps["attention"].raw, expected, rtol=1e-5, atol=1e-7)
    assert "not an explanation" in explanation.maps["attention"].method


def test_integrated_gradients_are_complete(explainer, photo, caption):
    """Σ attributions = log p(word | image) − log p(word | blurred image), within Captum's quadrature error."""
    word = caption.words[0]
    explanation = explainer.explain(photo, 0, caption=caption,
                                    settings=Settings(integrated_gradients=True, ig_steps=64))
    captioner = explainer.captioner
    rows = [p - 1 for p in word.token_positions]
    baseline = captioner.preprocess(Image.fromarray(backdrop(photo, "blur")))
    ids = list(caption.token_ids)
    difference = (sum(captioner.token_logprobs(captioner.preprocess(photo), ids)[r] for r in rows)
                  - sum(captioner.token_logprobs(baseline, ids)[r] for r in rows))
    assert abs(difference) > 1e-3  # the blur really changes the word's probability
    total = float(explanation.maps["integrated_gradients"].raw.sum())
    assert total == pytest.approx(difference, rel=0.02, abs=1e-4)
    assert any(note.startswith("Integrated gradients: 64 steps") for note in explanation.notes)


def test_the_language_prior_is_the_word_on_a_blank_image(explainer, photo, caption):
    explanation = explainer.explain(photo, 2, caption=caption)
    captioner, rows = explainer.captioner, [p - 1 for p in caption.words[2].token_positions]
    blank = captioner.token_logprobs(captioner.preprocess(Image.new("RGB", photo.size, BACKGROUND)),
                                     list(caption.token_ids))
    assert explanation.prior_logprob == pytest.approx(sum(blank[r] for r in rows), abs=1e-5)
    assert explanation.image_evidence == pytest.approx(explanation.word_logprob - explanation.prior_logprob)
    free = explainer.explain(photo, "kite", caption=caption)  # its own sequence: prompt + query
    assert free.prior_logprob is not None and free.prior_logprob != explanation.prior_logprob


@dataclass(frozen=True)
class EdgeMap(MapType):
    """A map that ignores the model: the image's edges (what Adebayo et al. warn some methods reduce to)."""

    key = "edges"
    title = "Edges"
    needs = "own"
    method = "image gradient magnitude"

    def layer(self, context: MapContext) -> str:
        return "the image"

    def _raw(self, context: MapContext) -> np.ndarray:
        grey = np.asarray(context.image.convert("L"), dtype=np.float32)
        return np.hypot(*np.gradient(grey))


def test_the_sanity_check_flags_a_map_that_ignores_the_weights(explainer, photo, caption):
    engine = Explainer(explainer.captioner, explainer.clip, "superpixels")
    with registered(MAP_TYPES, EdgeMap):
        explanation = engine.explain(photo, 1, caption=caption)
        check = engine.sanity_check(photo, explanation)
    assert check.blocks == check.total_blocks == 2  # the verdict: every block re-initialised
    assert check.correlations["edges"] == pytest.approx(1.0) and "edges" in check.flagged
    assert check.correlations["gradcam"] < FLAG_ABOVE and "gradcam" not in check.flagged  # it moved
    assert "clip_relevance" not in check.correlations  # CLIP's map: the captioner's weights do not enter it


def test_randomizing_changes_only_the_top_blocks_of_a_copy(explainer):
    captioner = explainer.captioner
    before = [p.clone() for p in captioner.model.parameters()]
    copy = randomize_top_blocks(captioner, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, captioner.model.parameters()))  # original untouched
    kept, reset = copy.vision_layers[0], copy.vision_layers[-1]
    assert all(torch.equal(a, b) for a, b in zip(kept.parameters(), captioner.vision_layers[0].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(reset.parameters(), captioner.vision_layers[-1].parameters()))
    with pytest.raises(ValueError, match="between 1 and 2"):
        randomize_top_blocks(captioner, 3)


def test_rank_correlation():
    ramp = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert rank_correlation(ramp, ramp ** 2) == pytest.approx(1.0)  # ranks, not values
    assert rank_correlation(ramp, -ramp) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(ramp, np.zeros_like(ramp)))
    with pytest.raises(ValueError, match="shapes"):
        rank_correlation(ramp, ramp.ravel())


def attention_gradients(captioner, pixels, token_ids, positions):
    """Every attention map of BLIP and the word's gradient on it, the plain way: word embeddings that require
    grad (so the text-only first layer is in the graph too), `retain_grad`, `.backward()`."""
    model = captioner.model
    with torch.enable_grad():
        pixels = pixels.clone().requires_grad_(True)
        vision = model.vision_model(pixel_values=pixels, output_attentions=True)
        words = model.text_decoder.bert.embeddings.word_embeddings(torch.tensor([list(token_ids)]))
        words = words.detach().requires_grad_(True) * 1.0  # not a leaf: BLIP adds positions in place
        out = model.text_decoder(inputs_embeds=words, encoder_hidden_states=vision.last_hidden_state,
                                 output_attentions=True, return_dict=True)
        every = [*vision.attentions, *out.attentions, *out.cross_attentions]
        for attention in every:
            attention.retain_grad()
        logprobs = torch.log_softmax(out.logits, dim=-1)
        sum(logprobs[0, p - 1, token_ids[p]] for p in positions).backward()
    pairs = [(a[0].detach(), a.grad[0]) for a in every]
    layers = len(vision.attentions), len(out.attentions)
    return pairs[:layers[0]], pairs[layers[0]:layers[0] + layers[1]], pairs[layers[0] + layers[1]:]


def test_relevancy_and_legrad_match_a_direct_computation(explainer, photo, caption):
    word = caption.words[2]
    explanation = explainer.explain(photo, 2, caption=caption)
    vision, decoder_self, decoder_cross = attention_gradients(
        explainer.captioner, explainer.captioner.preprocess(photo), caption.token_ids, word.token_positions)
    rows = [p - 1 for p in word.token_positions]

    def cam(attention, gradient):
        return (attention * gradient).clamp(min=0).mean(dim=0)

    def normalised(relevance):  # Chefer et al.'s R̄, written out; a row without relevance (the decoder is causal:
        eye = torch.eye(relevance.shape[0])  # nothing after the word gets any) stays the identity's
        rest = relevance - eye
        return torch.nan_to_num(rest / rest.sum(dim=1, keepdim=True)) + eye

    image = torch.eye(vision[0][0].shape[-1])
    for attention, gradient in vision:
        image = image + cam(attention, gradient) @ image
    text = torch.eye(decoder_self[0][0].shape[-1])
    text_image = torch.zeros(text.shape[0], image.shape[0])
    for (a_self, g_self), (a_cross, g_cross) in zip(decoder_self, decoder_cross):
        text_image = text_image + cam(a_self, g_self) @ text_image
        text = text + cam(a_self, g_self) @ text
        text_image = text_image + normalised(text).T @ cam(a_cross, g_cross) @ normalised(image)
    expected = text_image[rows, 1:].sum(dim=0).reshape(8, 8).numpy()
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(explanation.maps["relevancy"].raw, expected, rtol=1e-4, atol=1e-7)

    legrad = sum(gradient.clamp(min=0).mean(dim=(0, 1))[1:] for _, gradient in vision).reshape(8, 8).numpy()
    np.testing.assert_allclose(explanation.maps["legrad"].raw, legrad, rtol=1e-4, atol=1e-9)
