"""The playground's functions, without a browser: captioning, clicks, queries, settings, export."""

import json
from dataclasses import replace
import zipfile

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import playground
from ipag import Settings, ui
from ipag.settings import DEFAULTS
from tests.helpers import expected_maps

EXAMPLE = "examples/chelsea.jpg"


@pytest.fixture(scope="module")
def captioned(explainer):
    segments, session, status = ui.caption_image(explainer, Image.open(EXAMPLE), Settings(max_new_tokens=12),
                                                 ui.Session(), precompute=False)
    return segments, session, status


def test_caption_segments_make_every_word_clickable(captioned):
    segments, session, status = captioned
    caption = session.caption
    assert "".join(text for text, _ in segments) == caption.text
    scored = [(text, score) for text, score in segments if score is not None]
    assert [text for text, _ in scored] == [w.text for w in caption.words]
    assert all(0.0 <= score <= 1.0 for _, score in scored)
    assert f"{len(caption.words)} words" in status


def test_word_for_segment_inverts_the_segments(captioned):
    segments, session, _ = captioned
    words = [ui.word_for_segment(session.caption, i) for i in range(len(segments))]
    assert [w for w in words if w is not None] == list(range(len(session.caption.words)))
    assert ui.word_for_segment(session.caption, len(segments)) is None


def test_select_handler_explains_the_clicked_word(explainer, captioned):
    segments, session, _ = captioned
    # Gradio calls the handler with a SelectData built from the browser event; build the same here.
    word_segment = next(i for i, (_, score) in enumerate(segments) if score is not None and i > 0)
    event = gr.SelectData(None, {"index": word_segment, "value": segments[word_segment][0], "selected": True})
    shown = list(ui.select_word(explainer, session, event.index, Settings()))
    session, rendered = shown[-1]
    maps = [list(stage.explanation.maps) for stage, _ in shown]
    resent = [update.grid is not None for _, update in shown]
    assert resent == [now != before for now, before in zip(maps, [None, *maps])]  # only when the maps changed
    assert resent[0] and not all(resent)  # the region's and the trust numbers' stages add no map
    grid = next(update.grid for _, update in reversed(shown) if update.grid is not None)
    word = session.caption.words[ui.word_for_segment(session.caption, word_segment)]
    assert session.explanation.words == (word,)
    assert session.query == word.index
    size = session.image.size
    assert rendered.picture.size == size and session.view == ui.DEFAULT_VIEW
    for key in ui.views():
        session, shown = ui.select_view(session, key, Settings())
        if key in ("occlusion", "integrated_gradients"):  # off unless asked for: they cost many extra passes
            assert shown.picture is None and "is off — turn it on in Settings" in shown.label
        else:
            assert shown.picture.size == size and shown.label, key
        assert shown.grid is None  # a view change redraws the large view only
    with pytest.raises(ui.UserError, match="Unknown view"):
        ui.select_view(session, "lrp", Settings())
    assert rendered.candidates and rendered.candidates[0].startswith("1. ")
    assert [caption for _, caption in grid] == [ui.map_title(key) for key in session.explanation.maps]
    assert f"is {ui._percent(word.probability)} sure of “{word.text}”" in rendered.summary
    assert all(part in rendered.summary for part in ("the picture", "CLIP", "Shown only that region"))
    assert rendered.trust.headers[1].startswith("In the region (chance ")
    assert [row[0] for row in rendered.trust.rows] == [ui.map_title(key) for key in session.explanation.maps]
    assert word.text in rendered.status


def test_clicking_between_words_is_a_clear_message(explainer, captioned):
    segments, session, _ = captioned
    gap = next((i for i, (_, score) in enumerate(segments) if score is None), None)
    if gap is None:
        pytest.skip("caption has no text between words")
    with pytest.raises(ui.UserError, match="not a word"):
        list(ui.select_word(explainer, session, gap, Settings()))


