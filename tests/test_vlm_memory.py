"""Big vision-language models, honestly: activation checkpointing of the language model in backward passes, and
`device_map` placement on GPUs (tested with tiny models: the mechanisms, not the sizes)."""

import numpy as np
import pytest
import torch

from ipag import Explainer, Settings
from ipag.captioners import load_captioner
from ipag.captioners.tiny_vlms import save_tiny
from ipag.captioners.vlm import CHECKPOINT_FROM, FAMILIES, VlmCaptioner

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request, tmp_path_factory):
    return load_captioner(str(save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=1)), CPU)


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while `run()` builds the graph."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return total


def test_checkpointing_keeps_every_map_and_saves_less(vlm, photo):
    """With the language model's layers checkpointed, the backward pass recomputes their activations: every map is
    the same (up to float rounding), and the graph keeps fewer bytes."""
    assert not vlm.gradient_checkpointing  # tiny: far below CHECKPOINT_FROM
    explainer = Explainer(vlm, clip=None, precision="float32")
    caption = explainer.caption(photo)
    settings = Settings(grounding=False)
    pixels = vlm.preprocess(photo)
    plain = explainer.explain(photo, 0, caption=caption, settings=settings)
    plain_bytes = saved_bytes(lambda: vlm.forward_for_attribution(pixels, list(caption.token_ids), -1, -1, True))
    vlm.gradient_checkpointing = True
    try:
        explainer = Explainer(vlm, clip=None, precision="float32")  # fresh caches
        checkpointed = explainer.explain(photo, 0, caption=caption, settings=settings)
        checkpointed_bytes = saved_bytes(
            lambda: vlm.forward_for_attribution(pixels, list(caption.token_ids), -1, -1, True))
    finally:
        vlm.gradient_checkpointing = False
    assert set(checkpointed.maps) == set(plain.maps)
    for key, heatmap in plain.maps.items():
        np.testing.assert_allclose(checkpointed.maps[key].values, heatmap.values, atol=1e-4, err_msg=key)
    assert checkpointed_bytes < plain_bytes
    assert all("forward" not in vars(layer) for layer in vlm.checkpointed_layers)  # the layers are restored


def test_big_models_are_checkpointed_and_gpus_get_a_device_map(tmp_path, monkeypatch):
    """Loading decides from the weight count (read from the files) whether to checkpoint, and on a GPU asks for
    bfloat16 weights spread by `device_map`; the model is then left where accelerate put it."""
    from transformers import AutoModelForImageTextToText

    folder = save_tiny("llava", tmp_path)
    asked = {}
    load = AutoModelForImageTextToText.from_pretrained

    def recording(model_id, **kwargs):
        asked.update(kwargs)
        model = load(model_id, **{key: value for key, value in kwargs.items() if key != "device_map"})
        model.hf_device_map = {"": "cuda:0"}  # what accelerate leaves on a model it placed
        return model

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", recording)
    monkeypatch.setattr("ipag.captioners.vlm.weight_count", lambda *_: CHECKPOINT_FROM)
    captioner = VlmCaptioner.load(str(folder), torch.device("cuda"), local_files_only=True)
    assert asked["device_map"] == "auto" and asked["dtype"] == torch.bfloat16
    assert captioner.gradient_checkpointing
    assert next(captioner.model.parameters()).device == CPU  # not moved again: accelerate placed it
    monkeypatch.setattr("ipag.captioners.vlm.weight_count", lambda *_: CHECKPOINT_FROM - 1)
    asked.clear()
    assert not VlmCaptioner.load(str(folder), CPU, local_files_only=True).gradient_checkpointing
    assert "device_map" not in asked and asked["dtype"] == torch.float32
