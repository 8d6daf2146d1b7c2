"""The page's path: one worker runs model work most-urgent-first, a click joins or raises queued work instead of
repeating it, results arrive stage by stage, and equal settings always make equal cache keys."""

import threading
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from ipag import Explainer, Settings
from ipag.attribution import AttributionPass
from ipag.cache import ImageCache
from ipag.schedule import Priority, Scheduler
from tests.helpers import expected_maps


def picture(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


class Recorder:
    """Works for the scheduler that record the order they ran in; `gate` holds the first one until released."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def work(self, name: str, hold: bool = False):
        def run(publish):
            self.ran.append(name)
            if hold:
                self.started.set()
                assert self.gate.wait(30)
            publish(("img", name), f"value of {name}")
        return run


def key(name: str):
    return ("img", name)


@pytest.fixture()
def busy():
    """A scheduler whose worker is held inside a first task ("first") until `recorder.gate` is set."""
    scheduler, recorder = Scheduler(ImageCache()), Recorder()
    scheduler.request([key("first")], recorder.work("first", hold=True), Priority.BACKGROUND)
    assert recorder.started.wait(30)
    yield scheduler, recorder
    recorder.gate.set()


def test_clicks_go_before_the_background_and_captions_before_clicks(busy):
    scheduler, recorder = busy
    background = [scheduler.request([key(n)], recorder.work(n), Priority.BACKGROUND)[key(n)] for n in "ab"]
    click = scheduler.request([key("click")], recorder.work("click"), Priority.CLICK)[key("click")]
    caption = scheduler.request([key("caption")], recorder.work("caption"), Priority.CAPTION)[key("caption")]
    recorder.gate.set()
    assert [f.result(30) for f in (caption, click, *background)] == [
        "value of caption", "value of click", "value of a", "value of b"]
    assert recorder.ran == ["first", "caption", "click", "a", "b"]


def test_asking_for_queued_work_raises_it_instead_of_queueing_it_twice(busy):
    scheduler, recorder = busy
    for name in "abc":
        scheduler.request([key(name)], recorder.work(name), Priority.BACKGROUND)
    again = scheduler.request([key("c")], recorder.work("c-again"), Priority.CLICK)[key("c")]
    recorder.gate.set()
    assert again.result(30) == "value of c"
    scheduler.result(key("b"), recorder.work("b-again"))  # done by then: from the cache
    assert recorder.ran == ["first", "c", "a", "b"]


def test_asking_for_the_running_work_waits_for_it(busy):
    scheduler, recorder = busy
    joined = scheduler.request([key("first")], recorder.work("first-again"), Priority.CLICK)[key("first")]
    assert not joined.done()
    recorder.gate.set()
    assert joined.result(30) == "value of first" and recorder.ran == ["first"]
    assert scheduler.cache.get("img", "first") == "value of first"


def test_newer_plans_run_first_and_a_cancelled_plan_keeps_what_a_click_asked_for(busy):
    scheduler, recorder = busy
    old, new = scheduler.new_plan(), scheduler.new_plan()
    for name in ("old-1", "old-2"):
        scheduler.request([key(name)], recorder.work(name), Priority.BACKGROUND, old)
    scheduler.request([key("new")], recorder.work("new"), Priority.BACKGROUND, new)
    wanted = scheduler.request([key("old-2")], recorder.work("x"), Priority.CLICK)[key("old-2")]
    old.cancel()
    recorder.gate.set()
    assert wanted.result(30) == "value of old-2"
    new.wait(30)
    assert recorder.ran == ["first", "old-2", "new"]  # old-1 was dropped, old-2 was asked for
    assert old.tasks[0].futures[key("old-1")].cancelled()


def test_a_failure_reaches_every_waiter_and_the_worker_goes_on():
    scheduler = Scheduler(ImageCache())

    def failing(publish):
        raise RuntimeError("segmenter failed")

    future = scheduler.request([key("bad")], failing, Priority.CLICK)[key("bad")]
    with pytest.raises(RuntimeError, match="segmenter failed"):
        future.result(30)
    assert scheduler.result(key("good"), Recorder().work("good"), timeout=30) == "value of good"


def test_a_task_that_publishes_too_little_is_an_error_not_a_hang():
    scheduler = Scheduler(ImageCache())
    futures = scheduler.request([key("a"), key("b")], lambda publish: publish(key("a"), 1), Priority.CLICK)
    assert futures[key("a")].result(30) == 1
    with pytest.raises(RuntimeError, match="without publishing"):
        futures[key("b")].result(30)


def test_the_idle_callback_runs_when_the_queue_empties():
    scheduler = Scheduler(ImageCache())
    idle = threading.Event()
    scheduler.on_idle(idle.set)
    scheduler.result(key("a"), Recorder().work("a"), timeout=30)
    assert idle.wait(30) and scheduler.idle()


# --- the explainer on the scheduler ------------------------------------------------------------------------------

@contextmanager
def counted_backward_passes():
    """Counts the words' backward passes, per target, while active."""
    counts: dict[tuple, int] = {}
    original = AttributionPass.token_gradients

    def counted(attribution, target):
        counts[target.positions] = counts.get(target.positions, 0) + 1
        return original(attribution, target)

    AttributionPass.token_gradients = counted
    try:
        yield counts
    finally:
        AttributionPass.token_gradients = original


def fresh(explainer: Explainer) -> Explainer:
    return Explainer(explainer.captioner, explainer.clip, "superpixels")


def test_after_the_precompute_a_click_runs_no_backward_pass(explainer):
    image, engine = picture(1), fresh(explainer)
    caption = engine.caption(image)
    engine.precompute_async(image, caption).wait(300)
    with counted_backward_passes() as counts:
        for index in range(len(caption.words)):
            assert engine.explain(image, index, caption=caption).verification is not None
    assert counts == {}


def test_a_click_during_the_precompute_computes_each_word_once_overall(explainer):
    image, engine = picture(2), fresh(explainer)
    caption = engine.caption(image)
    assert len(caption.words) >= 3
    with counted_backward_passes() as counts:
        plan = engine.precompute_async(image, caption)
        last = len(caption.words) - 1
        clicked = engine.explain(image, last, caption=caption)  # the precompute's last word, asked for first
        plan.wait(300)
        assert clicked.words[0].index == last
    assert sorted(counts) == sorted(word.token_positions for word in caption.words)
    assert set(counts.values()) == {1}


def test_stages_arrive_in_order_and_say_what_is_still_coming(explainer, photo, caption, monkeypatch):
    """Each stage is shown as soon as it is ready, with what is still coming; a stage that is already done when
    the previous one is shown does not cost an update of its own."""
    import time

    from ipag.grounding import Grounder

    engine = fresh(explainer)
    for cls, name in ((AttributionPass, "pixel_gradients"), (Grounder, "ground"), (Grounder, "prepare")):
        slow = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *args, _slow=slow, **kwargs: time.sleep(0.3) or _slow(*args, **kwargs))
    stages = list(engine.explain_stages(photo, 0, caption, Settings(occlusion=True)))
    token_maps = {"gradcam", "cross_attention", "attention"}  # from the backward pass through the decoder only
    assert [set(s.maps) for s in stages[:2]] == [token_maps, expected_maps(engine.captioner, Settings(grounding=False))]
    names = ("saliency", "region", "more maps", "trust numbers")
    pending = [s.pending for s in stages]
    assert pending[:2] == [names, names[1:]] and pending[-1] == ()
    assert all(p == names[len(names) - len(p):] for p in pending)  # what is still coming: the later stages
    assert all(len(a) > len(b) for a, b in zip(pending, pending[1:]))  # each update brings something new
    assert stages[0].grounding is None and stages[1].grounding is None and stages[-1].verification is not None
    assert {"clip_relevance", "occlusion"} <= set(stages[-1].maps)
    assert all(s.word_logprob == stages[-1].word_logprob for s in stages)
    cached = list(engine.explain_stages(photo, 0, caption, Settings(occlusion=True)))
    assert len(cached) == 1 and cached[0].pending == ()  # all cached: one update, complete


