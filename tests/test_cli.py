"""The command line on tiny models: batch explanations (complete, resumable, bad files reported) and the
evaluation commands' tables, JSON and exit statuses."""

import argparse
import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipag import Explainer, cli
from ipag.maps import map_titles
from ipag.evaluation import captions as caption_metrics
from tests.fixtures.tiny_flickr import write_tiny_flickr

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--tiny", "--device", "cpu", "--max-new-tokens", "3"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two photos, a corrupt "jpeg" and a text file, in one folder."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for name, size in (("beach.jpg", (48, 40)), ("park.png", (33, 52))):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def explained(photos, tmp_path_factory):
    """One batch run over the folder, shared by the tests that only read its output."""
    out = tmp_path_factory.mktemp("explained")
    code = cli.main(["explain", str(photos), "--out", str(out), "--occlusion", *TINY])
    return out, code


def folder_files(folder):
    return {path.relative_to(folder): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def test_explain_writes_pngs_and_json_for_every_word(photos, explained):
    out, code = explained
    assert code == 1  # broken.jpg failed; the photos were done all the same
    assert sorted(p.name for p in out.iterdir()) == ["beach", "park"]  # no partial folders left behind
    for name in ("beach", "park"):
        size = Image.open(next(photos.glob(f"{name}.*"))).size
        index = json.loads((out / name / cli.INDEX).read_text())
        words = index["caption"]["words"]
        assert words and index["settings"]["words"] == "all"
        assert [entry["word_indices"] for entry in index["explanations"]] == [[w["index"]] for w in words]
        for entry, word in zip(index["explanations"], words):
            folder = out / name / entry["folder"]
            details = json.loads((folder / "explanation.json").read_text())
            assert details["caption"] == index["caption"]["text"] and details["words"] == [word["text"]]
            assert details["word_logprob"] == pytest.approx(entry["word_logprob"])
            assert set(details["verification"]) >= {"clip_region", "region_says_word", "delta_logprob_blurred"}
            assert entry["verification"] == details["verification"]
            assert set(details["maps"]) == set(map_titles()) - {"integrated_gradients"}  # off unless asked for
            for key in details["maps"]:
                assert Image.open(folder / f"{key}_overlay.png").size == size
            assert Image.open(folder / "region.png").size == size
            assert not (folder / "image.png").exists()


def test_explain_reports_bad_and_ignored_files(photos, tmp_path, capsys):
    code, out, err = run(capsys, "explain", photos / "broken.jpg", photos / "missing.jpg", photos,
                         "--out", tmp_path, "--words", "dog", *TINY)
    assert code == 1
    assert "2 image(s) explained" in out and "2 failed" in out  # broken.jpg is named and in the folder: once
    assert err.count("failed: ") == 2 and "No such image file" in err and "broken.jpg" in err
    assert "ignoring 1 file(s) without an image suffix: notes.txt" in err


def test_second_run_skips_finished_images(photos, explained, monkeypatch, capsys):
    out, _ = explained
    before = folder_files(out)
    calls = []
    original = Explainer.explain_many
    monkeypatch.setattr(Explainer, "explain_many", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    code, stdout, _ = run(capsys, "explain", photos, "--out", out, "--occlusion", *TINY)
    assert code == 1 and "0 image(s) explained, 2 already finished (skipped), 1 failed" in stdout
    assert calls == []
    assert folder_files(out) == before


def test_changed_settings_recompute_and_replace_the_folder(photos, explained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(explained[0], out)
    first = json.loads((out / "beach" / cli.INDEX).read_text())["caption"]["words"][0]["text"]
    code, stdout, _ = run(capsys, "explain", photos / "beach.jpg", "--out", out, "--words", first, *TINY)
    assert code == 0 and "1 image(s) explained" in stdout
    index = json.loads((out / "beach" / cli.INDEX).read_text())
    assert index["settings"]["words"] == [first]
    assert [entry["folder"] for entry in index["explanations"]] == [f"00-{first}"]
    assert sorted(p.name for p in (out / "beach").iterdir()) == sorted([f"00-{first}", cli.INDEX, "image.png"])  # old words gone


def test_an_interrupted_image_is_not_finished(photos, tmp_path, monkeypatch, capsys):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_files", crash)
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path, *TINY)
    assert code == cli.INTERRUPTED and "interrupted; re-run" in err
    assert not (tmp_path / "beach").exists() and any((tmp_path / ".beach.partial").iterdir())
    monkeypatch.undo()
    code, stdout, _ = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path, *TINY)
    assert code == 0 and "1 image(s) explained" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beach"]


def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(tmp_path):
    """A real SIGINT to `python -m ipag explain`: a one-line message, its own exit status, no traceback, and
    the images finished before it are kept (a re-run skips them)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for index in range(40):
        Image.new("RGB", (48 + index, 40), (index * 6, 90, 200 - index * 4)).save(folder / f"photo{index:02d}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ipag", "explain", str(folder), "--out", str(out), *TINY]
    # A shell's background job ignores SIGINT, and a child inherits that: restore the default, as in a terminal.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any((p / cli.INDEX).is_file() for p in out.iterdir() if p.is_dir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == cli.INTERRUPTED, stderr
    assert "interrupted; re-run" in stderr and "Traceback" not in stderr
    finished = {p.name for p in out.iterdir() if (p / cli.INDEX).is_file()}
    assert finished and len(finished) < 40
    assert all(not p.name.startswith(".") or p.name.endswith(".partial") for p in out.iterdir())


def test_a_folder_not_written_by_ipag_is_not_overwritten(photos, tmp_path, capsys):
    (tmp_path / "beach").mkdir()
    (tmp_path / "beach" / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path, *TINY)
    assert code == 1 and "was not written by `ipag explain`" in err
    assert (tmp_path / "beach" / "mine.txt").read_text() == "keep me"


def test_unavailable_model_exits_2_with_the_fix(photos, tmp_path, capsys):
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path, "--device", "cpu",
                       "--captioner", tmp_path / "no-such-model", "--clip", "none")
    assert code == 2
    assert "error: No such model folder" in err and "no-such-model" in err and "--tiny" in err


@pytest.mark.parametrize("argv, message", [
    (["explain", "--num-beams", "0"], "num_beams must be between 1 and 16"),
    (["explain", "--words", " , "], "--words needs 'all'"),
    (["explain", "--cam-method", "NoCAM"], "invalid choice"),
    (["evaluate-faithfulness", "--road-percentiles", "0,50"], "strictly between 0 and 100"),
    (["evaluate-faithfulness", "--steps", "0"], "positive whole number"),
    (["explain", "--cache-mb", "0"], "positive whole number"),
    (["explain", "--instruction", "What?\nNow ignore the image."], "instruction must not contain control characters"),
    (["explain", "--instruction", "why " * 150], "instruction is too long (600 characters; at most 500)"),
])
def test_bad_arguments_exit_2(photos, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exited:
        cli.main([argv[0], str(photos), "--out", str(tmp_path), "--tiny", *argv[1:]])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_vision_language_model_answers_the_instruction_given_on_the_command_line(photos, tmp_path, capsys):
    """`--tiny --captioner FOLDER` runs that model (a tiny LLaVA, as a user's download) with the tiny CLIP, and
    `--instruction` is what it is asked: its prompt, the caption's record and the settings' all say so."""
    from ipag.captioners.tiny_vlms import save_tiny

    folder = save_tiny("llava", tmp_path / "llava")
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", out, *TINY, "--captioner", folder,
                       "--instruction", "What does this show?")
    assert code == 0, err
    index = json.loads((out / "beach" / cli.INDEX).read_text())
    caption = index["caption"]
    assert index["settings"]["captioner"].startswith(f"vlm ({folder}")
    assert caption["instruction"] == index["settings"]["instruction"] == "What does this show?"
    assert caption["words"]
    prompt = caption["tokens"][:caption["words"][0]["token_positions"][0]]  # what comes before the answer
    assert "▁what ▁does ▁this ▁show ?" in " ".join(prompt)


def test_settings_the_models_refuse_exit_2_with_the_reason(photos, tmp_path, capsys):
    """What only the loaded models can refuse (Florence-2's processor takes a task token alone; a layer the model does
    not have) is refused before any image, with the reason, not a traceback."""
    from ipag.captioners.tiny_vlms import save_tiny

    folder = save_tiny("florence2", tmp_path / "florence2")
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path / "out", *TINY, "--captioner", folder,
                       "--instruction", "<CAPTION> of the dog")
    assert code == 2 and "error: Florence-2 cannot be asked '<CAPTION> of the dog': Task token <CAPTION>" in err
    code, _, err = run(capsys, "explain", photos / "beach.jpg", "--out", tmp_path / "out", *TINY, "--vision-layer", "99")
    assert code == 2 and "error: Vision layer index 99 is out of range" in err
    assert not (tmp_path / "out").exists()


def test_the_cache_budget_option_reaches_the_explainer():
    parser = argparse.ArgumentParser()
    cli.add_model_arguments(parser)
    assert cli.load_explainer(parser.parse_args([*TINY[:3], "--cache-mb", "64"])).cache.budget_bytes == 64 * 2**20


def test_module_entry_point_returns_the_status(photos, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ipag", "explain", str(photos / "broken.jpg"), "--out", str(tmp_path), *TINY])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("ipag", run_name="__main__")
    assert exited.value.code == 1


class FakeMeteor:
    """Stands in for METEOR's Java process (tested for real in test_evaluation), to keep this test quick."""

    def compute_score(self, gts, res):
        return 0.5, [0.5] * len(res)


def test_evaluate_captions_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(caption_metrics, "Meteor", FakeMeteor)
    images, captions = write_tiny_flickr(tmp_path)
    (images / "broken.jpg").write_bytes(b"nope")
    with captions.open("a") as handle:
        handle.write("broken.jpg,a broken image\n")
    out = tmp_path / "results.json"
    code, stdout, err = run(capsys, "evaluate-captions", "--images", images, "--captions", captions,
                            "--out", out, *TINY)
    assert code == 1 and "broken.jpg" in err  # reported, and the rest evaluated
    assert "1 image(s) named in" in err and "1003_missing.jpg" in err
    result = json.loads(out.read_text())
    assert [item["image"] for item in result["per_image"]] == ["1000_man.jpg", "1001_woman.jpg", "1002_street.png"]
    expected = {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIP text similarity",
                "CLIPScore"}
    assert set(result["metrics"]) == expected
    assert all(expected <= set(item) and item["caption"] for item in result["per_image"])
    assert result["metrics"]["CLIPScore"]["n"] == 3
    assert result["gender_bias"]["images_with_reference_gender"] == 2
    assert result["failed"] == [{"image": "broken.jpg", "error": result["failed"][0]["error"]}]
    assert result["settings"]["captioner"].startswith("blip (tiny-blip")
    rows = {line.split("  ")[0]: line for line in stdout.splitlines()}
    assert rows["METEOR"].endswith("0.500") and "(n=3)" in rows["CLIPScore"]
    assert "of 2 images" in rows["Gender misclassification rate"]


def test_evaluate_captions_needs_java_and_a_readable_captions_file(tmp_path, monkeypatch, capsys):
    images, captions = write_tiny_flickr(tmp_path)
    captions.write_text("file,text\n")
    code, _, err = run(capsys, "evaluate-captions", "--images", images, "--captions", captions, *TINY)
    assert code == 2 and "header line 'image,caption'" in err
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    code, _, err = run(capsys, "evaluate-captions", "--images", images, "--captions", captions, *TINY)
    assert code == 2 and "no `java` was found" in err


def test_evaluate_faithfulness_prints_a_table_per_map(photos, tmp_path, capsys):
    out = tmp_path / "faithfulness.json"
    code, stdout, _ = run(capsys, "evaluate-faithfulness", photos / "beach.jpg", "--steps", "2",
                          "--road-percentiles", "none", "--out", out, *TINY)
    assert code == 0
    result = json.loads(out.read_text())
    words = len(result["words"])
    assert words > 0 and result["settings"]["road_percentiles"] == []
    for key in ("gradcam", "cross_attention", "saliency", "clip_relevance", "random"):
        line = next(line for line in stdout.splitlines() if line.startswith(key + " "))
        assert line.count(f"(n={words})") == 2 and line.endswith("—")  # deletion and insertion; ROAD skipped
        assert len(result["words"][0]["maps"][key]["deletion"]) == 3
    assert f"of {words})" in stdout.splitlines()[-2]  # the XIC hit rate line


def test_the_page_and_the_command_line_export_the_same_files(photos, tmp_path):
    """One word exported from the page and by `python -m ipag explain --sanity`: the same files (the image, the
    index, the word's folder) and the same record, its sanity check included."""
    import zipfile

    from ipag import Settings, ui

    out = tmp_path / "out"
    assert cli.main(["explain", str(photos / "beach.jpg"), "--out", str(out), "--sanity", *TINY]) == 0
    explainer, settings = Explainer.tiny(seed=0), Settings(max_new_tokens=3)
    _, session, _ = ui.caption_image(explainer, Image.open(photos / "beach.jpg"), settings, ui.Session(),
                                     precompute=False)
    *_, (session, _) = ui.explain(explainer, session, 0, settings)
    for _ in ui.sanity_check(explainer, session):
        pass
    with zipfile.ZipFile(ui.export(explainer, session, settings)) as archive:
        page = {name: archive.read(name) for name in archive.namelist()}
    folder = next(name.split("/")[0] for name in page if "/" in name)
    written = {path.relative_to(out / "beach").as_posix() for path in (out / "beach").rglob("*") if path.is_file()}
    assert set(page) == {name for name in written if "/" not in name or name.startswith(f"{folder}/")}
    from_page = json.loads(page[f"{folder}/explanation.json"])
    from_cli = json.loads((out / "beach" / folder / "explanation.json").read_text())
    assert from_page.keys() == from_cli.keys() and from_page["words"] == from_cli["words"]
    assert from_page["sanity"]["verdicts"] == from_cli["sanity"]["verdicts"]
    assert from_page["sanity"]["basis"] == from_cli["sanity"]["basis"]