def test_typed_query_and_bad_queries(explainer, captioned):
    _, session, _ = captioned
    *_, (session, rendered) = ui.explain(explainer, session, "red car", Settings())
    assert not session.explanation.in_caption and "prompt" in rendered.status
    for bad in ["", "   ", "x" * 5000]:
        with pytest.raises(ui.UserError):
            list(ui.explain(explainer, session, bad, Settings()))


def test_user_text_is_escaped_in_the_status(explainer, captioned):
    _, session, _ = captioned
    *_, (_, rendered) = ui.explain(explainer, session, "<script>alert(1)</script> dog", Settings())
    assert "<script>" not in rendered.status and "&lt;script&gt;" in rendered.status


def test_nothing_to_explain_before_an_image(explainer):
    with pytest.raises(ui.UserError, match="Upload an image"):
        list(ui.explain(explainer, ui.Session(), "dog", Settings()))
    segments, session, status = ui.caption_image(explainer, None, Settings(), ui.Session())
    assert segments == [] and session.image is None and "Upload" in status


def test_bad_upload_is_a_clear_message(explainer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ui.UserError, match="Cannot read"):
        ui.caption_image(explainer, str(bad), Settings(), ui.Session())


def test_redraw_changes_only_the_drawing(explainer, captioned):
    _, session, _ = captioned
    *_, (session, first) = ui.explain(explainer, session, 0, Settings(opacity=0.2))
    again = ui.render(session, Settings(opacity=0.9, colormap="viridis"))
    assert np.asarray(first.picture).tolist() != np.asarray(again.picture).tolist()
    assert first.trust == again.trust


def test_settings_reach_the_engine(explainer, captioned):
    _, session, _ = captioned
    settings = Settings(cam_method="LayerCAM", vision_layer=0, cross_attention_layer=0, saliency="SmoothGrad",
                        segmenter="superpixels", template="an image of {}", occlusion=True)
    *_, (session, rendered) = ui.explain(explainer, session, 0, settings)
    maps = session.explanation.maps
    session, shown = ui.select_view(session, "occlusion", settings)
    assert shown.picture.size == session.image.size  # drawn at the image size (it is small)
    assert any("Occlusion cost" in note for note in session.explanation.notes)
    assert maps["gradcam"].method == "LayerCAM" and maps["gradcam"].layer.endswith("layers.0")
    assert maps["cross_attention"].layer.startswith("decoder layer 0")
    assert maps["saliency"].method.startswith("SmoothGrad")
    assert session.explanation.grounding.prompt.startswith("an image of ")


def test_candidate_selection_shows_that_region(explainer, captioned):
    _, session, _ = captioned
    session = replace(session, view="region")
    *_, (session, rendered) = ui.explain(explainer, session, 0, Settings())
    if len(rendered.candidates) < 2:
        pytest.skip("only one candidate")
    second, shown = ui.select_candidate(explainer, session, rendered.candidates[1], Settings())
    assert second.candidate == 1 and second.view == "region"  # the picture shows the region picked
    assert np.asarray(shown.picture).tolist() != np.asarray(rendered.picture).tolist()
    chosen = session.explanation.grounding.candidates[1]
    assert second.explanation.grounding.label == chosen.label and chosen.label in shown.status
    assert second.explanation.verification.clip_region == pytest.approx(chosen.similarity)
    again, _ = ui.select_candidate(explainer, second, rendered.candidates[0], Settings())
    assert again.explanation.verification == session.explanation.verification  # back to the chosen region


def test_export_writes_pngs_and_json(explainer, captioned):
    _, session, _ = captioned
    with pytest.raises(ui.UserError, match="Explain a word first"):
        ui.export(explainer, session, Settings())
    *_, (session, _) = ui.explain(explainer, session, 1, Settings())
    path = ui.export(explainer, session, Settings())
    folder = f"01-{session.explanation.words[0].text}"
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        data = json.loads(archive.read(f"{folder}/explanation.json"))
        index = json.loads(archive.read("image.json"))
    assert {"image.png", "image.json"} | {f"{folder}/{name}" for name in (
        "explanation.json", "region.png", "region_mask.png", "gradcam.png", "gradcam_overlay.png",
        "saliency_overlay.png", "cross_attention_overlay.png")} <= names
    assert data["words"] == [session.explanation.words[0].text] and index["explanations"][0]["folder"] == folder
    assert data["captioner"] == session.caption.captioner and data["settings"]["cam_method"] == DEFAULTS.cam_method
    assert data["ground_truth"] is None and data["sanity"] is None  # a photo; no sanity check run
    for _ in ui.sanity_check(explainer, session):
        pass
    with zipfile.ZipFile(ui.export(explainer, session, Settings())) as archive:
        sanity = json.loads(archive.read(f"{folder}/explanation.json"))["sanity"]
    assert sanity["basis"].startswith("all ") and set(sanity["verdicts"]) <= set(session.explanation.maps)


