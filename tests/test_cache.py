"""The cached path: same answers as a fresh computation, bounded memory, never another image's maps."""

import threading

import numpy as np
import pytest
from PIL import Image

from ipag import Explainer, Settings
from ipag.cache import ImageCache, image_key


def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def fresh(explainer: Explainer, cache_size: int = 8) -> Explainer:
    """A new explainer (empty caches) over the same models."""
    return Explainer(explainer.captioner, explainer.clip, "superpixels", cache_size=cache_size)


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
    other = cached.explain(image, 0, settings=Settings(cam_method="HiResCAM"))
    assert first.maps["gradcam"].method == "GradCAM" and other.maps["gradcam"].method == "HiResCAM"


def test_the_cache_evicts_least_recently_used_images():
    cache = ImageCache(capacity=2)
    cache.put("a", "k", 1)
    cache.put("b", "k", 2)
    assert cache.get("a", "k") == 1  # touch a: b is now the oldest
    cache.put("c", "k", 3)
    assert cache.images() == ["a", "c"]
    assert cache.get("b", "k") is None
    with pytest.raises(ValueError):
        ImageCache(capacity=0)


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


def test_explainer_memory_is_bounded_by_images(explainer):
    bounded = fresh(explainer, cache_size=2)
    images = [picture(seed) for seed in (3, 4, 5)]
    for image in images:
        bounded.explain(image, 0)
    assert bounded.cache.images() == [image_key(images[1]), image_key(images[2])]


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
