"""ClipCap: an open_clip image tower (ViT or ResNet), ClipCap's mapping network (MLP or transformer) and GPT-2
fed the image as a prefix — explained like the other captioners, loaded from the original repository's layout."""

import copy
import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import playground
from ipag import Explainer, Explainers, ModelUnavailableError, Settings, cli, ui
from ipag.attribution import target_gradients
from ipag.captioners import ClipCapCaptioner, DecodeOptions, VitGpt2Captioner, load_captioner, tiny_captioner
from ipag.captioners.clipcap import DEFAULT_CHECKPOINT
from ipag.render import enlarged
from ipag.settings import DEFAULTS
from ipag.target import Target

CPU = torch.device("cpu")
NO_CROSS_ATTENTION = "This captioner has no cross-attention: ClipCap feeds the image to GPT-2 as a prefix."
#: (encoder, mapping) of the two tiny variants: together they cover both encoders and both mapping networks.
VARIANTS = [("vit", "mlp"), ("resnet", "transformer")]


def tiny(encoder: str = "vit", mapping: str = "mlp", seed: int = 0) -> ClipCapCaptioner:
    return ClipCapCaptioner.tiny(seed, encoder=encoder, mapping=mapping)


@pytest.fixture(scope="module", params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def captioner(request):
    return tiny(*request.param)


@pytest.fixture(scope="module")
def vit():
    return tiny("vit", "mlp")


def word_logprob(captioner, pixel_values, token_ids, positions) -> float:
    logprobs = captioner.token_logprobs(pixel_values, token_ids)
    return sum(logprobs[p - 1] for p in positions)


def grid_of(captioner) -> tuple[int, int]:
    """The default Grad-CAM layer's grid: 8×8 ViT patches (64 px, patch 8), 4×4 ResNet maps (128 px / 32)."""
    return (4, 4) if captioner.config.architecture.endswith("rn") else (8, 8)


# --- captions and maps ---------------------------------------------------------------------------------------

def test_both_encoders_caption_and_give_every_map_except_cross_attention(captioner, photo):
    explainer = Explainer(captioner, clip=None)
    caption = explainer.caption(photo)
    assert caption.token_ids[0] == captioner.start_ids()[0] and len(caption.words) >= 2
    explanation = explainer.explain(photo, 1, caption=caption, settings=Settings(occlusion=True))
    assert set(explanation.maps) == {"gradcam", "saliency", "input_x_gradient", "occlusion"}
    missing = explanation.unavailable_maps
    assert missing["cross_attention"] == missing["attention"] == NO_CROSS_ATTENTION
    assert set(missing) == {"cross_attention", "attention", "relevancy", "legrad"}  # no cross-attention decoder
    assert NO_CROSS_ATTENTION in explanation.notes and explanation.to_dict()["unavailable_maps"] == missing
    size = captioner.preprocess(photo).shape[-1]
    assert explanation.maps["gradcam"].raw.shape == grid_of(captioner)
    assert explanation.maps["gradcam"].layer == ("visual.layer4" if grid_of(captioner) == (4, 4)
                                                 else "visual.transformer.resblocks.1")
    assert explanation.maps["saliency"].raw.shape == (size, size)
    for heatmap in explanation.maps.values():  # (a random model's Grad-CAM may be all negative, so all 0)
        assert heatmap.values.shape == (47, 61) and 0 <= heatmap.values.min() <= heatmap.values.max() <= 1
    assert explanation.word_logprob == pytest.approx(caption.words[1].logprob, abs=1e-5)


def test_caption_depends_on_the_image(captioner, photo):
    """Guard against vacuous gradient tests (DESIGN.md): a local change moves the words' log-probabilities."""
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=5))
    changed = pixels.clone()
    side = pixels.shape[-1] // 4
    changed[..., :side, :side] += 1.0
    before, after = captioner.token_logprobs(pixels, token_ids), captioner.token_logprobs(changed, token_ids)
    assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3