def test_api_functions(explainer):
    settings = Settings(max_new_tokens=10)
    caption = ui.api_caption(explainer, Image.open(EXAMPLE), settings)
    assert caption["text"] and caption["words"]
    word = caption["words"][0]["text"]
    explained, drawings = ui.api_explain(explainer, Image.open(EXAMPLE), text=word, settings=settings)
    explanation = explained.explanation
    assert [w.text for w in explanation.words] == [word] and explanation.in_caption
    assert explained.truth is None and explained.sanity is None
    assert {"region"} | expected_maps(explainer.captioner) == set(drawings)
    assert drawings["region"].size == drawings["gradcam"].size == Image.open(EXAMPLE).size
    by_position, _ = ui.api_explain(explainer, Image.open(EXAMPLE), word=len(caption["words"]) - 1,
                                    settings=settings)
    assert by_position.explanation.words[0].index == len(caption["words"]) - 1
    for bad in (dict(), dict(word=0, text="dog"), dict(text="   ")):
        with pytest.raises(ui.UserError, match="either a word position"):
            ui.api_explain(explainer, Image.open(EXAMPLE), settings=settings, **bad)


def test_a_repeated_word_is_addressed_by_its_occurrence(explainer):
    from ipag.ui import _occurrence

    caption = explainer.caption_from_ids(None, explainer.captioner.start_ids() + explainer.captioner.tokenize(
        "a dog and a cat"), [0.0] * 5)
    assert [_occurrence(caption, "a", n) for n in (1, 2)] == [0, 3]
    assert _occurrence(caption, "DOG", 1) == 1
    assert _occurrence(caption, "red car", 1) == "red car"  # not a caption word: a phrase or free query
    with pytest.raises(ui.UserError, match="2 time"):
        _occurrence(caption, "a", 3)
    with pytest.raises(ui.UserError, match="counts from 1"):
        _occurrence(caption, "a", 0)


def test_command_line_options():
    args = playground.parse_args(["--tiny", "--share", "--auth", "ann:secret", "--host", "0.0.0.0", "--port", "9000",
                                  "--device", "cpu", "--segmenter", "superpixels"])
    assert args.tiny and args.share and args.auth == "ann:secret" and args.port == 9000
    with pytest.raises(SystemExit):
        playground.parse_args(["--auth", "no-colon"])


def test_the_page_builds_with_named_api_endpoints(explainer):
    demo = playground.build_app(explainer)
    names = {dep.api_name for dep in demo.fns.values() if dep.api_visibility == "public"}
    assert {"caption", "explain"} <= names


def test_warm_examples_caches_every_word_of_every_example(explainer, monkeypatch):
    from ipag import load_image
    from ipag.attribution import AttributionPass

    fresh = type(explainer)(explainer.captioner, explainer.clip, "superpixels")
    ui.warm_examples(fresh, playground.EXAMPLES[:2])
    assert fresh.wait_until_idle(300)  # the background work drained
    monkeypatch.setattr(AttributionPass, "token_gradients",
                        lambda *args: pytest.fail("a warmed-up word was recomputed"))
    for path in playground.EXAMPLES[:2]:
        image = load_image(path)
        caption = fresh.caption(image)
        for index in range(len(caption.words)):
            assert fresh.explain(image, index, caption=caption).words[0].index == index


