"""Issue 25's machinery, without timing anything: precision per stage and its agreement gate, the stage budget,
bounded chunks for integrated gradients and occlusion, the caption streamed while it is written, and the
Hugging Face Space's entry point. How fast things are lives in `python -m ipag.bench` and scripts/bench_page.py.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipag import Explainer, ModelUnavailableError, Settings, budget, precision, ui
from ipag.captioners.base import DecodeOptions
from ipag.cli import main as cli_main
from ipag.evaluation.precision import POINTING_WITHIN, agreement, precision_record, precision_summary
from ipag.maps import IntegratedGradientsMap, MapContext, Occlusion
from ipag.precision import ACCEPTED, FLOAT32, STAGES, Precision, choose_precision
from ipag.target import Target

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


# --- precision ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bfloat16_for_the_accepted_stages_only_where_the_processor_has_it(monkeypatch, native):
    monkeypatch.setattr(precision, "bfloat16_native", lambda device: native)
    assert choose_precision("auto", CPU) == (Precision(ACCEPTED) if native else FLOAT32)
    assert choose_precision("float32", CPU) == FLOAT32  # forced, whatever the processor has


def test_bfloat16_forced_where_it_is_not_native_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(precision, "bfloat16_native", lambda device: False)
    with pytest.raises(ModelUnavailableError, match="no native bfloat16.*--precision"):
        choose_precision("bfloat16", CPU)
    monkeypatch.setattr(precision, "bfloat16_native", lambda device: True)
    assert choose_precision("bfloat16", CPU).bfloat16 == frozenset(STAGES)
    with pytest.raises(ValueError, match="Unknown precision"):
        choose_precision("float16", CPU)


def test_the_cpu_probe_matches_the_processor_flags():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if not flags or not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("needs Linux and torch's CPU probe")
    assert precision.bfloat16_native(CPU) == ("avx512_bf16" in flags)
    assert not precision.bfloat16_native(torch.device("meta"))


def test_each_stage_runs_in_its_own_precision(photo):
    """The gradients stage in bfloat16 changes the word's log-probability and maps a little; the caption stage,
    still float32, generates exactly as before; the explainer hands its precision to the models."""
    exact = Explainer.tiny(seed=0)
    assert exact.captioner.precision == FLOAT32 and exact.clip.precision == FLOAT32
    caption = exact.caption(photo, Settings(max_new_tokens=6))
    reference = exact.explain(photo, 0, caption, Settings(grounding=False))
    mixed = Explainer.tiny(seed=0)
    mixed.captioner.precision = Precision(frozenset({"gradients"}))
    assert mixed.caption(photo, Settings(max_new_tokens=6)).token_logprobs == caption.token_logprobs
    changed = mixed.explain(photo, 0, caption, Settings(grounding=False))
    assert changed.word_logprob != reference.word_logprob
    assert changed.word_logprob == pytest.approx(reference.word_logprob, abs=0.05)
    forced = Explainer(mixed.captioner, mixed.clip, precision="float32")
    assert forced.captioner.precision == forced.clip.precision == FLOAT32
    other = Explainer.tiny(seed=1, captioner="vit-gpt2").captioner
    assert Explainer(mixed.captioner, None, precision="float32").with_captioner(other).captioner.precision == FLOAT32


def test_the_command_line_takes_precision_and_refuses_what_cannot_run(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(precision, "bfloat16_native", lambda device: False)
    status = cli_main(["explain", str(ROOT / "examples" / "coffee.jpg"), "--tiny", "--precision", "bfloat16",
                       "--out", str(tmp_path)])
    assert status == 2 and "no native bfloat16" in capsys.readouterr().err


# --- the agreement gate -----------------------------------------------------------------------------------------

def _record(spearman: float, pointing: tuple[float, float], same_caption: bool = True) -> dict:
    word = {"word_index": 0, "maps": {"gradcam:GradCAM": {"spearman": spearman, "pointing": list(pointing)},
                                      "saliency": {"spearman": 1.0, "pointing": [1.0, 1.0]}},
            "right_object": [True, True]}
    return {"seed": 0, "stages": {"gradients": {"same_caption": same_caption, "words": [word]}}}


def test_the_gate_accepts_agreeing_maps_and_names_what_disagrees():
    accepted = precision_summary([_record(0.99, (1.0, 1.0))] * 3)["gradients"]
    assert accepted["accepted"] and accepted["failed"] == []
    assert accepted["maps"]["gradcam:GradCAM"]["spearman"] == pytest.approx(0.99)
    low = precision_summary([_record(0.9, (1.0, 1.0))])["gradients"]
    assert not low["accepted"] and low["failed"] == ["gradcam:GradCAM"]
    moved = precision_summary([_record(0.99, (1.0, 1.0)), _record(0.99, (0.0, 1.0))])["gradients"]
    assert moved["maps"]["gradcam:GradCAM"]["pointing_bfloat16"] - moved["maps"]["gradcam:GradCAM"]["pointing_float32"] > POINTING_WITHIN
    assert moved["failed"] == ["gradcam:GradCAM"]
    assert precision_summary([_record(1.0, (1.0, 1.0), same_caption=False)])["gradients"]["failed"] == ["caption"]


def test_agreement_of_constant_maps():
    zeros, ramp = np.zeros((4, 4)), np.arange(16.0).reshape(4, 4)
    assert agreement(zeros, zeros) == 1.0 and agreement(zeros, ramp) == 0.0
    assert agreement(ramp, ramp * 2 + 1) == pytest.approx(1.0)
    assert agreement(ramp, -ramp) == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def synthetic():
    return Explainer.synthetic(precision="float32")


def test_the_gate_on_the_synthetic_models(synthetic):
    """On a generated scene, with the gradients stage in bfloat16: every map and Grad-CAM weighting is compared
    with float32 and its pointing game taken in both; the shipped models' maps stay close (ρ well above 0.5 on
    average: a sign flip or noise would drag it towards 0)."""
    record = precision_record(synthetic, 2, ["gradients"])
    words = record["stages"]["gradients"]["words"]
    assert words and record["stages"]["gradients"]["same_caption"]
    for word in words:
        assert {"gradcam:GradCAM", "gradcam:EigenGradCAM", "gradcam:HiResCAM", "saliency", "occlusion",
                "integrated_gradients"} <= set(word["maps"])
        for scores in word["maps"].values():
            assert -1.0 <= scores["spearman"] <= 1.0 and all(0.0 <= p <= 1.0 for p in scores["pointing"])
    summary = precision_summary([record])["gradients"]
    assert np.mean([scores["spearman"] for scores in summary["maps"].values()]) > 0.8
    assert summary["maps"]["occlusion"]["spearman"] == pytest.approx(1.0)  # not computed in the gradients stage


# --- the budget ---------------------------------------------------------------------------------------------------

def test_sections_record_their_own_time_only_while_recording():
    with budget.section("caption"):  # nobody records: nothing is kept
        pass
    with budget.recording() as spent:
        with budget.section("segmentation"):
            time.sleep(0.05)
            with budget.section("CLIP proposals"):
                time.sleep(0.03)
        thread = threading.Thread(target=_draw)  # another thread's sections count too
        thread.start()
        thread.join()
    assert set(spent.seconds) == {"segmentation", "CLIP proposals", "drawing"}
    assert 0.045 <= spent.seconds["segmentation"] < 0.075 and spent.seconds["CLIP proposals"] >= 0.025
    assert [name for name, _, _ in spent.ordered()] == ["segmentation", "CLIP proposals", "drawing"]
    again = budget.Budget.from_dict(spent.to_dict())
    assert again.seconds == spent.seconds and again.calls == spent.calls
    table = budget.format_budget(spent, wall=0.1)
    assert "segmentation" in table and "(no section)" in table and "wall time" in table


def _draw() -> None:
    with budget.section("drawing"):
        pass


def test_a_words_stages_fill_the_budget(photo):
    explainer = Explainer.tiny(seed=0)
    with budget.recording() as spent, budget.sections_of(ui, "render", "drawing"):
        session = ui.Session(image=photo, caption=explainer.caption(photo, Settings(max_new_tokens=6)))
        *_, (session, _) = ui.explain(explainer, session, 0, Settings())
    assert {"caption", "forward", "decoder backward", "vision backward", "map weighting", "segmentation",
            "CLIP proposals", "CLIP query", "more maps", "trust forwards", "region caption", "drawing"} <= set(spent.seconds)
    assert spent.calls["forward"] == 1  # the click's stages follow each other: its forward pass is not redone
    assert ui.render.__name__ == "render" and not hasattr(ui.render, "__wrapped__")  # put back


def test_median_budget():
    one, two, three = budget.Budget(), budget.Budget(), budget.Budget()
    for spent, seconds in ((one, 1.0), (two, 5.0), (three, 2.0)):
        spent.add("forward", seconds)
    two.add("drawing", 1.0)
    merged = budget.Budget.median([one, two, three])
    assert merged.seconds == {"forward": 2.0, "drawing": 0.0}


# --- bounded chunks -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def word_context(photo):
    explainer = Explainer.tiny(seed=0)
    caption = explainer.caption(photo, Settings(max_new_tokens=6))
    captioner = explainer.captioner
    return MapContext(photo.size, captioner=captioner, pixel_values=captioner.preprocess(photo),
                      token_ids=caption.token_ids, target=Target(caption.words[0].token_positions), image=photo)


def test_integrated_gradients_in_chunks_equal_one_batch(word_context):
    whole, delta, _ = IntegratedGradientsMap(steps=8, batch_size=8).compute(word_context)
    for chunk in (1, 3):
        chunked, chunked_delta, _ = IntegratedGradientsMap(steps=8, batch_size=chunk).compute(word_context)
        np.testing.assert_allclose(chunked, whole, rtol=1e-4, atol=1e-6 * np.abs(whole).max())
        assert chunked_delta == pytest.approx(delta, abs=1e-5)


def test_occlusion_in_chunks_equals_larger_batches(word_context):
    captioner, pixels, ids = word_context.captioner, word_context.pixel_values, word_context.token_ids
    small = Occlusion(patch=0.25, batch_size=2).sweep(captioner, pixels, ids)
    large = Occlusion(patch=0.25, batch_size=64).sweep(captioner, pixels, ids)
    np.testing.assert_allclose(small.logprobs, large.logprobs, atol=1e-5)
    assert small.cost.forward_passes > large.cost.forward_passes


# --- the caption, streamed -------------------------------------------------------------------------------------------

def test_the_caption_streams_word_by_word_and_ends_with_the_cached_caption():
    explainer = Explainer.tiny(seed=0)
    image = Image.open(ROOT / "examples" / "coffee.jpg")
    settings = Settings(max_new_tokens=8)
    slow = explainer.captioner.generator.generate

    def generate(*args, streamer=None, **kwargs):  # slow tokens, so that the reader sees every one
        class Slow:
            def put(self, value):
                time.sleep(0.05)
                streamer.put(value)

            def end(self):
                streamer.end()

        return slow(*args, streamer=Slow() if streamer else None, **kwargs)

    explainer.captioner.generator.generate = generate
    *written, caption = explainer.caption_stream(image, settings)
    assert written and all(isinstance(text, str) for text in written)
    assert all(caption.text.startswith(text) for text in written) and written[-1] == caption.text
    assert [len(text.split()) for text in written] == sorted(len(text.split()) for text in written)
    assert explainer.caption(image, settings) is caption  # cached as `caption` caches it
    assert list(explainer.caption_stream(image, settings)) == [caption]  # computed before: nothing to stream
    beams = list(explainer.caption_stream(image, Settings(max_new_tokens=8, num_beams=2)))
    assert len(beams) == 1  # beam search decides at the end


def test_the_page_shows_the_caption_while_it_is_written_and_words_only_after():
    explainer = Explainer.tiny(seed=0)
    image = str(ROOT / "examples" / "rocket.jpg")
    steps = list(ui.caption_image_stream(explainer, image, Settings(max_new_tokens=6), ui.Session()))
    *writing, (segments, session, status) = steps
    for partial, interim, message in writing:
        assert len(partial) == 1 and partial[0][1] is None  # one unclickable segment
        assert interim.caption is None and interim.image is not None and message == ui.WRITING
        with pytest.raises(ui.UserError, match="being written"):
            next(ui.select_word(explainer, interim, 0, Settings()))
    assert session.caption is not None and "words" in status
    with pytest.raises(ui.UserError):  # not an image: the loader's message
        list(ui.caption_image_stream(explainer, str(ROOT / "README.md"), Settings(), ui.Session()))


# --- the Space ------------------------------------------------------------------------------------------------------

def test_space_readme_front_matter_names_the_entry_point_and_sdk():
    import yaml

    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["sdk"] == "gradio" and front["app_file"] == "app.py" and (ROOT / front["app_file"]).exists()
    import gradio

    assert front["sdk_version"].split(".")[0] == gradio.__version__.split(".")[0]


def test_space_options_come_from_the_environment_then_the_command_line(monkeypatch):
    import app

    monkeypatch.setenv("PORT", "7999")
    monkeypatch.setenv("IPAG_ARGS", "--tiny --concurrency 3 --auth 'ann:a secret'")
    args = app.space_arguments(["--concurrency", "1"])
    assert (args.host, args.port, args.tiny, args.auth, args.concurrency) == ("0.0.0.0", 7999, True, "ann:a secret", 1)


def test_space_entry_point_starts_and_serves_the_page(tmp_path):
    """`python app.py` as a Space runs it (port from $PORT), here with --tiny (in IPAG_ARGS, as a Space's settings
    would give it) so that nothing is downloaded."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1"], cwd=ROOT,
                               env={**os.environ, "PORT": str(port), "OMP_NUM_THREADS": "1", "IPAG_ARGS": "--tiny"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        else:
            pytest.fail("the Space's page did not come up")
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert "precision" in output  # the start-up says what it computes in


def test_the_written_caption_is_shown_at_most_every_stream_interval(monkeypatch):
    """The page's threads share the interpreter lock with generation: updates are throttled, the first shown at
    once, the complete caption always."""
    explainer = Explainer.tiny(seed=0)
    image = str(ROOT / "examples" / "rocket.jpg")
    monkeypatch.setattr(ui, "STREAM_INTERVAL", 3600.0)
    *writing, (segments, session, _) = ui.caption_image_stream(explainer, image, Settings(max_new_tokens=6),
                                                               ui.Session())
    assert len(writing) == 1 and session.caption is not None and segments


def test_bfloat16_generation_caches_weight_casts_and_leaves_the_weights_frozen():
    """Autocast caches the casts of weights that require gradients only: during a bfloat16 generation the weights
    run once per token are marked (so each is cast once, not once per token), never outside it, nor the vision
    encoder's, run once (their cached copies would only hold memory); a float32 generation marks nothing; scoring
    a caption, one forward, marks nothing either."""
    captioner = Explainer.tiny(seed=0).captioner
    head = [module for module in captioner.generator.modules() if isinstance(module, torch.nn.Linear)][-1]
    vision = next(module for module in captioner.vision_layers[0].modules() if isinstance(module, torch.nn.Linear))
    seen: dict[str, list] = {"head": [], "vision": []}  # per call: its weight marked?, gradients on?
    for name, module in (("head", head), ("vision", vision)):
        module.register_forward_pre_hook(lambda module, _, name=name: seen[name].append(
            (module.weight.requires_grad, torch.is_grad_enabled())))
    pixels = captioner.preprocess(Image.new("RGB", (32, 32), (90, 30, 200)))
    for stages, marked in ((frozenset({"caption", "scoring"}), True), (frozenset(), False)):
        captioner.precision = Precision(stages)
        for calls in seen.values():
            calls.clear()
        captioner.generate_scored(pixels, DecodeOptions(max_new_tokens=4))
        assert len(seen["head"]) == 4 and all(state == (marked, False) for state in seen["head"])
        assert seen["vision"] == [(False, False)]
        captioner.token_logprobs(pixels, captioner.generate(pixels, DecodeOptions(max_new_tokens=4)))
        assert seen["head"][-1] == (False, False)
        assert not any(parameter.requires_grad for parameter in captioner.model.parameters())