@pytest.mark.parametrize("encoder, mapping", VARIANTS)
def test_saliency_is_the_gradient_of_the_word_logprob(photo, encoder, mapping):
    captioner = tiny(encoder, mapping)
    captioner.model.double()
    pixels = captioner.preprocess(photo)
    token_ids = captioner.generate(pixels, DecodeOptions(max_new_tokens=5, min_new_tokens=3))
    target = Target((2, 3))
    ((value, gradients),) = target_gradients(captioner, pixels, token_ids, [target], -1, None)
    assert value == pytest.approx(word_logprob(captioner, pixels, token_ids, target.positions), abs=1e-9)
    gradient = gradients.pixels[0]
    eps = 1e-6  # small, so that hardly any of the ResNet's ReLUs flips: its log p is only piecewise smooth

    def finite(step):
        return (word_logprob(captioner, pixels + step, token_ids, target.positions)
                - word_logprob(captioner, pixels - step, token_ids, target.positions)) / (2 * eps)

    direction = np.random.default_rng(1).standard_normal(gradient.shape)
    slope = finite(torch.from_numpy(direction)[None] * eps)
    assert abs(slope) > 1e-3
    assert float((gradient * direction).sum()) == pytest.approx(slope, rel=1e-4)
    for flat in np.argsort(np.abs(gradient).ravel())[-2:]:  # and pixel by pixel where the gradient is largest
        index = np.unravel_index(flat, gradient.shape)
        bump = torch.zeros_like(pixels)
        bump[(0, *index)] = eps
        assert gradient[index] == pytest.approx(finite(bump), rel=1e-3)


def independent_gradcam(captioner, pixels, token_ids, positions, module):
    """Grad-CAM and HiResCAM the straightforward way: a hook on `module`, the prefix built by hand (CLIP
    embedding → mapping network → GPT-2 input embeddings before the caption's tokens), .backward()."""
    model = captioner.model
    stash = {}
    handle = module.register_forward_hook(lambda _module, _inputs, output: stash.__setitem__("output", output))
    try:
        with torch.enable_grad():
            prefix = model.clip_project(model.visual(pixels.clone().requires_grad_(True)))
            words = model.gpt.transformer.wte(torch.tensor([token_ids[1:]]))
            logprobs = torch.log_softmax(model.gpt(inputs_embeds=torch.cat([prefix, words], 1)).logits, -1)[0]
            output = stash["output"]
            output.retain_grad()
            # the embedding at prefix position P−1+(t−1) predicts token t (token 0 stands for the prefix)
            sum(logprobs[prefix.shape[1] + p - 2, token_ids[p]] for p in positions).backward()
    finally:
        handle.remove()
    acts, grads = output.detach()[0], output.grad[0]
    if acts.dim() == 2:  # ViT tokens (1+N, D): drop CLS, patches on their square grid, channels first
        side = int((acts.shape[0] - 1) ** 0.5)
        acts, grads = (t[1:].T.reshape(-1, side, side) for t in (acts, grads))
    gradcam = torch.relu((acts * grads.mean(dim=(1, 2), keepdim=True)).sum(0))
    hirescam = torch.relu((acts * grads).sum(0))
    return gradcam.numpy(), hirescam.numpy()


@pytest.mark.parametrize("encoder, mapping, layer, grid", [("vit", "mlp", 0, (8, 8)), ("vit", "mlp", 1, (8, 8)),
                                                           ("resnet", "transformer", 2, (8, 8)),
                                                           ("resnet", "transformer", 3, (4, 4))])
def test_gradcam_matches_an_independent_computation(photo, encoder, mapping, layer, grid):
    """On ViT blocks' patch tokens and on the ResNet's stages (classic convolutional Grad-CAM)."""
    captioner = tiny(encoder, mapping)
    explainer = Explainer(captioner, clip=None)
    caption = explainer.caption(photo)
    pixels = captioner.preprocess(photo)
    module = captioner.vision_layers[layer]
    # a word whose maps are not all zero (a random model's CAM is often negative everywhere, hence 0 after ReLU)
    index, gradcam, hirescam = next(
        (word.index, *maps) for word in caption.words
        for maps in [independent_gradcam(captioner, pixels, list(caption.token_ids), word.token_positions, module)]
        if maps[0].max() > 0 and maps[1].max() > 0)
    assert gradcam.shape == grid
    for method, expected in (("GradCAM", gradcam), ("HiResCAM", hirescam)):
        explanation = explainer.explain(photo, index, caption=caption,
                                        settings=Settings(cam_method=method, vision_layer=layer))
        np.testing.assert_allclose(explanation.maps["gradcam"].raw, expected, rtol=1e-4, atol=1e-7)
        assert explanation.maps["gradcam"].layer == captioner.module_name(module)