def test_the_captioner_choice_reaches_the_engine(explainer):
    from ipag import Explainers
    from ipag.captioners import tiny_captioner

    loaded = []

    def load(name):
        loaded.append(name)
        return tiny_captioner(name)

    explainers = Explainers(explainer, "blip-base", load)
    gpt2 = explainers.get("vit-gpt2")
    assert loaded == ["vit-gpt2"] and explainers.get("vit-gpt2") is gpt2  # loaded once
    assert gpt2.captioner.name == "vit-gpt2" and gpt2.clip is explainer.clip  # CLIP shared
    assert gpt2.scheduler is explainer.scheduler  # one job at a time across captioners
    started = []
    for each in (explainer, gpt2):
        each.precompute_async = lambda *args, **kwargs: started.append(args)
    try:
        rows = ui.compare_captions(explainers, ["blip-base", "vit-gpt2"], Image.open(EXAMPLE),
                                   Settings(max_new_tokens=8))
    finally:
        del explainer.precompute_async, gpt2.precompute_async
    assert started == []  # comparing does not queue a precompute per captioner
    assert len(rows) == 2
    assert "".join(t for t, _ in rows[1]) == gpt2.caption(Image.open(EXAMPLE), Settings(max_new_tokens=8)).text
    _, session, _ = ui.caption_image(gpt2, Image.open(EXAMPLE), Settings(max_new_tokens=8), ui.Session(),
                                     precompute=False)
    *_, (session, rendered) = ui.explain(gpt2, session, 0, Settings())
    assert session.explanation.caption.captioner.startswith("vit-gpt2")
    assert rendered.summary.startswith("<p><strong>ViT-GPT2 is ") and "BLIP" not in rendered.summary
    with pytest.raises(ui.UserError, match="Upload an image"):
        ui.compare_captions(explainers, ["blip-base"], None, Settings())


@pytest.mark.parametrize("delta, reading", [(-0.8, "blurring the region away lowers its log p by 0.80"),
                                            (0.12, "blurring the region away raises its log p by 0.12"),
                                            (0.0002, "blurring the region away barely changes it"),
                                            (-0.0002, "blurring the region away barely changes it"),
                                            (-0.004, "blurring the region away barely changes it")])  # not "by 0.00"
def test_the_blurred_region_reading_follows_its_sign(explainer, captioned, delta, reading):
    _, session, _ = captioned
    *_, (session, _) = ui.explain(explainer, session, 0, Settings(max_new_tokens=12))
    explanation = session.explanation
    changed = replace(explanation, verification=replace(explanation.verification, delta_logprob_blurred=delta))
    assert reading in ui.summary(changed, "BLIP")


def test_the_status_says_which_phrase_was_grounded_and_when_clip_cannot_decide(explainer, captioned):
    _, session, _ = captioned
    *_, (session, rendered) = ui.explain(explainer, session, 0, Settings())
    grounding = session.explanation.grounding
    decided = replace(grounding, query="brown <dog>", rival=None)
    sentence = ui.region_sentence(decided)
    assert sentence.startswith("Region of “brown &lt;dog&gt;”: <strong>") and "cannot decide" not in sentence
    rival = replace(grounding.candidates[1], label="segment, left, 9% of the image", probability=grounding.score / 1.2)
    undecided = replace(decided, rival=rival)
    assert not undecided.decided
    sentence = ui.region_sentence(undecided)
    assert "CLIP cannot decide" in sentence and "segment, left, 9% of the image" in sentence
    shown = ui.render(replace(session, explanation=replace(session.explanation, grounding=undecided), view="region"),
                      Settings())
    assert "CLIP cannot decide" in shown.status and "(CLIP cannot decide)" in shown.label
    assert replace(undecided, rival=replace(rival, probability=grounding.score / 1.6)).decided  # 1.6 × its rival's


@pytest.mark.parametrize("evidence, reading", [(0.74, "the picture made it likelier (+0.74)"),
                                               (0.01, "the picture barely changed it (+0.01)"),
                                               (-0.2, "it is likelier without the picture (-0.20)")])
