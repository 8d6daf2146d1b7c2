"""The playground's functions, without a browser: captioning, clicks, queries, settings, export."""

import json
import zipfile

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import playground
from ipag import ui

EXAMPLE = "examples/chelsea.jpg"


@pytest.fixture(scope="module")
def captioned(explainer):
    segments, session, status = ui.caption_image(explainer, Image.open(EXAMPLE), 1, 12, ui.Session())
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
    session, rendered = ui.select_word(explainer, session, event.index, ui.View())
    word = session.caption.words[ui.word_for_segment(session.caption, word_segment)]
    assert session.explanation.words == (word,)
    assert session.query == word.index
    size = session.image.size
    assert rendered.region.size == size
    for key in ui.MAP_TITLES:
        if key == "occlusion":
            assert rendered.maps[key] is None  # off unless asked for: ~200 extra images
        else:
            assert rendered.maps[key].size == size, key
    assert rendered.candidates and rendered.candidates[0].startswith("1. ")
    measures = [row[0] for row in rendered.trust]
    assert "Word probability" in measures and "CLIP: region vs whole image" in measures
    assert word.text in rendered.status


def test_clicking_between_words_is_a_clear_message(explainer, captioned):
    segments, session, _ = captioned
    gap = next((i for i, (_, score) in enumerate(segments) if score is None), None)
    if gap is None:
        pytest.skip("caption has no text between words")
    with pytest.raises(ui.UserError, match="not a word"):
        ui.select_word(explainer, session, gap, ui.View())


def test_typed_query_and_bad_queries(explainer, captioned):
    _, session, _ = captioned
    session, rendered = ui.explain(explainer, session, "red car", ui.View())
    assert not session.explanation.in_caption and "prompt" in rendered.status
    for bad in ["", "   ", "x" * 5000]:
        with pytest.raises(ui.UserError):
            ui.explain(explainer, session, bad, ui.View())


def test_user_text_is_escaped_in_the_status(explainer, captioned):
    _, session, _ = captioned
    _, rendered = ui.explain(explainer, session, "<script>alert(1)</script> dog", ui.View())
    assert "<script>" not in rendered.status and "&lt;script&gt;" in rendered.status


def test_nothing_to_explain_before_an_image(explainer):
    with pytest.raises(ui.UserError, match="Upload an image"):
        ui.explain(explainer, ui.Session(), "dog", ui.View())
    segments, session, status = ui.caption_image(explainer, None, 1, 20, ui.Session())
    assert segments == [] and session.image is None and "Upload" in status


def test_bad_upload_is_a_clear_message(explainer, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ui.UserError, match="Cannot read"):
        ui.caption_image(explainer, str(bad), 1, 20, ui.Session())


def test_redraw_changes_only_the_drawing(explainer, captioned):
    _, session, _ = captioned
    session, first = ui.explain(explainer, session, 0, ui.View(opacity=0.2))
    again = ui.render(session, ui.View(opacity=0.9, colormap="viridis"))
    assert np.asarray(first.maps["gradcam"]).tolist() != np.asarray(again.maps["gradcam"]).tolist()
    assert first.trust == again.trust


def test_settings_reach_the_engine(explainer, captioned):
    _, session, _ = captioned
    view = ui.View(cam_method="LayerCAM", vision_layer=0, cross_attention_layer=0, saliency="SmoothGrad",
                   segmenter="superpixels", template="an image of {}", occlusion=True)
    session, rendered = ui.explain(explainer, session, 0, view)
    maps = session.explanation.maps
    assert rendered.maps["occlusion"].size == session.image.size
    assert any("Occlusion cost" in note for note in session.explanation.notes)
    assert maps["gradcam"].method == "LayerCAM" and maps["gradcam"].layer.endswith("layers.0")
    assert maps["cross_attention"].layer.startswith("decoder layer 0")
    assert maps["saliency"].method.startswith("SmoothGrad")
    assert session.explanation.grounding.prompt.startswith("an image of ")


def test_candidate_selection_shows_that_region(explainer, captioned):
    _, session, _ = captioned
    session, rendered = ui.explain(explainer, session, 0, ui.View())
    if len(rendered.candidates) < 2:
        pytest.skip("only one candidate")
    second, shown = ui.select_candidate(session, rendered.candidates[1], ui.View())
    assert second.candidate == 1
    assert np.asarray(shown.region).tolist() != np.asarray(rendered.region).tolist()


def test_export_writes_pngs_and_json(explainer, captioned):
    _, session, _ = captioned
    with pytest.raises(ui.UserError, match="Explain a word first"):
        ui.export(session, ui.View())
    session, _ = ui.explain(explainer, session, 1, ui.View())
    path = ui.export(session, ui.View())
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        data = json.loads(archive.read("explanation.json"))
    assert {"explanation.json", "image.png", "region.png", "region_mask.png", "gradcam.png",
            "gradcam_overlay.png", "saliency_overlay.png", "cross_attention_overlay.png"} <= names
    assert data["words"] == [session.explanation.words[0].text]


def test_api_functions(explainer):
    caption = ui.api_caption(explainer, Image.open(EXAMPLE), 1, 10)
    assert caption["text"] and caption["words"]
    word = caption["words"][0]["text"]
    details, region, gradcam, *rest = ui.api_explain(explainer, Image.open(EXAMPLE), word)
    assert details["words"] == [word] and details["in_caption"]
    assert region.size == gradcam.size == Image.open(EXAMPLE).size


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


def test_warm_examples_caches_every_word_of_every_example(explainer):
    from ipag import load_image

    fresh = type(explainer)(explainer.captioner, explainer.clip, "superpixels")
    ui.warm_examples(fresh, playground.EXAMPLES[:2])
    fresh._background.submit(lambda: None).result(timeout=300)  # wait for the background queue to drain
    fresh._attribute = lambda *args, **kwargs: pytest.fail("a warmed-up word was recomputed")
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
    assert gpt2._background is explainer._background  # one background job at a time across captioners
    started = []
    for each in (explainer, gpt2):
        each.precompute_async = lambda *args, **kwargs: started.append(args)
    try:
        rows = ui.compare_captions(explainers, ["blip-base", "vit-gpt2"], Image.open(EXAMPLE), 1, 8)
    finally:
        del explainer.precompute_async, gpt2.precompute_async
    assert started == []  # comparing does not queue a precompute per captioner
    assert len(rows) == 2
    assert "".join(t for t, _ in rows[1]) == gpt2.caption(Image.open(EXAMPLE), max_new_tokens=8).text
    _, session, _ = ui.caption_image(gpt2, Image.open(EXAMPLE), 1, 8, ui.Session())
    session, rendered = ui.explain(gpt2, session, 0, ui.View())
    assert session.explanation.caption.captioner.startswith("vit-gpt2")
    with pytest.raises(ui.UserError, match="Upload an image"):
        ui.compare_captions(explainers, ["blip-base"], None, 1, 8)