def test_resnet_stages_are_the_vision_layers():
    captioner = tiny("resnet", "transformer")
    assert [captioner.module_name(m) for m in captioner.vision_layers] == [f"visual.layer{i}" for i in range(1, 5)]


def test_the_vit_last_block_is_left_out_because_its_patch_tokens_get_no_gradient(vit, photo):
    """CLIP's embedding is the last block's CLS token alone: Grad-CAM on that block's patches would be zero."""
    blocks = list(vit.model.visual.transformer.resblocks)
    assert vit.vision_layers == blocks[:-1]
    pixels = vit.preprocess(photo)
    token_ids = vit.generate(pixels, DecodeOptions(max_new_tokens=4))
    outputs = {}
    handles = [blocks[k].register_forward_hook(lambda _m, _i, output, k=k: outputs.__setitem__(k, output))
               for k in (-2, -1)]
    try:
        with torch.enable_grad():
            logprobs = torch.log_softmax(vit.model(pixels.requires_grad_(True), torch.tensor([token_ids])), -1)
            last, before = torch.autograd.grad(logprobs[0, 0, token_ids[1]], [outputs[-1], outputs[-2]])
    finally:
        for handle in handles:
            handle.remove()
    assert torch.all(last[:, 1:] == 0) and last[:, 0].abs().max() > 0
    assert before[:, 1:].abs().max() > 0


def test_sequence_first_vit_tokens_give_the_same_maps(vit, photo):
    """open_clip runs some ViTs sequence-first ((L, B, D) tokens): `vision_grid` reads both layouts."""
    transformer = vit.model.visual.transformer
    sequence_first = copy.deepcopy(vit)
    sequence_first.model.visual.transformer = open_clip.transformer.Transformer(
        transformer.width, transformer.layers, 4, batch_first=False)
    sequence_first.model.visual.transformer.load_state_dict(transformer.state_dict())
    pixels = vit.preprocess(photo)
    token_ids = vit.generate(pixels, DecodeOptions(max_new_tokens=4))
    captured = sequence_first.forward_for_attribution(pixels, token_ids, -1, None)
    assert captured.vision_output.shape[:2] == (65, 1) and captured.grid == (8, 8)
    ((_, expected),) = target_gradients(vit, pixels, token_ids, [Target((1, 2))], -1, None)
    ((_, found),) = target_gradients(sequence_first, pixels, token_ids, [Target((1, 2))], -1, None)
    for name in ("vision_activations", "vision_gradients", "pixels"):
        np.testing.assert_allclose(getattr(found, name), getattr(expected, name), rtol=1e-4, atol=1e-6)


def test_the_transformer_mapping_computes_clipcaps_maths():
    """Checked against the original's formula written out with einsum: the CLIP tokens and the learnt constants
    through pre-norm blocks (8 heads; keys and values from one projection, keys first; ReLU MLP)."""
    mapper = tiny("resnet", "transformer").model.clip_project
    embedding = torch.randn(2, 32)
    tokens = torch.cat([mapper.linear(embedding).view(2, mapper.clip_length, -1),
                        mapper.prefix_const.expand(2, -1, -1)], dim=1)
    for layer in mapper.transformer.layers:
        normed = layer.norm1(tokens)
        queries = layer.attn.to_queries(normed).view(2, -1, 8, 4)
        keys_values = layer.attn.to_keys_values(normed).view(2, -1, 2, 8, 4)
        weights = (torch.einsum("bnhd,bmhd->bnmh", queries, keys_values[:, :, 0]) / 2).softmax(dim=2)
        mixed = torch.einsum("bnmh,bmhd->bnhd", weights, keys_values[:, :, 1]).reshape(tokens.shape)
        tokens = tokens + layer.attn.project(mixed)
        tokens = tokens + layer.mlp.fc2(F.relu(layer.mlp.fc1(layer.norm2(tokens))))
    torch.testing.assert_close(mapper(embedding), tokens[:, mapper.clip_length:])


# --- generation and words -------------------------------------------------------------------------------------