def test_the_summary_says_whether_the_picture_mattered(explainer, captioned, evidence, reading):
    _, session, _ = captioned
    *_, (session, _) = ui.explain(explainer, session, 0, Settings(max_new_tokens=12))
    explanation = session.explanation
    changed = replace(explanation, prior_logprob=explanation.word_logprob - evidence)
    assert reading in ui.summary(changed, "BLIP")


def test_the_region_summary_says_how_decided_clip_was(explainer, captioned):
    _, session, _ = captioned
    *_, (session, _) = ui.explain(explainer, session, 0, Settings(max_new_tokens=12))
    grounding = session.explanation.grounding
    first, second = (replace(candidate, members=(index,)) for index, candidate in enumerate(grounding.candidates[:2]))
    flat = replace(grounding, label=first.label, baseline_won=False, score=0.11, candidates=(first, second),
                   rival=replace(second, probability=0.1))
    clear = replace(flat, score=0.6)
    elsewhere = f"best elsewhere: {second.label}, p 0.10"
    assert ui.region_summary(flat) == f"CLIP barely prefers {first.label} (p 0.11; {elsewhere})"
    assert ui.region_summary(clear) == f"CLIP prefers {first.label} (p 0.60; {elsewhere})"
    assert ui.region_summary(replace(clear, rival=None)) == f"CLIP chose {first.label} (p 0.60)"
    assert ui.region_summary(clear.choose(1)).startswith(f"you chose {second.label}")


def test_a_switched_off_or_failed_map_says_so(explainer, captioned, monkeypatch):
    from ipag.maps import LeGradMap

    _, session, _ = captioned
    monkeypatch.setattr(LeGradMap, "_raw", lambda self, context: 1 / 0)
    *_, (session, rendered) = ui.explain(explainer, session, 2, Settings(max_new_tokens=12))
    assert "legrad" not in session.explanation.maps
    _, shown = ui.select_view(session, "legrad", Settings())
    assert shown.picture is None
    assert shown.label == "The LeGrad map could not be computed (ZeroDivisionError: division by zero)."
    assert shown.label in rendered.status  # the status line says it too
    _, shown = ui.select_view(session, "integrated_gradients", Settings())
    assert shown.label == "**Integrated gradients** is off — turn it on in Settings (Maps)."


def test_word_readiness_marks_the_caption_until_every_word_is_explained(explainer):
    from ipag.schedule import Plan

    image = Image.open("examples/rocket.jpg")
    fresh = type(explainer)(explainer.captioner, explainer.clip, "superpixels")
    _, session, _ = ui.caption_image(fresh, image, Settings(max_new_tokens=8), ui.Session())
    segments, label, changing = ui.readiness(session)
    plain = ui.caption_segments(session.caption)
    words = [i for i, (_, score) in enumerate(plain) if score is not None]
    assert changing and label == ui.CAPTION_MARKED and len(segments) == len(plain)
    assert all(segments[i][0].split("\u2009")[0] == plain[i][0] for i in words)  # the word, then its mark
    assert all(segments[i][0][-1] in "✓⟳◐○" for i in words)
    assert fresh.wait_until_idle(300)
    assert ui.readiness(session) == (plain, ui.CAPTION_READY, False)
    assert ui.readiness(replace(session, plan=None)) == (plain, ui.CAPTION_LABEL, False)
    assert ui.readiness(replace(session, plan=Plan(fresh.scheduler, 0))) == (plain, ui.CAPTION_LABEL, False)


