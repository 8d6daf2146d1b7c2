"""The cached path: same answers as a fresh computation, memory bounded in bytes, never another image's maps."""

import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Explainer, Settings, load_image
from ipag.cache import ImageCache, image_key, nbytes
from ipag.captioners import tiny_captioner
from ipag.settings import DEFAULTS
from scripts.stress import phone_photo


def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def fresh(explainer: Explainer, cache_mb: float = 256) -> Explainer:
    """A new explainer (empty caches) over the same models."""
    return Explainer(explainer.captioner, explainer.clip, "superpixels", cache_mb=cache_mb)


def assert_same(a, b):
    assert a.word_logprob == pytest.approx(b.word_logprob, abs=1e-6)
    assert set(a.maps) == set(b.maps)
    for key in a.maps:
        np.testing.assert_allclose(a.maps[key].values, b.maps[key].values, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(a.grounding.mask, b.grounding.mask)


def test_precomputed_maps_equal_fresh_ones_and_clicks_hit_the_cache(explainer):
    image = picture(1)
    cached = fresh(explainer)
    caption = cached.caption(image)
    precomputed = cached.precompute(image, caption)
    assert len(precomputed) == len(caption.words)
    for index in range(len(caption.words)):
        click = cached.explain(image, index, caption=caption)
        assert_same(click, precomputed[index])
        assert_same(click, fresh(explainer).explain(image, index, caption=caption))


def test_settings_are_part_of_the_key(explainer):

    image = picture(2)
    cached = fresh(explainer)
    first = cached.explain(image, 0)
    other = cached.explain(image, 0, settings=Settings(cam_method="LayerCAM"))
    assert first.maps["gradcam"].method == DEFAULTS.cam_method != "LayerCAM"
    assert other.maps["gradcam"].method == "LayerCAM"


def kilobyte(fill: int = 0) -> np.ndarray:
    """A value of exactly 1000 bytes."""
    return np.full(1000, fill, dtype=np.uint8)


def test_the_cache_evicts_least_recently_used_entries_at_its_byte_budget():
    cache = ImageCache(budget_bytes=3000, image_share=1.0)
    cache.put("a", "k1", kilobyte(1))
    cache.put("a", "k2", kilobyte(2))
    cache.put("b", "k1", kilobyte(3))
    assert cache.used_bytes() == 3000
    assert cache.get("a", "k1")[0] == 1  # touch a/k1: a/k2 is now the least recently used entry
    cache.put("c", "k1", kilobyte(4))
    assert cache.images() == ["b", "a", "c"]  # by their most recent use: b, then a (touched above), then c
    assert cache.get("a", "k2") is None  # one entry evicted, not image a
    assert [cache.get(*key)[0] for key in (("a", "k1"), ("b", "k1"), ("c", "k1"))] == [1, 3, 4]
    assert cache.used_bytes() == 3000 and cache.used_bytes("a") == 1000


def test_one_image_keeps_at_most_its_share_and_cannot_push_out_others():
    cache = ImageCache(budget_bytes=4000, image_share=0.5)
    cache.put("other", "k", kilobyte())
    for setting in range(5):  # one visitor trying every setting on one photo
        cache.put("big", setting, kilobyte(setting))
    assert cache.used_bytes("big") == 2000
    assert [key for key in range(5) if cache.get("big", key) is not None] == [3, 4]  # the most recent kept
    assert cache.get("other", "k") is not None


def test_a_value_larger_than_an_images_share_is_returned_but_not_stored():
    cache = ImageCache(budget_bytes=4000, image_share=0.5)
    cache.put("a", "small", kilobyte())
    assert cache.get_or_compute("a", "huge", lambda: np.zeros(2001, np.uint8)).nbytes == 2001
    assert cache.get("a", "huge") is None and cache.get("a", "small") is not None
    assert cache.used_bytes() == 1000


def test_storing_a_key_again_replaces_its_bytes():
    cache = ImageCache(budget_bytes=4000, image_share=1.0)
    cache.put("a", "k", kilobyte())
    cache.put("a", "k", np.zeros(1500, np.uint8))
    assert cache.used_bytes() == 1500 and cache.get("a", "k").nbytes == 1500


def test_explainers_for_other_captioners_share_the_budget_and_keep_their_entries_apart(explainer):
    first = fresh(explainer)
    second = first.with_captioner(tiny_captioner("vit-gpt2"))
    image = picture(14)
    first.caption(image)
    one_caption = first.cache.used_bytes()
    second.caption(image)  # its own caption, not served from the first explainer's entry
    assert first.cache.used_bytes() == second.cache.used_bytes() > one_caption
    assert first.caption(image).text != second.caption(image).text
    assert second.cache.budget_bytes == first.cache.budget_bytes


@pytest.mark.parametrize("arguments", [{"budget_bytes": 0}, {"image_share": 0.0}, {"image_share": 1.5}])
def test_a_bad_budget_is_refused(arguments):
    with pytest.raises(ValueError, match="budget|share"):
        ImageCache(**arguments)


@dataclass
class Record:
    array: np.ndarray
    same_array: np.ndarray
    parts: dict
    model: torch.nn.Module


def test_nbytes_walks_containers_once_and_skips_models():
    array = np.zeros((100, 100), dtype=np.float32)
    tensor = torch.zeros(1000)
    record = Record(array, array, {"tensor": tensor, "items": (array, [Image.new("L", (10, 10))])},
                    torch.nn.Linear(1000, 1000))
    counted = nbytes(record)
    buffers = array.nbytes + 4 * 1000 + 100  # the array once, the tensor, the image
    assert buffers < counted < buffers + 2000  # plus small Python objects; the model's 4 MB are not counted


def test_a_value_being_computed_is_computed_once_for_concurrent_callers():
    cache = ImageCache()
    started, release, calls, results = threading.Event(), threading.Event(), [], []

    def slow():
        calls.append(1)
        started.set()
        release.wait(10)
        return "segments"

    first = threading.Thread(target=lambda: results.append(cache.get_or_compute("a", "k", slow)))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.append(cache.get_or_compute("a", "k", slow)))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting for the first thread's value (or, wrongly, computing its own)
    release.set()
    first.join(10)
    second.join(10)
    assert results == ["segments", "segments"] and calls == [1]