@pytest.mark.parametrize("beams", [1, 3])
def test_generation_scores_equal_teacher_forcing(captioner, photo, beams):
    pixels = captioner.preprocess(photo)
    ids, logprobs = captioner.generate_scored(pixels, DecodeOptions(beams, max_new_tokens=8, min_new_tokens=3))
    assert len(ids) >= 4 and len(logprobs) == len(ids) - 1
    assert logprobs == pytest.approx(captioner.token_logprobs(pixels, ids), abs=1e-4)


def test_a_caption_ends_after_its_full_stop_or_at_the_end_token(vit):
    start, stop = vit.start_ids()[0], vit.tokenizer.convert_tokens_to_ids(".")
    word = vit.tokenize("man")[0]
    assert vit._caption_end([start, word, word, stop, word]) == 4  # the full stop is the caption's
    assert vit._caption_end([start, word, start, start]) == 2  # end token, then a finished beam's padding
    assert vit._caption_end([start, word, word]) == 3


def test_gpt2_words_are_aligned_as_for_vit_gpt2(vit, photo):
    assert ClipCapCaptioner.pieces is VitGpt2Captioner.pieces  # one implementation of GPT-2's word pieces
    explainer = Explainer(vit, clip=None)
    ids = vit.start_ids() + vit.tokenizer("a man riding skateboards.", add_special_tokens=False).input_ids
    caption = explainer.caption_from_ids(vit.preprocess(photo), ids)
    assert caption.text == "a man riding skateboards."
    assert [w.text for w in caption.words] == ["a", "man", "riding", "skateboards"]
    assert [caption.tokens[p] for p in caption.words[3].token_positions] == ["Ġskateboard", "s"]
    assert [p.kind for p in vit.pieces(ids)] == ["special", "start", "start", "start", "start", "continue", "punct"]
    free = explainer.explain(photo, "kite", caption=caption)
    assert not free.in_caption and free.context == "a picture of" and free.tokens == ("Ġkite",)


def test_settings_resolve_without_a_cross_attention_layer(vit):
    explainer = Explainer(vit, clip=None)
    resolved = explainer.resolve(Settings(cross_attention_layer=5, segmenter="superpixels"))
    assert resolved.cross_attention_layer is None and resolved.vision_layer == len(vit.vision_layers) - 1
    with pytest.raises(ValueError, match="out of range"):
        explainer.resolve(Settings(vision_layer=2, segmenter="superpixels"))


# --- checkpoints ----------------------------------------------------------------------------------------------

def checkpoint_names(mapping: str) -> set[str]:
    """Parameter names of the original repository's mapping networks (train.py's MLP and TransformerMapper)."""
    if mapping == "mlp":
        return {"clip_project.model.0.weight", "clip_project.model.0.bias", "clip_project.model.2.weight",
                "clip_project.model.2.bias"}
    layer = "clip_project.transformer.layers.{}."
    names = {"attn.to_queries.weight", "attn.to_keys_values.weight", "attn.project.weight", "attn.project.bias",
             "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"}
    return ({"clip_project.linear.weight", "clip_project.linear.bias", "clip_project.prefix_const"}
            | {layer.format(i) + name for i in range(2) for name in names})


def assert_same_captioner(loaded, original, photo):
    pixels = original.preprocess(photo)
    torch.testing.assert_close(loaded.preprocess(photo), pixels)
    ids = original.generate(pixels, DecodeOptions(max_new_tokens=8))
    assert loaded.generate(pixels, DecodeOptions(max_new_tokens=8)) == ids
    assert loaded.token_logprobs(pixels, ids) == pytest.approx(original.token_logprobs(pixels, ids), abs=1e-6)


@pytest.mark.parametrize("encoder, mapping", VARIANTS)
def test_a_checkpoint_in_clipcaps_layout_loads_back_and_captions_identically(tmp_path, photo, encoder, mapping):
    original = tiny(encoder, mapping, seed=1)
    original.save_pretrained(tmp_path)
    state = torch.load(tmp_path / "clipcap.pt", weights_only=True)
    assert {key.split(".")[0] for key in state} == {"clip_project", "gpt"}
    assert {key for key in state if key.startswith("clip_project.")} == checkpoint_names(mapping)
    assert "gpt.transformer.wte.weight" in state and "gpt.lm_head.weight" in state
    for model_id in (tmp_path, tmp_path / "clipcap.pt"):  # the folder, or the checkpoint file itself
        loaded = load_captioner(str(model_id), CPU)
        assert type(loaded) is ClipCapCaptioner and loaded.model_id == str(model_id)
        assert_same_captioner(loaded, original, photo)