def test_a_constant_map_is_undefined_in_the_sanity_check_never_a_pass(explainer, captioned):
    """A map that is zero everywhere (as Grad-CAM is when no channel pushes the word) has no rank correlation:
    every step of the cascade says "undefined", and so does the verdict; the JSON has null, not NaN."""
    from ipag.results import Heatmap
    from ipag.sanity import SanityCascade, compare

    _, session, _ = captioned
    *_, (session, _) = ui.explain(explainer, session, 0, Settings(max_new_tokens=12))
    explanation = session.explanation
    gradcam = explanation.maps["gradcam"]
    flat = Heatmap.make(np.zeros_like(gradcam.raw), gradcam.size, gradcam.method, gradcam.layer)
    constant = replace(explanation, maps={**explanation.maps, "gradcam": flat})
    steps = [compare(constant, explanation, blocks, 2) for blocks in (1, 2)]
    table = ui.sanity_table(constant, steps, [1, 2])
    rows = {row[0]: row for row in table.rows}
    assert rows["Grad-CAM"][1:] == ["undefined", "undefined", ui.VERDICTS["undefined"]]
    assert ui.VERDICTS["undefined"].startswith("undefined")
    assert all(row[-1] in (ui.VERDICTS["passes"], ui.VERDICTS["fails"]) for title, row in rows.items()
               if title != "Grad-CAM" and row[1] != "—")
    record = SanityCascade(tuple(steps)).to_dict()
    assert record["verdicts"]["gradcam"] == "undefined" and "gradcam" not in steps[-1].flagged
    assert record["steps"][-1]["correlations"]["gradcam"] is None
    assert table.headers == ["Map", "top 1", "all 2 (verdict)", "Verdict"]


@pytest.fixture(scope="module")
def vlm_explainer(tmp_path_factory):
    """The page's explainer with a tiny random LLaVA (a folder, as a user's download) and the tiny CLIP."""
    from ipag import Explainer
    from ipag.captioners.tiny_vlms import save_tiny

    return Explainer.tiny(captioner=str(save_tiny("llava", tmp_path_factory.mktemp("llava"))))


def test_the_instruction_box_is_shown_only_for_a_captioner_that_takes_one(explainer, vlm_explainer):
    from ipag.captioners.vlm import DEFAULT_INSTRUCTION

    decoding = next(iter(ui.PANELS))
    blip = ui.settings_panels(explainer)[decoding]["instruction"]
    llava = ui.settings_panels(vlm_explainer)[decoding]["instruction"]
    assert blip.kind == llava.kind == "text" and not blip.options["visible"] and blip.options["value"] is None
    assert llava.options["visible"] and llava.options["placeholder"] == DEFAULT_INSTRUCTION  # what empty asks


def test_the_caption_is_labelled_as_the_answer_to_its_instruction(explainer, vlm_explainer):
    image = Image.open(EXAMPLE)
    asked = Settings(max_new_tokens=4, instruction="What does this show?")
    _, session, _ = ui.caption_image(vlm_explainer, image, asked, ui.Session(), precompute=False)
    assert ui.readiness(session)[1] == "Answer to “What does this show?” — click a word (colour: its probability)"
    assert ui.api_caption(vlm_explainer, image, asked)["instruction"] == "What does this show?"
    assert "does this show" not in session.caption.text.lower()  # the prompt is not part of the caption
    long = replace(session.caption, instruction="Describe " + "every object in this picture, " * 10)
    label = ui.caption_label(long, ui.CAPTION_LABEL)
    assert label.startswith("Answer to “Describe every object") and "…”" in label and len(label) < 120
    _, blip, _ = ui.caption_image(explainer, image, asked, ui.Session(), precompute=False)
    assert ui.readiness(blip)[1] == ui.CAPTION_LABEL  # BLIP was asked nothing


def test_a_bad_instruction_from_the_page_is_a_message():
    for bad, message in (("What?\x1b[2J", "control characters"), ("?" * 600, "too long")):
        with pytest.raises(ui.UserError, match=message):
            playground._settings({"instruction": bad})


def test_switching_the_captioner_shows_or_hides_the_instruction_box(vlm_explainer):
    from ipag import Explainers
    from ipag.captioners import tiny_captioner
    from ipag.captioners.vlm import DEFAULT_INSTRUCTION

    demo = playground.build_app(Explainers(vlm_explainer, "llava", tiny_captioner, ["blip-base"]))
    switch = next(dep.fn for dep in demo.fns.values() if getattr(dep.fn, "__name__", "") == "on_captioner")
    (shown, _), (hidden, _) = switch("llava"), switch("blip-base")
    assert shown["visible"] and shown["placeholder"] == DEFAULT_INSTRUCTION
    assert not hidden["visible"] and hidden["placeholder"] is None
