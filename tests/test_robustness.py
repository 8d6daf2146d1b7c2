"""Bad inputs, many users, long runs: clear messages, no crash, no leak (issue 6), on tiny models."""

import io
import os
import resource
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ipag import Explainer, ImageError, QueryError, Settings, load_image
from ipag.grounding import ClipModel
from ipag.images import MAX_SIDE


def save(image: Image.Image, path, **options) -> str:
    image.save(path, **options)
    return str(path)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))


@pytest.fixture()
def files(tmp_path):
    """A battery of awkward image files, named by what they are."""
    out = {}
    png = io.BytesIO()
    noise(64, 48).save(png, format="PNG")
    out["truncated"] = tmp_path / "truncated.png"
    out["truncated"].write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    out["not an image"] = tmp_path / "notes.jpg"
    out["not an image"].write_text("hello, I am text")
    out["zero bytes"] = tmp_path / "empty.png"
    out["zero bytes"].write_bytes(b"")
    out["bomb"] = save(Image.new("1", (10_000, 10_000)), tmp_path / "bomb.png")  # 100 MP in a few KB
    return out


@pytest.mark.parametrize("name", ["truncated", "not an image", "zero bytes", "bomb"])
def test_bad_files_get_a_clear_message_quickly(files, name):
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        load_image(files[name])
    assert time.perf_counter() - started < 5  # refused from the header, not after decoding 100 MP
    assert ("megapixels" in str(info.value)) == (name == "bomb")


def test_the_bomb_file_is_small_and_pillow_refuses_it_too(files):
    """Gradio's upload widget decodes with Pillow before our code runs: its guard must refuse the bomb."""
    assert os.path.getsize(files["bomb"]) < 100_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(files["bomb"])


def test_awkward_but_valid_images_work(explainer, tmp_path):
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    gif = tmp_path / "animated.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert load_image(gif).getpixel((5, 5)) == (255, 0, 0)  # the first frame
    exif_image = noise(40, 20)
    exif = exif_image.getexif()
    exif[0x0112] = 8
    rotated = save(exif_image, tmp_path / "rotated.jpg", exif=exif)
    cases = {
        "1x1": noise(1, 1), "1x4000": noise(1, 4000), "4000x1": noise(4000, 1), "gif": gif, "exif": rotated,
        "16-bit": Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100),
        "cmyk": noise(30, 20).convert("CMYK"), "rgba": noise(30, 20).convert("RGBA"), "palette": noise(30, 20).quantize(8),
    }
    for name, image in cases.items():
        rgb = load_image(image)
        caption = explainer.caption(rgb, Settings(max_new_tokens=3))
        explanation = explainer.explain(rgb, 0, caption=caption)
        assert explanation.maps["gradcam"].values.shape == (rgb.height, rgb.width), name
        assert max(rgb.size) <= MAX_SIDE, name
    assert load_image(rotated).size == (20, 40)
    assert load_image(noise(1, 4000)).size == (1, MAX_SIDE)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 90), height=st.integers(1, 90),
       mode=st.sampled_from(["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1", "F"]),
       content=st.sampled_from(["noise", "flat", "stripes"]), seed=st.integers(0, 2**16))
def test_fuzzed_images_go_through_the_whole_pipeline(explainer, width, height, mode, content, seed):
    rng = np.random.default_rng(seed)
    if content == "noise":
        values = rng.random((height, width))
    elif content == "flat":
        values = np.full((height, width), rng.random())
    else:
        values = (np.indices((height, width))[1] % 2).astype(float)
    if mode == "I;16":
        image = Image.fromarray((values * 65535).astype(np.uint16))
    elif mode == "F":
        image = Image.fromarray(values.astype(np.float32))
    else:
        image = Image.fromarray((np.stack([values] * 3, -1) * 255).astype(np.uint8)).convert(
            "RGB" if mode == "P" else mode)
        image = image.quantize(4) if mode == "P" else image
    caption = explainer.caption(image, Settings(max_new_tokens=2))
    query = 0 if caption.words else "dog"  # a random tiny model may caption only punctuation
    explanation = explainer.explain(image, query, caption=caption)
    for heatmap in explanation.maps.values():
        assert heatmap.values.shape == (height, width)
        assert np.isfinite(heatmap.values).all() and 0 <= heatmap.values.min() <= heatmap.values.max() <= 1
    assert explanation.grounding.mask.shape == (height, width)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_]),
       shape=st.sampled_from([(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4), (5, 7, 2), (0, 7, 3), (5,)]))
def test_fuzzed_arrays_are_loaded_or_refused_clearly(dtype, shape):
    array = np.zeros(shape, dtype=dtype)
    try:
        image = load_image(array)
    except ImageError as err:
        assert str(err)  # a message, never another exception type
    else:
        assert image.mode == "RGB" and image.size == (shape[1], shape[0])


@pytest.mark.parametrize("query", ["", "   ", "x" * 10_000, "🙂🙂", "<script>alert(1)</script>", "狗", "Ünïcödé"])
def test_awkward_queries_get_a_result_or_a_clear_message(explainer, photo, caption, query):
    try:
        explanation = explainer.explain(photo, query, caption=caption)
    except QueryError as err:
        assert str(err)
    else:
        assert explanation.query == query and np.isfinite(explanation.word_logprob)


def test_a_failing_map_type_leaves_the_others_and_says_why(explainer, photo, caption, monkeypatch):
    from ipag.maps import SaliencyMap

    def broken(self, gradients):
        raise RuntimeError("saliency exploded")

    monkeypatch.setattr(SaliencyMap, "_raw", broken)
    explanation = Explainer(explainer.captioner, explainer.clip, "superpixels").explain(photo, 0, caption=caption)
    assert "saliency" not in explanation.maps and "gradcam" in explanation.maps
    assert "saliency exploded" in explanation.failed_maps["saliency"]
    assert explanation.grounding is not None


def test_a_missing_segmenter_is_a_note_with_the_fix(explainer, photo, caption, monkeypatch):
    from ipag.segmenters import detectron2

    monkeypatch.setattr(detectron2, "find_spec", lambda name: None)
    explanation = Explainer(explainer.captioner, explainer.clip, "superpixels").explain(
        photo, 0, caption=caption, settings=Settings(segmenter="detectron2"))
    assert explanation.grounding is None and "gradcam" in explanation.maps
    assert any("pip install" in note for note in explanation.notes)


def test_memory_stays_bounded_over_many_uploads(explainer):
    """Reduced scale (the full 200-upload run is `python scripts/stress.py`)."""
    bounded = Explainer(explainer.captioner, explainer.clip, "superpixels", cache_mb=1)
    model = explainer.captioner.model
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    rss = []
    for seed in range(24):
        image = noise(96, 72, seed)
        bounded.explain(image, 0, caption=bounded.caption(image, Settings(max_new_tokens=4)))
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert bounded.cache.used_bytes() <= 2**20 and len(bounded.cache.images()) < 24
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert rss[-1] - rss[8] < 200_000  # KiB: no growth proportional to the uploads after warm-up


def test_cuda_without_gpu_is_a_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from ipag import ModelUnavailableError

    with pytest.raises(ModelUnavailableError, match="--device cpu"):
        ClipModel.tiny(device="cuda")