def test_original_checkpoints_load_with_legacy_buffers_and_as_safetensors(tmp_path, photo):
    """Checkpoints saved with the transformers of 2021 hold GPT-2's causal-mask buffers; .safetensors files
    drop GPT-2's tied output weights. Both load."""
    original = tiny(seed=2)
    original.save_pretrained(tmp_path)
    state = torch.load(tmp_path / "clipcap.pt", weights_only=True)
    state["gpt.transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    state["gpt.transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "clipcap.pt")
    assert_same_captioner(load_captioner(str(tmp_path), CPU), original, photo)
    del state["gpt.lm_head.weight"]
    save_file(state, tmp_path / "coco_prefix-009.safetensors")
    shutil.copy(tmp_path / "clipcap.json", tmp_path / "coco_prefix-009.json")
    assert_same_captioner(load_captioner(str(tmp_path / "coco_prefix-009.safetensors"), CPU), original, photo)


def edit(path, change):
    """Rewrite a checkpoint or a JSON config file through `change`."""
    if path.suffix == ".json":
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        torch.save(change(torch.load(path, weights_only=True)), path)


def without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("file, change, problem", [
    ("clipcap.pt", without("clip_project.model.2.bias"), "1 missing: clip_project.model.2.bias"),
    ("clipcap.pt", lambda state: state | {"clip_project.extra": torch.zeros(1)}, "1 unexpected: clip_project.extra"),
    ("clipcap.pt", without("gpt.transformer.h.1.mlp.c_fc.weight"), "1 missing: gpt.transformer.h.1.mlp.c_fc.weight"),
    ("clipcap.json", lambda config: config | {"prefix_length": 5},
     "4 with the wrong shape: clip_project.model.0.weight (64, 32) instead of (80, 32)"),
    ("clipcap.json", lambda config: config | {"mapping": "transformer"}, "27 missing: clip_project.linear.bias"),
])
def test_a_mismatched_checkpoint_names_the_file_and_the_expected_layout(tmp_path, file, change, problem):
    tiny(seed=3).save_pretrained(tmp_path)
    edit(tmp_path / file, change)
    with pytest.raises(ModelUnavailableError) as info:
        load_captioner(str(tmp_path), CPU)
    message = str(info.value)
    assert f"{tmp_path / 'clipcap.pt'} does not match the ClipCap checkpoint layout" in message
    assert problem in message
    assert "clip_project.* (the mapping network) and gpt.* (GPT-2)" in message
    assert f"describe how it was trained in {tmp_path / 'clipcap.json'}" in message


