"""Plugins: docs/plugins.md's example map type, as printed, registered at run time and installed as an entry point of
a throw-away distribution, used everywhere a built-in map is; and captioners and segmenters registered the same
ways."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

import playground
from ipag import Explainer, Settings, cli, ui
from ipag.attribution import target_gradients
from ipag.captioners import CAPTIONERS, known_captioners, tiny_captioner
from ipag.evaluation.faithfulness import image_faithfulness
from ipag.evaluation.groundtruth import scene_record
from ipag.export import export_files
from ipag.maps import MAP_TYPES, MapType, register
from ipag.segmenters import SEGMENTERS, load_segmenter
from ipag.target import Target
from tests.helpers import registered

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"

#: A segmenter and a captioner of a plugin package (with the map of the docs, the three entry point groups).
OTHER_PLUGINS = '''
import numpy as np
from ipag import Explainer  # noqa: F401 — a plugin may import anything from the package
from ipag.captioners import BlipCaptioner
from ipag.segmenters import Segment, Segmenter


class Halves(Segmenter):
    """The left and the right half of the image."""

    name = "halves"

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(None)

    def describe(self) -> str:
        return "two halves"

    def _segment(self, rgb: np.ndarray) -> list[Segment]:
        left = np.zeros(rgb.shape[:2], dtype=bool)
        left[:, : rgb.shape[1] // 2] = True
        return [Segment(left, "left", None, self.name), Segment(~left, "right", None, self.name)]


class PluginBlip(BlipCaptioner):
    name = "plugin-blip"
    model_types = ()
    models = {"plugin-blip": "nowhere/plugin-blip"}
'''


def example_source() -> str:
    """The page's complete map type: its first Python block."""
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]


