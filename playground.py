"""IPAG playground: upload a photo, click a caption word, see why the captioner said it.

    python playground.py --tiny          # tiny random models, offline, for trying the UI
    python playground.py                 # BLIP-base + CLIP ViT-B/32 (downloaded once, then cached)

This file only lays out the page and wires components to the plain functions of `ipag.ui`.
"""

from __future__ import annotations

import argparse
import functools
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from ipag import Explainer, Explainers, ModelUnavailableError
from ipag import ui
from ipag.captioners import KNOWN_CAPTIONERS, load_captioner, tiny_captioner
from ipag.cli import add_model_arguments, load_explainer
from ipag.maps import CAM_METHODS
from ipag.render import COLORMAPS
from ipag.segmenters import available_segmenters

EXAMPLES = sorted(str(p) for p in (Path(__file__).parent / "examples").glob("*.jpg"))
INTRO = """# IPAG playground — why did the captioner say that?
Upload a photo (or use the webcam, paste one, or pick an example). BLIP captions it; **click any caption word**
(or type one) to see the image region CLIP matches to it, the Grad-CAM and saliency of BLIP's own
log-probability for that word, and numbers that say how far to trust them."""


#: Local system fonts only: the page must not fetch anything from the internet (offline use, privacy).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def friendly(fn: Callable) -> Callable:
    """Turn the errors a user can act on into a message in the page; the app keeps running."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ui.UserError, ModelUnavailableError) as err:
            raise gr.Error(str(err), print_exception=False) from err
    return wrapper


def build_app(explainers: Explainers | Explainer) -> gr.Blocks:
    """The page. Every handler is a thin adapter from components to `ipag.ui` and back."""
    if isinstance(explainers, Explainer):
        explainers = Explainers(explainers, "default", lambda name: explainers.captioner)
    explainer = explainers.get()
    names = list(dict.fromkeys([explainers.default, *KNOWN_CAPTIONERS])) if explainers.default in KNOWN_CAPTIONERS \
        else [explainers.default]
    vision_layers = len(explainer.captioner.vision_layers)
    decoder_layers = explainer.captioner.num_decoder_layers
    default_cross = (2 * decoder_layers) // 3 if decoder_layers >= 3 else decoder_layers - 1

    # Gradio finds its special arguments (event data, progress) only among the positional parameters,
    # so they come before the *values of the settings components.
    def outputs_for(session: ui.Session, rendered: ui.Rendered) -> tuple:
        candidate = rendered.candidates[session.candidate] if rendered.candidates else None
        return (session, rendered.region, *(rendered.maps[key] for key in ui.MAP_TITLES),
                gr.update(choices=rendered.candidates, value=candidate), rendered.trust, rendered.status,
                rendered.details)

    with gr.Blocks(title="IPAG playground") as demo:
        session = gr.State(ui.Session())
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                # type="filepath": our loader decodes the upload, with its size checks (decompression bombs).
                image = gr.Image(type="filepath", sources=["upload", "webcam", "clipboard"], label="Image",
                                 height=380, elem_id="image")
                with gr.Accordion("Captioner and decoding", open=False):
                    captioner = gr.Dropdown(names, value=explainers.default, label="Captioner", elem_id="captioner")
                    beams = gr.Slider(1, 8, value=1, step=1, label="Beam size (1 = greedy)")
                    max_tokens = gr.Slider(5, 60, value=20, step=1, label="Max new tokens")
                caption_button = gr.Button("Caption again", variant="secondary")
                gr.Examples(EXAMPLES, inputs=image, label="Examples (public domain / CC0, see examples/)")
            with gr.Column(scale=3):
                caption = gr.HighlightedText(label="Caption — click a word (colour: its probability)",
                                             show_legend=False, show_inline_category=False, elem_id="caption")
                with gr.Row():
                    query = gr.Textbox(placeholder="…or type a word or phrase and press Enter", show_label=False,
                                       max_lines=1, max_length=500, scale=4, elem_id="query")
                    explain_button = gr.Button("Explain", variant="primary", scale=1, elem_id="explain")
                status = gr.Markdown(ui.NO_WORD, elem_id="status")
                with gr.Row():
                    region = gr.Image(label="Region CLIP matches to the word", interactive=False,
                                      elem_id="region")
                    gradcam = gr.Image(label=ui.MAP_TITLES["gradcam"], interactive=False, elem_id="map-gradcam")
                    saliency = gr.Image(label=ui.MAP_TITLES["saliency"], interactive=False, elem_id="map-saliency")
                candidates = gr.Radio(label="Candidate regions (the chosen one first)", choices=[],
                                      elem_id="candidates")
                with gr.Accordion("More maps: decoder cross-attention, CLIP relevance, occlusion", open=False):
                    with gr.Row():
                        cross = gr.Image(label=ui.MAP_TITLES["cross_attention"], interactive=False,
                                         elem_id="map-cross_attention")
                        relevance = gr.Image(label=ui.MAP_TITLES["clip_relevance"], interactive=False,
                                             elem_id="map-clip_relevance")
                        occluded = gr.Image(label=ui.MAP_TITLES["occlusion"], interactive=False,
                                            elem_id="map-occlusion")
                with gr.Accordion("Compare captioners (click a word in any of them)", open=False):
                    compare_button = gr.Button("Caption with every captioner", elem_id="compare")
                    compared = [gr.HighlightedText(label=name, show_legend=False, show_inline_category=False,
                                                   elem_id=f"compare-{name}") for name in names]
                trust = gr.Dataframe(headers=["Measure", "Value", "How to read it"], label="How far to trust this",
                                     interactive=False, wrap=True, column_widths=["32%", "18%", "50%"],
                                     elem_id="trust")
        with gr.Accordion("Settings", open=False):
            with gr.Row():
                cam_method = gr.Dropdown(list(CAM_METHODS), value="GradCAM", label="CAM method")
                vision_layer = gr.Slider(-vision_layers, vision_layers - 1, value=-1, step=1,
                                         label="Vision block for Grad-CAM (-1 = last)")
                cross_layer = gr.Slider(-decoder_layers, decoder_layers - 1, value=default_cross, step=1,
                                        label="Decoder layer for cross-attention")
                saliency_method = gr.Radio(["gradient", "SmoothGrad"], value="gradient", label="Saliency")
            with gr.Row():
                segmenter = gr.Dropdown(available_segmenters(), value=explainer.default_segmenter,
                                        label="Segmenter (region proposals)")
                template = gr.Textbox("a photo of {}", label="CLIP prompt template ({} = the word)", max_lines=1)
                stage2 = gr.Checkbox(False, label="Stage II: refine with superpixels")
                fusion = gr.Slider(0, 20, value=0, step=0.5, label="Grad-CAM fusion weight (0 = CLIP alone)")
                occlusion = gr.Checkbox(False, label="Occlusion map (model-agnostic: 225 occluded copies of the "
                                        "image, slower)")
            with gr.Row():
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                colormap = gr.Dropdown(list(COLORMAPS), value="jet", label="Colour map")
        with gr.Row():
            export_button = gr.Button("Export this explanation (PNGs + JSON)", elem_id="export")
            download = gr.File(label="Download", interactive=False, height=80, elem_id="download")
        with gr.Accordion("Raw result (JSON)", open=False):
            details = gr.JSON()

        settings = [cam_method, vision_layer, cross_layer, saliency_method, segmenter, template, stage2, fusion,
                    occlusion, opacity, colormap]
        explained = [session, region, gradcam, saliency, cross, relevance, occluded, candidates, trust, status,
                     details]

        @friendly
        def on_image(picture, name, beam_size, tokens, state, progress=gr.Progress()):
            progress(0.2, desc="Captioning…")
            segments, state, message = ui.caption_image(explainers.get(name), picture, beam_size, tokens, state)
            state = replace(state, captioner=name)
            blank = ui.render(state, ui.View())
            blank.status = message
            return (segments, *outputs_for(state, blank))

        @friendly
        def on_select(state, evt: gr.SelectData, progress=gr.Progress(), *values):
            progress(0.2, desc="Explaining the word…")
            return outputs_for(*ui.select_word(explainers.get(state.captioner), state, evt.index, ui.View.of(*values)))

        def on_compare_select(name):
            @friendly
            def handler(state, beam_size, tokens, evt: gr.SelectData, progress=gr.Progress(), *values):
                progress(0.2, desc=f"Explaining the word with {name}…")
                chosen = explainers.get(name)
                segments, state, _ = ui.caption_image(chosen, state.image, beam_size, tokens, state)
                session, rendered = ui.select_word(chosen, replace(state, captioner=name), evt.index,
                                                   ui.View.of(*values))
                return (segments, gr.update(value=name), *outputs_for(session, rendered))
            return handler

        @friendly
        def on_compare(state, beam_size, tokens, progress=gr.Progress()):
            progress(0.1, desc="Captioning with every captioner…")
            return ui.compare_captions(explainers, names, state.image, beam_size, tokens)

        @friendly
        def on_query(text, state, progress=gr.Progress(), *values):
            progress(0.2, desc="Explaining the query…")
            return outputs_for(*ui.explain(explainers.get(state.captioner), state, text, ui.View.of(*values)))

        @friendly
        def on_settings(state, progress=gr.Progress(), *values):
            if state.explanation is None:
                return outputs_for(state, ui.render(state, ui.View.of(*values)))
            progress(0.2, desc="Recomputing with the new settings…")
            return outputs_for(*ui.explain(explainers.get(state.captioner), state, state.query, ui.View.of(*values)))

        @friendly
        def on_redraw(state, *values):
            return outputs_for(state, ui.render(state, ui.View.of(*values)))

        @friendly
        def on_candidate(label, state, *values):
            return outputs_for(*ui.select_candidate(state, label, ui.View.of(*values)))

        @friendly
        def on_export(state, *values):
            return ui.export(state, ui.View.of(*values))

        gr.on([image.change, caption_button.click, captioner.input], on_image,
              [image, captioner, beams, max_tokens, session], [caption, *explained], api_visibility="private")
        compare_button.click(on_compare, [session, beams, max_tokens], compared, api_visibility="private")
        for name, component in zip(names, compared):
            component.select(on_compare_select(name), [session, beams, max_tokens, *settings],
                             [caption, captioner, *explained], api_visibility="private")
        caption.select(on_select, [session, *settings], explained, api_visibility="private")
        gr.on([explain_button.click, query.submit], on_query, [query, session, *settings], explained,
              api_visibility="private")
        for control in (cam_method, vision_layer, cross_layer, saliency_method, segmenter, template, stage2, fusion,
                        occlusion):
            control.input(on_settings, [session, *settings], explained, api_visibility="private")
        for control in (opacity, colormap):
            control.input(on_redraw, [session, *settings], explained, api_visibility="private",
                          show_progress="hidden")
        candidates.input(on_candidate, [candidates, session, *settings], explained, api_visibility="private")
        export_button.click(on_export, [session, *settings], download, api_visibility="private")

        # Stateless API endpoints for gradio_client (see README): /caption and /explain.
        with gr.Column(visible=False):
            api_image = gr.File(file_types=["image"], label="image")  # decoded by our loader, with its checks
            api_query = gr.Textbox(label="query")
            api_beams = gr.Number(1, label="num_beams", precision=0)
            api_tokens = gr.Number(20, label="max_tokens", precision=0)
            api_cam = gr.Dropdown(list(CAM_METHODS), value="GradCAM", label="cam_method")
            api_saliency = gr.Dropdown(["gradient", "SmoothGrad"], value="gradient", label="saliency")
            api_template = gr.Textbox("a photo of {}", label="template")
            api_json = gr.JSON(label="result")
            api_maps = [gr.Image(type="pil", label=name) for name in ("region", *ui.MAP_TITLES)]
        gr.Button(visible=False).click(
            friendly(functools.partial(ui.api_caption, explainer)), [api_image, api_beams, api_tokens], api_json,
            api_name="caption")
        gr.Button(visible=False).click(
            friendly(functools.partial(ui.api_explain, explainer)),
            [api_image, api_query, api_cam, api_saliency, api_template], [api_json, *api_maps], api_name="explain")
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for your network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login for the page and the API")
    parser.add_argument("--concurrency", type=int, default=2, help="explanations computed at the same time")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes USER:PASS")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        explainer = load_explainer(args)
    except ModelUnavailableError as err:
        raise SystemExit(f"error: {err}") from err
    device = explainer.captioner.device
    load = (lambda name: tiny_captioner(name, 0, device)) if args.tiny else (lambda name: load_captioner(name, device))
    demo = build_app(Explainers(explainer, args.captioner, load))
    threading.Thread(target=ui.warm_examples, args=(explainer, EXAMPLES), daemon=True).start()
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                max_file_size="25mb", theme=THEME)


if __name__ == "__main__":
    main()