@pytest.mark.parametrize("write, message", [
    (lambda path: path.write_bytes(b"not a checkpoint"), "could not be read"),
    (lambda path: torch.save([torch.zeros(1)], path), "holds a list, not a state dict"),
    (lambda path: path.with_suffix(".json").write_text('{"prefix_len": 10}'), "unknown field(s) prefix_len"),
    (lambda path: path.with_suffix(".json").write_text('{"mapping": "lstm"}'), "mapping must be 'mlp' or"),
    (lambda path: path.with_suffix(".json").write_text('{"clip": "RN50x4"}'), "without weights"),
    (lambda path: path.unlink(), "No ClipCap checkpoint at"),
])
def test_unreadable_checkpoints_and_configs_give_clear_errors(tmp_path, write, message):
    tiny(seed=3).save_pretrained(tmp_path)
    write(tmp_path / "clipcap.pt")
    with pytest.raises(ModelUnavailableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_captioner(str(tmp_path / "clipcap.pt"), CPU)


def test_clip_and_gpt2_named_by_hub_names_are_refused_offline_with_the_fix(tmp_path):
    tiny(seed=3).save_pretrained(tmp_path)
    edit(tmp_path / "clipcap.json", lambda config: config | {"gpt2": "gpt2"})
    with pytest.raises(ModelUnavailableError, match=r"GPT-2's config and tokenizer 'gpt2'.*Fix:"):
        load_captioner(str(tmp_path), CPU)
    edit(tmp_path / "clipcap.json", lambda config: config | {"clip": "ViT-B-32/openai"})
    with pytest.raises(ModelUnavailableError, match=r"CLIP weights 'ViT-B-32/openai'.*Fix:"):
        load_captioner(str(tmp_path), CPU)


def test_the_friendly_name_says_where_the_original_weights_go():
    if DEFAULT_CHECKPOINT.exists():
        pytest.skip("the original COCO weights are installed here")
    with pytest.raises(ModelUnavailableError, match=f"No ClipCap checkpoint at {DEFAULT_CHECKPOINT}.*coco_weights.pt"):
        load_captioner("clipcap", CPU)


# --- the page, the CLI and the evaluations -------------------------------------------------------------------

@pytest.fixture(scope="module")
def clipcap_explainer():
    return Explainer.tiny(seed=0, captioner="clipcap")


def test_the_page_functions_show_why_there_is_no_cross_attention_map(clipcap_explainer, photo):
    segments, session, status = ui.caption_image(clipcap_explainer, photo, Settings(max_new_tokens=6), ui.Session(),
                                                 precompute=False)
    assert "words" in status and any(score is not None for _, score in segments)
    word = session.caption.words[0].text
    *_, (session, rendered) = ui.explain(clipcap_explainer, session, word, Settings())
    assert rendered.picture.size == enlarged(photo).size and session.view == ui.DEFAULT_VIEW
    _, shown = ui.select_view(session, "gradcam", Settings())
    assert shown.label == f"**Grad-CAM**: {DEFAULTS.cam_method} · visual.transformer.resblocks.1"
    for view in ("cross_attention", "attention"):
        _, shown = ui.select_view(session, view, Settings())
        assert shown.picture is None and shown.label == NO_CROSS_ATTENTION
    _, shown = ui.select_view(session, "region", Settings())
    assert shown.picture is not None  # grounding by the (tiny) CLIP works as for any captioner


def test_the_compare_view_captions_with_clipcap_and_says_which_captioner_is_missing(clipcap_explainer, photo):
    def load(name):
        if name == "vit-gpt2":
            raise ModelUnavailableError("no weights here")
        return tiny_captioner(name)

    explainers = Explainers(clipcap_explainer, "clipcap", load)
    rows = ui.compare_captions(explainers, ["clipcap", "blip-base", "vit-gpt2"], photo, Settings(max_new_tokens=6))
    assert "".join(text for text, _ in rows[0]) == clipcap_explainer.caption(photo, Settings(max_new_tokens=6)).text
    assert any(score is not None for _, score in rows[1])  # BLIP's caption, clickable
    assert rows[2] == [("Captioner 'vit-gpt2' is not available: no weights here", None)]


def test_a_clipcap_page_builds_with_the_cross_attention_layer_switched_off(clipcap_explainer):
    demo = playground.build_app(clipcap_explainer)
    slider = next(block for block in demo.blocks.values()
                  if getattr(block, "elem_id", None) == "settings-cross_attention_layer")
    assert slider.interactive is False and slider.info == NO_CROSS_ATTENTION


def test_the_cli_explains_and_evaluates_with_clipcap(tmp_path, photo):
    photo.save(tmp_path / "photo.png")
    options = ["--tiny", "--captioner", "clipcap", "--device", "cpu", "--max-new-tokens", "3"]
    assert cli.main(["explain", str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"), *options]) == 0
    word = json.loads(next((tmp_path / "out").rglob("explanation.json")).read_text())
    assert word["captioner"].startswith("clipcap (tiny-clipcap-vit-mlp")
    assert set(word["maps"]) == {"gradcam", "saliency", "input_x_gradient", "clip_relevance"}
    assert word["unavailable_maps"]["cross_attention"] == NO_CROSS_ATTENTION
    report = tmp_path / "faithfulness.json"
    assert cli.main(["evaluate-faithfulness", str(tmp_path / "photo.png"), "--steps", "2", "--road-percentiles",
                     "none", "--out", str(report), *options]) == 0
    assert set(json.loads(report.read_text())["summary"]["maps"]) == {"gradcam", "saliency", "input_x_gradient",
                                                                     "clip_relevance", "random"}
