"""`--ray`: the batch commands on a local Ray with 2 CPUs write the local loop's files and compute its numbers,
survive killed actors without losing or rewriting an image, resume an interrupted run, report a bad image and
do the rest; without Ray installed, `--ray` says how to install it. One Ray is shared by the module's tests
(starting one takes seconds; each run starts its actors, which load the tiny models, in seconds more)."""

import json
import logging
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from ipag import batch, cli
from tests.fixtures.dying import dying_explain_worker

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--tiny", "--device", "cpu", "--max-new-tokens", "3"]
NAMES = ("beach", "forest", "park")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray with 2 CPUs for the module; `--ray` uses a Ray that is already running and leaves it so."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos and a corrupt "jpeg"."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(11)
    for name, size in zip(NAMES, ((48, 40), (40, 56), (33, 52))):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def local_run(photos, tmp_path_factory):
    """The plain loop's output folder, to compare the Ray runs with."""
    out = tmp_path_factory.mktemp("local")
    assert cli.main(["explain", str(photos), "--out", str(out), *TINY]) == 1  # broken.jpg
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def same_json(a, b, path="") -> None:
    """Equal JSON values, floats within a tolerance (the actors run in other processes)."""
    if isinstance(a, float) or isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-5), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            same_json(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            same_json(x, y, f"{path}/{index}")
    else:
        assert a == b, path


def assert_same_outputs(ours: Path, local: Path) -> None:
    """The same files, with the same JSON, and nothing else (no scratch folders)."""
    files = sorted(path.relative_to(local) for path in local.rglob("*") if path.is_file())
    assert sorted(path.relative_to(ours) for path in ours.rglob("*") if path.is_file()) == files
    assert sum(name.suffix == ".json" for name in files) > len(NAMES)
    for name in files:
        if name.suffix == ".json":
            same_json(json.loads((ours / name).read_text()), json.loads((local / name).read_text()), str(name))


def test_killed_actors_are_retried_and_nothing_is_lost_or_written_twice(photos, local_run, tmp_path, monkeypatch,
                                                                        capsys):
    markers = tmp_path / "markers"
    markers.mkdir()
    out = tmp_path / "out"
    monkeypatch.setattr(cli, "explain_worker", partial(dying_explain_worker, mid_write="forest", after_write="park",
                                                       markers=markers))
    code, stdout, err = run(capsys, "explain", photos, "--out", out, *TINY, "--ray")
    assert sorted(path.name for path in markers.iterdir()) == ["after-write", "mid-write"]  # both actors died
    assert code == 1 and "failed: " in err and "broken.jpg" in err  # the bad image is reported, the rest done
    # park was complete before its actor died: the retry found it finished and did not write it again
    assert "2 image(s) explained, 1 already finished (skipped), 1 failed" in stdout
    assert_same_outputs(out, local_run)  # the local loop's files and JSON; forest's dead half-folder is gone


def test_resume_an_interrupted_run_on_ray(photos, local_run, tmp_path, monkeypatch, capsys):
    write_files = cli.write_files
    written = []

    def interrupted(folder, files):
        if folder.parent.name == ".forest.partial":
            raise KeyboardInterrupt
        written.append(folder)
        write_files(folder, files)

    monkeypatch.setattr(cli, "write_files", interrupted)
    code, _, _ = run(capsys, "explain", photos, "--out", tmp_path, *TINY)
    assert code == cli.INTERRUPTED and written
    monkeypatch.undo()
    beach = {path: path.stat().st_mtime_ns for path in (tmp_path / "beach").rglob("*")}
    assert not (tmp_path / "forest").exists() and (tmp_path / ".forest.partial").is_dir()

    code, stdout, _ = run(capsys, "explain", photos, "--out", tmp_path, *TINY, "--ray")
    assert code == 1 and "2 image(s) explained, 1 already finished (skipped), 1 failed" in stdout
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "beach").rglob("*")} == beach
    assert_same_outputs(tmp_path, local_run)


def test_faithfulness_on_ray_gives_the_local_numbers(photos, tmp_path, capsys):
    options = ["--steps", "2", "--road-percentiles", "50", *TINY]
    code, local_table, _ = run(capsys, "evaluate-faithfulness", photos, "--out", tmp_path / "local.json", *options)
    assert code == 1
    code, ray_table, err = run(capsys, "evaluate-faithfulness", photos, "--out", tmp_path / "ray.json", *options,
                               "--ray")
    assert code == 1 and "broken.jpg" in err
    local, distributed = (json.loads((tmp_path / name).read_text()) for name in ("local.json", "ray.json"))
    assert len(local["words"]) > len(NAMES) and [f["image"] for f in local["failed"]] == [str(photos / "broken.jpg")]
    same_json(distributed, local)
    assert ray_table == local_table.replace("local.json", "ray.json")


def test_ray_without_an_address_starts_its_own_local_ray(photos, tmp_path):
    """The whole command as a user runs it: `--ray` starts an embedded Ray, quietly, and stops it."""
    result = subprocess.run(
        [sys.executable, "-m", "ipag", "explain", str(photos / "beach.png"), "--out", str(tmp_path), *TINY, "--ray"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "1 image(s) explained" in result.stdout and "Traceback" not in result.stderr
    assert (tmp_path / "beach" / cli.INDEX).is_file()


def test_without_ray_installed_the_hint_says_how_to_install_it(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    code, _, err = run(capsys, "explain", photos, "--out", tmp_path, *TINY, "--ray")
    assert code == 2
    assert "pip install -r requirements-ray.txt" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_an_input_after_ray_is_not_taken_for_its_address(photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["explain", "--ray", str(photos), "--out", str(tmp_path), "--tiny"])
    assert exited.value.code == 2 and "expected auto, ray://HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("resources, items, expected", [
    ({"CPU": 2.0}, 10, (2 // batch.CPUS_PER_ACTOR, {"num_cpus": batch.CPUS_PER_ACTOR}, batch.CPUS_PER_ACTOR)),
    ({"CPU": 16.0}, 3, (3, {"num_cpus": batch.CPUS_PER_ACTOR}, batch.CPUS_PER_ACTOR)),  # no idle actors
    ({"CPU": 64.0, "GPU": 4.0}, 100, (4, {"num_gpus": 1}, None)),  # one actor per GPU
])
def test_actor_pool_fits_the_cluster(resources, items, expected):
    assert batch.actor_pool(resources, items) == expected