def test_a_failed_computation_reaches_its_waiters_and_is_not_cached():
    cache = ImageCache()
    started, release, errors = threading.Event(), threading.Event(), []

    def failing():
        started.set()
        release.wait(10)
        raise RuntimeError("segmenter failed")

    def call():
        try:
            cache.get_or_compute("a", "k", failing)
        except RuntimeError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=call)]
    threads[0].start()
    started.wait(10)
    threads.append(threading.Thread(target=call))
    threads[1].start()
    threads[1].join(0.3)
    assert threads[1].is_alive()
    release.set()
    for thread in threads:
        thread.join(10)
    assert errors == ["segmenter failed"] * 2
    assert cache.get_or_compute("a", "k", lambda: "retried") == "retried"  # a later call tries again


def test_explainer_memory_is_bounded_in_bytes(explainer, monkeypatch):
    from ipag.attribution import AttributionPass

    one = fresh(explainer)
    one.explain(picture(3), 0)
    image_bytes = one.cache.used_bytes()  # its caption, segments and embeddings, one explanation
    bounded = fresh(explainer, cache_mb=4.5 * image_bytes / 2**20)  # an image's share: 1.1 images
    images = [picture(seed) for seed in (3, 4, 5, 11, 12, 13)]
    for image in images:
        last = bounded.explain(image, 0)
        assert bounded.cache.used_bytes() <= bounded.cache.budget_bytes
    assert bounded.cache.used_bytes(image_key(images[0])) == 0  # the oldest went first
    monkeypatch.setattr(AttributionPass, "token_gradients", lambda *args: pytest.fail("the newest was evicted"))
    assert_same(bounded.explain(images[-1], 0), last)  # the newest is kept whole


def test_background_precompute_never_serves_another_images_maps(explainer):
    shared = fresh(explainer)
    a, b = picture(6), picture(7)
    caption_a, caption_b = shared.caption(a), shared.caption(b)
    plan = shared.precompute_async(a, caption_a)
    results_b = []
    clicker = threading.Thread(target=lambda: results_b.extend(
        shared.explain(b, i, caption=caption_b) for i in range(min(3, len(caption_b.words)))))
    clicker.start()
    plan.wait(300)
    clicker.join(timeout=300)
    for index, result in enumerate(results_b):
        assert result.caption is caption_b
        assert_same(result, fresh(explainer).explain(b, index, caption=caption_b))
    assert_same(shared.explain(a, 0, caption=caption_a), fresh(explainer).explain(a, 0, caption=caption_a))


def test_equal_pixels_share_a_key_and_different_pixels_do_not():
    assert image_key(picture(8)) == image_key(picture(8))
    assert image_key(picture(8)) != image_key(picture(9))
    assert image_key(picture(8, (40, 30))) != image_key(picture(8, (30, 40)))


def test_a_cached_explanation_of_a_phone_photo_takes_less_than_a_megabyte(explainer, tmp_path):
    """A 12-megapixel JPEG (2048×1536 once loaded): maps stored at the resolution they are computed at, region
    masks packed, the image itself not kept. Before, one word took ~50 MB of maps and 16 MB of candidate masks,
    and the image's segments, proposals and pixels ~125 MB."""
    photo = load_image(phone_photo(tmp_path, 0))
    assert photo.size == (2048, 1536)
    cached = fresh(explainer)
    explanation = cached.explain(photo, 0, caption=cached.caption(photo, Settings(max_new_tokens=3)),
                                 settings=Settings(occlusion=True))
    assert explanation.grounding.mask.shape == (1536, 2048) and explanation.maps["gradcam"].values.shape == (1536, 2048)
    assert nbytes(explanation) < 1_000_000
    # everything the image has cached: its caption, segments, proposals and their embeddings, the stages of
    # this word (maps, region, occlusion sweep, trust numbers' passes)
    assert cached.cache.used_bytes(image_key(photo)) < 3_000_000