@pytest.fixture(scope="module")
def blurred(tmp_path_factory) -> type[MapType]:
    """The example's class, imported from a file of its own and registered for this module's tests."""
    path = tmp_path_factory.mktemp("plugin") / "blurred_saliency.py"
    path.write_text(example_source())
    spec = importlib.util.spec_from_file_location("blurred_saliency", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with registered(MAP_TYPES, module.BlurredSaliency):
        yield module.BlurredSaliency


def test_the_example_is_a_complete_map_type_of_about_30_lines():
    lines = [line for line in example_source().splitlines() if line.strip()]
    assert 20 <= len(lines) <= 35


def test_a_registered_map_is_computed_with_each_word_as_its_setting_asks(blurred, explainer, photo, caption):
    settings = Settings(blur_sigma=3.0, grounding=False, verify=False)
    explanation = explainer.explain(photo, 1, caption=caption, settings=settings)
    heatmap = explanation.maps["blurred_saliency"]
    assert heatmap.method == "saliency blurred (σ = 3 px)" and heatmap.values.shape == (47, 61)
    resolved = explainer.resolve(settings)
    ((_, gradients),) = target_gradients(explainer.captioner, explainer.captioner.preprocess(photo), caption.token_ids,
                                         [Target(caption.words[1].token_positions)], resolved.vision_layer,
                                         resolved.cross_attention_layer)
    expected = gaussian_filter(np.abs(gradients.pixels[0]).sum(axis=0), 3.0)  # computed here, not by the plugin
    np.testing.assert_allclose(heatmap.raw, expected, rtol=2e-3, atol=1e-6 * expected.max())
    sharper = explainer.explain(photo, 1, caption=caption, settings=Settings(blur_sigma=0.5, grounding=False,
                                                                             verify=False))
    assert sharper.maps["blurred_saliency"].raw.std() > heatmap.raw.std()  # the setting reached the map


def test_a_registered_setting_is_checked_once_against_its_declaration(blurred):
    assert Settings(blur_sigma=8.0).blur_sigma == 8.0 and Settings().blur_sigma == 2.0
    assert Settings(blur_sigma=2.0) == Settings()  # a default value is no difference
    with pytest.raises(ValueError, match="blur_sigma must be between 0 and 8, got 9"):
        Settings(blur_sigma=9.0)
    with pytest.raises(ValueError, match="blur_sigma must be a float"):
        Settings.from_values({"blur_sigma": "wide"})
    assert Settings.from_values({"blur_sigma": 4}).blur_sigma == 4.0  # JSON's int for a float
    with pytest.raises(ValueError, match="taken"):
        register(type("Again", (blurred,), {"key": "blurred_again"}))  # its setting name is declared already


def test_a_registered_map_is_in_the_page_the_api_and_the_export(blurred, explainer, photo, tmp_path):
    assert ui.views()["blurred_saliency"] == "Blurred saliency"
    slider = ui.settings_panels(explainer)["Maps"]["blur_sigma"]
    assert slider.kind == "slider" and slider.options == {"minimum": 0.0, "maximum": 8.0, "step": 0.5, "value": 2.0,
                                                          "label": "Blurred saliency: σ (pixels)"}
    page = playground.build_app(explainer)
    assert any(getattr(block, "elem_id", None) == "settings-blur_sigma" for block in page.blocks.values())
    exported, drawings = ui.api_explain(explainer, photo, word=1, settings=Settings(grounding=False))
    explanation = exported.explanation
    assert "blurred_saliency" in exported.record()["maps"] and drawings["blurred_saliency"].size == photo.size
    session = ui.Session(image=photo, caption=explanation.caption, explanation=explanation, view="blurred_saliency")
    rendered = ui.render(session, Settings())
    assert rendered.picture is not None and "Blurred saliency" in rendered.label
    assert {"blurred_saliency.png", "blurred_saliency_overlay.png"} <= set(export_files(photo, explanation, Settings()))


def test_a_registered_map_is_written_by_the_cli_with_its_option(blurred, photo, tmp_path):
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "out"
    assert cli.main(["explain", str(tmp_path / "photo.png"), "--out", str(out), "--tiny", "--device", "cpu",
                     "--max-new-tokens", "3", "--no-grounding", "--blur-sigma", "1.5"]) == 0
    index = json.loads((out / "photo" / "image.json").read_text())
    assert index["settings"]["blur_sigma"] == 1.5
    folder = out / "photo" / index["explanations"][0]["folder"]
    assert (folder / "blurred_saliency_overlay.png").is_file()


def test_a_registered_map_is_scored_by_both_evaluations(blurred, explainer, tmp_path):
    record = scene_record(Explainer.synthetic(), 3, settings=Settings(verify=False))
    assert all("blurred_saliency" in word["maps"] for word in record["words"]) and record["words"]
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(tmp_path / "noise.png")
    faithful = image_faithfulness(explainer, tmp_path / "noise.png", 0, settings=Settings(max_new_tokens=2),
                                  steps=2, road_percentiles=())
    assert faithful["words"] and all("blurred_saliency" in word["maps"] for word in faithful["words"])


def test_registration_refuses_what_breaks_the_contract(blurred):
    with pytest.raises(TypeError, match="subclasses of MapType"):
        register(object)
    with pytest.raises(ValueError, match="taken"):
        register(type("Clash", (blurred,), {"key": "gradcam", "declares": {}}))
    with pytest.raises(ValueError, match="names files"):
        register(type("Spaced", (blurred,), {"key": "two words", "declares": {}}))
    with pytest.raises(ValueError, match="needs"):
        register(type("Needy", (blurred,), {"key": "needy", "declares": {}, "needs": "everything"}))
    assert "needy" not in MAP_TYPES and "two words" not in MAP_TYPES


def test_segmenters_and_captioners_register_at_run_time(explainer, photo, caption):
    namespace: dict = {}
    exec(OTHER_PLUGINS, namespace)
    halves, plugin_blip = namespace["Halves"], namespace["PluginBlip"]
    with registered(SEGMENTERS, halves), registered(CAPTIONERS, plugin_blip):
        assert load_segmenter("halves").describe() == "two halves"
        explanation = explainer.explain(photo, 1, caption=caption, settings=Settings(segmenter="halves"))
        assert explanation.segmenter == "halves" and explanation.grounding.label in ("left", "right")
        assert known_captioners()["plugin-blip"] == "nowhere/plugin-blip"
        assert isinstance(tiny_captioner("plugin-blip"), plugin_blip)
        assert "halves" in ui.settings_panels(explainer)["Region"]["segmenter"].options["choices"]
    assert "halves" not in SEGMENTERS and "plugin-blip" not in known_captioners()
    with pytest.raises(ValueError, match="Unknown segmenter 'halves'"):
        Settings(segmenter="halves")


def test_installed_plugins_are_found_through_their_entry_points(tmp_path, photo):
    """A throw-away distribution on the path of a fresh process (no installation into the environment): its
    map type, segmenter and captioner are found in the three entry point groups, and a broken entry is skipped."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "blurred_saliency.py").write_text(example_source())
    (site / "other_plugins.py").write_text(OTHER_PLUGINS)
    info = site / "ipag_example_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ipag-example-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[ipag.maps]\nblurred_saliency = blurred_saliency:BlurredSaliency\nbroken = no_such_module:Nothing\n\n"
        "[ipag.segmenters]\nhalves = other_plugins:Halves\n\n[ipag.captioners]\nplugin_blip = other_plugins:PluginBlip\n")
    photo.save(tmp_path / "photo.png")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "ipag", "explain", str(tmp_path / "photo.png"), "--out", str(out), "--tiny",
         "--captioner", "plugin-blip", "--segmenter", "halves", "--max-new-tokens", "3", "--no-verify",
         "--blur-sigma", "1.5", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "'broken'" in run.stderr and "no_such_module" in run.stderr  # logged, and the others still loaded
    index = json.loads((out / "photo" / "image.json").read_text())
    assert index["settings"]["captioner"].startswith("plugin-blip") and index["settings"]["blur_sigma"] == 1.5
    explained = json.loads((out / "photo" / index["explanations"][0]["folder"] / "explanation.json").read_text())
    assert "blurred_saliency" in explained["maps"] and explained["segmenter"] == "halves"
    assert "halves" not in SEGMENTERS  # the distribution was on the other process's path only
