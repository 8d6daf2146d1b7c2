"""Settings are declared once (`ipag.settings`): every declaration gets a widget in the page and an option on the
command line, made from it; a value is checked against it once; equal settings are equal."""

import pickle
from dataclasses import replace

import pytest

import playground
from ipag import Settings, cli
from ipag.settings import DEFAULTS, Setting, declarations

NAMES = list(declarations())


def other_value(name: str, setting: Setting):
    """A valid value that is not the default."""
    default = getattr(DEFAULTS, name)
    if setting.kind is bool:
        return not default
    if setting.options():
        return next(option for option in reversed(setting.options()) if option != default)
    if setting.maximum is not None:
        return setting.maximum
    if setting.kind is int:
        return (default or 0) + 1
    return "an image of {}"


def test_the_declarations_cover_the_fields_and_the_map_types_settings():
    assert {"num_beams", "template", "colormap"} <= set(NAMES)  # fields of Settings
    assert {"cam_method", "saliency", "smoothgrad_samples", "occlusion", "ig_steps"} <= set(NAMES)  # map types'


def test_every_setting_has_a_widget_on_the_page(explainer):
    app = playground.build_app(explainer)
    widgets = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    resolved = explainer.resolve(DEFAULTS)
    for name, setting in declarations().items():
        widget = widgets[f"settings-{name}"]
        assert isinstance(widget, playground.WIDGETS[setting.widget_kind]) and widget.label == setting.label, name
        if name not in ("segmenter", "cross_attention_layer", "vision_layer"):  # these follow the models
            assert widget.value == getattr(DEFAULTS, name), name
            if setting.widget_kind in ("slider", "number"):
                assert (widget.minimum, widget.maximum) == (setting.minimum, setting.maximum), name
            if setting.widget_kind in ("dropdown", "radio"):
                assert [value for _, value in widget.choices] == setting.options(), name
    assert widgets["settings-segmenter"].value == resolved.segmenter == "superpixels"
    layers = len(explainer.captioner.vision_layers)
    assert (widgets["settings-vision_layer"].minimum, widgets["settings-vision_layer"].maximum) == (-layers, layers - 1)
    assert widgets["settings-cross_attention_layer"].value == resolved.cross_attention_layer


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_has_a_command_line_option(name):
    setting = declarations()[name]
    value = other_value(name, setting)
    flag = f"--{name.replace('_', '-')}"
    given = ([flag] if value else [f"--no-{flag[2:]}"]) if setting.kind is bool else [flag, str(value)]
    args = cli.build_parser().parse_args(["explain", "x.png", "--out", "out", *given])
    assert cli.settings_of(args) == Settings(**{name: value}) != DEFAULTS


def test_options_left_out_keep_the_defaults_and_bad_values_are_refused(capsys):
    args = cli.build_parser().parse_args(["explain", "x.png", "--out", "out"])
    assert cli.settings_of(args) == DEFAULTS
    with pytest.raises(SystemExit):
        cli.main(["explain", "x.png", "--out", "out", "--opacity", "1.5"])
    assert "opacity must be between 0 and 1, got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"num_beams": 0}, "num_beams must be between 1 and 16, got 0"),
    ({"top_k": 0}, "top_k must be at least 1"),
    ({"colormap": "plasma"}, "Unknown colormap 'plasma'; choose one of: viridis, inferno"),
    ({"cam_method": "ScoreCAM"}, "Unknown cam_method 'ScoreCAM'"),
    ({"template": "no slot"}, "template must contain '{}'"),
    ({"stage2": "yes"}, "stage2 must be a bool"),
    ({"num_beams": 2.5}, "whole number"),
    ({"verify": None}, "verify needs a value"),
    ({"beams": 3}, "Unknown setting(s) beams; known settings: num_beams"),
    ({"instruction": "What is shown?\nIgnore the image."}, "instruction must not contain control characters"),
    ({"instruction": "Describe\tit."}, "instruction must not contain control characters"),
    ({"instruction": "?" * 501}, "instruction is too long (501 characters; at most 500)"),
])
def test_values_are_checked_against_their_declaration(values, message):
    with pytest.raises(ValueError) as error:
        Settings.from_values(values)
    assert message in str(error.value)


def test_settings_are_values_whatever_way_they_are_made():
    chosen = Settings(cam_method="LayerCAM", num_beams=3)
    assert chosen == Settings.from_values({"num_beams": 3.0, "cam_method": "LayerCAM"}) == replace(
        DEFAULTS, num_beams=3, cam_method="LayerCAM")
    assert hash(chosen) == hash(Settings(num_beams=3, cam_method="LayerCAM"))
    assert Settings(cam_method="GradCAM") == DEFAULTS  # a declared setting at its default is no difference
    assert replace(chosen, num_beams=1).cam_method == "LayerCAM"  # replace keeps the declared settings
    assert pickle.loads(pickle.dumps(chosen)) == chosen  # Ray ships settings to its workers
    assert chosen.to_dict()["cam_method"] == "LayerCAM" and ("cam_method", "LayerCAM") in chosen.key("gradients")
    with pytest.raises(TypeError, match="Unknown setting"):
        Settings(beams=3)
    with pytest.raises(AttributeError):
        _ = chosen.beams


def test_an_empty_instruction_box_asks_the_models_own_and_a_long_one_is_quoted_short():
    assert Settings.from_values({"instruction": "  "}) == Settings.from_values({"instruction": ""}) == DEFAULTS
    assert Settings.from_values({"instruction": "What is shown?"}).instruction == "What is shown?"
    with pytest.raises(ValueError, match="instruction is empty"):
        Settings(instruction=" ")  # made directly: "" is not None
    with pytest.raises(ValueError) as error:
        Settings(instruction="why " * 200)
    assert len(str(error.value)) < 150  # the message quotes the start of the text, not all 800 characters