def test_equal_settings_make_equal_keys_however_they_were_asked_for(explainer, photo, caption):
    engine = fresh(explainer)
    layers = len(engine.captioner.vision_layers)
    engine.explain(photo, 1, caption=caption)  # the defaults: last block, default layer and segmenter
    spelled_out = engine.resolve(Settings())
    assert spelled_out.vision_layer == layers - 1 and spelled_out.segmenter == "superpixels"
    with counted_backward_passes() as counts:
        engine.explain(photo, 1, caption=caption, settings=Settings(
            vision_layer=layers - 1, cross_attention_layer=spelled_out.cross_attention_layer, segmenter="superpixels"))
        engine.explain(photo, 1, caption=caption, settings=Settings(opacity=0.9, colormap="gray"))  # drawing only
    assert counts == {}


def test_a_changed_setting_changes_its_own_stage_and_nothing_else(explainer, photo, caption, monkeypatch):
    engine = fresh(explainer)
    engine.explain(photo, 0, caption=caption)
    grounded: list[str] = []
    original = type(engine.clip).encode_text
    monkeypatch.setattr(type(engine.clip), "encode_text", lambda clip, texts: grounded.extend(texts) or original(
        clip, texts))
    with counted_backward_passes() as counts:
        other_cam = engine.explain(photo, 0, caption=caption, settings=Settings(cam_method="HiResCAM"))
    assert counts and not grounded  # new maps; the region was not looked for again
    assert other_cam.maps["gradcam"].method == "HiResCAM"
    with counted_backward_passes() as counts:
        other_prompt = engine.explain(photo, 0, caption=caption, settings=Settings(template="an image of {}"))
    assert not counts and grounded  # the region (and CLIP map) again; the backward pass was reused
    assert other_prompt.grounding.prompt.startswith("an image of ")
