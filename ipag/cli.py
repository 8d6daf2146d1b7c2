"""Command line: explain whole folders of images, and evaluate captions and explanations over a set.

    python -m ipag explain photos/ more.jpg --words all --out explained/
    python -m ipag evaluate-captions --images Flickr8k/Images --captions Flickr8k/captions.txt --out captions.json
    python -m ipag evaluate-faithfulness photos/ --out faithfulness.json
    python -m ipag explain photos/ --out explained/ --ray          # the same on Ray: local, or `--ray auto`
    python -m ipag evaluate-groundtruth --scenes 500 --out groundtruth.json --plot groundtruth.png
    python -m ipag evaluate-grounding --scenes 100                 # grounding settings compared on ground truth
    python -m ipag check-precision --scenes 20                     # may each stage run in bfloat16?
    python -m ipag train-synthetic --out models/                   # retrain the shipped synthetic models

Every command takes the playground's model options (--synthetic, --tiny, --captioner, --clip, --segmenter, …).
Exit status: 0 when everything was done; 1 when some inputs failed (each is reported, the others are done);
2 when a model or a metric cannot be loaded, `--ray` finds no Ray, or the arguments are wrong (for the models too: a
layer they do not have, an instruction the model refuses); 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .batch import LOCAL, RayUnavailableError, Record, Worker, run_items
from .cache import DEFAULT_CACHE_MB, image_key
from .captioners import Captioner, known_captioners, load_captioner, tiny_captioner
from .errors import ModelUnavailableError, QueryError, SettingError
from .evaluation.captions import COCO_METRICS, MetricUnavailableError, evaluate_captions, require_java
from .evaluation.faithfulness import METRICS, ROAD_PERCENTILES, faithfulness_result, image_faithfulness
from .evaluation.grounding import ablation, grid, grounding_result, grounding_table, scene_groundings
from .evaluation.groundtruth import (EVALUATED, agreement_table, groundtruth_result, groundtruth_table, plot,
                                     rank_agreement, scene_record)
from .evaluation.inputs import (
    DatasetError,
    collect_images,
    match_images,
    output_names,
    parse_words,
    read_references,
    select_queries,
)
from .evaluation.report import describe, format_table
from .explainer import Explainer
from .evaluation.localisation import ground_truth
from .evaluation.precision import precision_record, precision_summary, precision_table
# INDEX marks an image as finished: it is written last, inside a temporary folder that is renamed into place only
# when complete, so an interrupted run never leaves a folder that looks finished.
from .export import INDEX, WordExport, image_export
from .precision import PRECISIONS, STAGES
from .images import ImageError, load_image
from .results import Caption
from .sanity import SanityCascade
from .segmenters import available_segmenters
from .settings import DEFAULTS, Setting, Settings, declarations
from .synthetic.models import DEFAULT_FAMILY, FAMILIES, SCENE_SUPERPIXELS, model_names
from .synthetic.scenes import find_scene
from .synthetic.teacher import TEACHER_STEPS
from .synthetic.train import CAPTIONER_STEPS, CLIP_STEPS

#: The captioner when none is named (a friendly name of `known_captioners()`).
DEFAULT_CAPTIONER = "blip-base"
#: The exit status after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130


# --- shared options and model loading --------------------------------------------------------------------------

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options shared by the playground and the CLI (--segmenter defaults to the models' own:
    "auto" for real models, superpixels for --tiny)."""
    group = parser.add_argument_group("models")
    group.add_argument("--synthetic", nargs="?", const=True, default=None, metavar="FOLDER",
                       help="the small models trained on generated scenes: the ones shipped in models/, or those "
                       "`train-synthetic` wrote to FOLDER (offline; captions that mean something)")
    group.add_argument("--tiny", action="store_true", help="tiny random models: offline, for testing the plumbing "
                       "(with --captioner FOLDER: that model, and a tiny CLIP)")
    group.add_argument("--captioner", default=None,
                       help=f"{', '.join(known_captioners())}, a hub id or local folder of a BLIP or ViT-GPT2 "
                       f"captioner, or a ClipCap checkpoint file (.pt/.safetensors, see the README); default "
                       f"{DEFAULT_CAPTIONER}. With --synthetic: {' or '.join(FAMILIES)} (default {DEFAULT_FAMILY})")
    group.add_argument("--clip", default="ViT-B-32/openai",
                       help="open_clip 'architecture/pretrained' (tag or checkpoint path); 'none' disables grounding")
    group.add_argument("--segmenter", default=None,
                       help=f"{', '.join(available_segmenters())} (default: the models')")
    group.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, mps")
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="auto: bfloat16 for the stages whose maps agree with float32, where the processor has "
                       "it (AVX512-BF16 CPUs, most GPUs), else float32; float32 forces it everywhere (default: "
                       "auto; float32 for --tiny, whose numbers tests compare with exact ones)")
    group.add_argument("--cache-mb", type=_positive, default=DEFAULT_CACHE_MB,
                       help="memory for cached results (captions, regions, explanations) in MB; least recently used "
                       f"ones are dropped beyond it (default {DEFAULT_CACHE_MB}, for a 16 GB machine)")


#: Settings that are model options too (`add_model_arguments`): the explainer's default and the settings' value.
MODEL_SETTINGS = ("segmenter",)


def add_explanation_arguments(parser: argparse.ArgumentParser) -> None:
    """How the batch commands caption and explain (the playground sets these in the page): one option per
    setting, made from its declaration (`ipag.settings`), `--cam-method` for `cam_method`. Defaults are
    `Settings`' own: an option left out is not passed on."""
    group = parser.add_argument_group("explanations")
    for name, setting in declarations().items():
        if name not in MODEL_SETTINGS:
            group.add_argument(f"--{name.replace('_', '-')}", default=None, **_option(name, setting))


def _option(name: str, setting: Setting) -> dict[str, Any]:
    """argparse's arguments for a setting: a flag pair (--x / --no-x) for a switch, else its type and choices,
    with its range and default in the help."""
    label = setting.label.replace("%", "%%")
    default = getattr(DEFAULTS, name)
    if setting.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": f"{label} (default: {'on' if default else 'off'})"}
    low, high = setting.minimum, setting.maximum
    bounds = f", {low:g} to {high:g}" if low is not None and high is not None else \
        f", at least {low:g}" if low is not None else ""
    choices = setting.options()
    shown = "the models' own" if default is None else default
    return {"type": setting.kind, "choices": choices, "metavar": None if choices else name.split("_")[-1].upper(),
            "help": f"{label}{bounds} (default: {shown})"}


def add_ray_argument(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]`: the same work as a Ray Data job (see `ipag.batch`)."""
    parser.add_argument("--ray", nargs="?", const=LOCAL, type=_ray_address, metavar="ADDRESS",
                        help="run on Ray Data, models loaded once per actor: a local Ray without ADDRESS, or join a "
                        "cluster ('auto', ray://HOST:10001); needs `pip install -r requirements-ray.txt`")


def load_explainer(args: argparse.Namespace) -> Explainer:
    """The explainer the options describe (raises `ModelUnavailableError` with the fix in its message)."""
    captioner = captioner_name(args)
    precision = {"precision": args.precision} if args.precision else {}  # else each kind of models' default
    if args.synthetic:
        return Explainer.synthetic(args.device, args.cache_mb, synthetic_folder(args), captioner, **precision)
    if args.tiny:  # a named captioner's tiny random version, or the model --captioner names, with a tiny CLIP
        return Explainer.tiny(device=args.device, captioner=captioner, cache_mb=args.cache_mb, **precision)
    print(f"Loading {captioner} and CLIP {args.clip} (first run downloads them)…", file=sys.stderr, flush=True)
    return Explainer.from_pretrained(captioner, None if args.clip == "none" else args.clip,
                                     args.segmenter or "auto", args.device, args.cache_mb, **precision)


def captioner_name(args: argparse.Namespace) -> str:
    """The captioner the options name (with --synthetic, one of the synthetic captioners: `FAMILIES`)."""
    return args.captioner or (DEFAULT_FAMILY if args.synthetic else DEFAULT_CAPTIONER)


def synthetic_folder(args: argparse.Namespace) -> Path | None:
    """The folder --synthetic names (None: the models shipped in models/)."""
    return None if args.synthetic is True else Path(args.synthetic)


def captioner_loader(args: argparse.Namespace, device: torch.device) -> tuple[list[str], Callable[[str], Captioner]]:
    """The captioners the options make available by name (the page's choice), and how to load one: the synthetic
    ones with --synthetic, tiny random ones with --tiny, else the friendly names (any hub id or folder loads too)."""
    if args.synthetic:
        folder = synthetic_folder(args)
        return list(FAMILIES), lambda name: load_captioner(model_names(folder, name)[0], device)
    if args.tiny:
        return list(known_captioners()), lambda name: tiny_captioner(name, 0, device)
    return list(known_captioners()), lambda name: load_captioner(name, device)


def settings_of(args: argparse.Namespace, base: Settings = DEFAULTS) -> Settings:
    """The settings the options ask for (`base`'s for those not given), checked."""
    return Settings.from_values({name: getattr(args, name) for name in declarations()
                                 if getattr(args, name, None) is not None}, base)


def model_settings(explainer: Explainer, settings: Settings) -> dict[str, Any]:
    """What the results depend on, recorded with them (and compared when resuming): the models and every
    resolved setting."""
    return {"captioner": explainer.captioner.describe(), "clip": explainer.clip.name if explainer.clip else None,
            **explainer.resolve(settings).to_dict()}


def _words(spec: str) -> tuple[str, ...] | None:
    try:
        return parse_words(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text}")
    return value


def _stage_list(spec: str) -> list[str]:
    stages = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none given)'}; choose among "
                                         f"{', '.join(STAGES)}")
    return stages


def _model_list(spec: str) -> list[str]:
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - {*FAMILIES, "clip"})
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose among "
                                         f"{', '.join([*FAMILIES, 'clip'])}")
    return names


def _percentiles(spec: str) -> tuple[int, ...]:
    if spec.strip().lower() in ("none", ""):
        return ()
    try:
        values = tuple(int(part) for part in spec.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected percentiles like 20,50,80 or 'none', got {spec!r}") from err
    if not all(0 < value < 100 for value in values):
        raise argparse.ArgumentTypeError(f"percentiles must lie strictly between 0 and 100, got {spec!r}")
    return values


def _ray_address(text: str) -> str:
    """`--ray ADDRESS`: "auto", "ray://HOST:PORT" or "HOST:PORT". Anything else is refused, so that an input path
    written right after `--ray` is not mistaken for an address."""
    if text in (LOCAL, "auto") or re.fullmatch(r"(ray://)?[\w.-]+:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, ray://HOST:PORT or HOST:PORT, got {text!r} (to start a local "
                                     "Ray, give --ray without an address after the input paths)")


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _input_images(paths: list[str]) -> list[Path]:
    """The images to work on; the other files found in folders are mentioned, not silently dropped."""
    images, ignored = collect_images(paths)
    if ignored:
        names = ", ".join(path.name for path in ignored[:5]) + (", …" if len(ignored) > 5 else "")
        print(f"note: ignoring {len(ignored)} file(s) without an image suffix: {names}", file=sys.stderr)
    if not images:
        raise DatasetError(f"No images found in {' '.join(paths)}.")
    return [path.absolute() for path in images]  # Ray workers do not share our working directory


# --- explain ---------------------------------------------------------------------------------------------------

def run_explain(args: argparse.Namespace) -> int:
    """Explain every image's words into `--out`: one folder per image, one sub-folder per word."""
    images = _input_images(args.inputs)
    records = run_items(partial(explain_worker, args, output_names(images)), images, args.ray, "Explaining", "image")
    done = Counter(record.get("status") for record in records)
    failed = [record for record in records if "error" in record]
    print(f"{done['explained']} image(s) explained, {done['skipped']} already finished (skipped), "
          f"{len(failed)} failed; results in {args.out}")
    return _report_failures(failed)


def explain_worker(args: argparse.Namespace, names: dict[Path, str]) -> Worker:
    """Load the models, then explain image by image into `--out` (once here, or once per Ray actor)."""
    explainer = load_explainer(args)
    settings = settings_of(args)
    record = model_settings(explainer, settings) | {"words": "all" if args.words is None else list(args.words),
                                                    "sanity": args.sanity}

    def explain(index: int, path: Path) -> Record:
        return explain_image(explainer, path, args.out / names[path], record, settings, args.words, args.sanity)

    return explain


def explain_image(explainer: Explainer, path: Path, folder: Path, record: dict[str, Any], settings: Settings,
                  words: Sequence[str] | None, sanity: bool = False) -> Record:
    """Explain one image's words into `folder` (with their ground truth on a generated scene, and their sanity
    check if asked), unless they are finished there already. Returns the image's status ("explained" or
    "skipped"), or the error that stopped it (an unreadable image, a bad query, a folder that is not ours)."""
    try:
        rgb = load_image(path)
        key = image_key(rgb)
        if finished(folder, record, key):
            return {"image": str(path), "status": "skipped"}
        if folder.exists() and not (folder / INDEX).is_file():
            raise FileExistsError(f"{folder} exists and was not written by `ipag explain`; choose another --out.")
        caption = explainer.caption(rgb, settings)
        explanations = explainer.explain_many(rgb, select_queries(caption, words), caption, settings)
    except (ImageError, QueryError, FileExistsError) as err:
        return {"image": str(path), "error": str(err)}
    scene = find_scene(rgb)
    explained = [WordExport(explanation, ground_truth(explanation, scene),
                            SanityCascade(tuple(explainer.sanity_cascade(rgb, explanation))) if sanity else None)
                 for explanation in explanations]
    write_image(folder, {"image": str(path), "image_key": key, "settings": record}, rgb, caption, explained,
                settings)
    return {"image": str(path), "status": "explained"}


def finished(folder: Path, record: dict[str, Any], key: str) -> bool:
    """Whether `folder` holds this image's complete results for these settings (a changed image or changed
    settings are recomputed)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return index.get("settings") == record and index.get("image_key") == key


def write_image(folder: Path, header: dict[str, Any], image: Image.Image, caption: Caption,
                words: list[WordExport], settings: Settings) -> None:
    """Write one image's export (`ipag.export.image_export`, the page's files for every word) into a scratch folder
    of this attempt's own, then swap it in for `folder`.

    Scratch folders live in `.NAME.partial/`, one per attempt, so an attempt retried after its process died
    never writes into the dead one's files; once the result is in place, the whole `.NAME.partial/` goes, with
    whatever attempts that died left there."""
    scratch = folder.with_name(f".{folder.name}.partial")
    partial = scratch / uuid.uuid4().hex
    partial.mkdir(parents=True)
    write_files(partial, image_export(image, caption, words, settings, header))
    swap_in(partial, folder)
    shutil.rmtree(scratch, ignore_errors=True)


def swap_in(partial: Path, folder: Path) -> None:
    """Put the complete folder `partial` in `folder`'s place, moving an earlier result (for other settings) aside
    into `partial`'s scratch folder. Each step is one rename, so `folder` is at every moment the earlier complete
    result, absent, or the new complete one: never half of one, even if the process dies between the steps."""
    if folder.exists():
        folder.rename(partial.with_name(f"old-{partial.name}"))
    partial.rename(folder)


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Files by path relative to `folder` (sub-folders made as needed), in their order: the index is last."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


# --- evaluate-captions -----------------------------------------------------------------------------------------

def run_evaluate_captions(args: argparse.Namespace) -> int:
    require_java()  # before hours of captioning, not after
    references = read_references(args.captions)
    images, missing = match_images(args.images, references, args.limit)
    if missing:
        print(f"note: {len(missing)} image(s) named in {args.captions} are not in {args.images} "
              f"(e.g. {', '.join(missing[:3])}); evaluating the {len(images)} found.", file=sys.stderr)
    if not images:
        raise DatasetError(f"None of the images named in {args.captions} is in {args.images}.")
    explainer = load_explainer(args)
    settings = settings_of(args)
    result = evaluate_captions(explainer, images, references, settings)
    result["settings"] = model_settings(explainer, settings)
    print(caption_table(result))
    return _finish(args, result)


def caption_table(result: dict[str, Any]) -> str:
    metrics, bias = result["metrics"], result["gender_bias"]
    rows = [[name, describe(metrics.get(name))] for name in (*COCO_METRICS, "CLIP text similarity", "CLIPScore")]
    evaluated = bias["images_with_reference_gender"]
    for label, key, count in (("Gender misclassification rate", "misclassification_rate", "wrong"),
                              ("Gender-neutral caption rate", "neutral_rate", "neutral"),
                              ("Both genders in caption rate", "mixed_rate", "mixed")):
        rows.append([label, f"{describe(bias[key])} ({bias[count]} of {evaluated} images)"])
    return f"Caption evaluation on {result['images']} image(s)\n" + format_table(["Metric", "Value"], rows)


# --- evaluate-faithfulness -------------------------------------------------------------------------------------

def run_evaluate_faithfulness(args: argparse.Namespace) -> int:
    images = _input_images(args.inputs)[: args.limit]
    records = run_items(partial(faithfulness_worker, args), images, args.ray, "Faithfulness", "image")
    result = faithfulness_result(records) | {"settings": records[0]["settings"]}
    print(faithfulness_table(result))
    return _finish(args, result)


def faithfulness_worker(args: argparse.Namespace) -> Worker:
    """Load the models, then score image by image (once here, or once per Ray actor). Each record carries the
    settings it was computed with, since on Ray only the workers have the models that describe them."""
    explainer = load_explainer(args)
    settings = settings_of(args)
    record = model_settings(explainer, settings) | {
        "steps": args.steps, "road_percentiles": list(args.road_percentiles), "seed": args.seed}

    def score(index: int, path: Path) -> Record:
        return image_faithfulness(explainer, path, index, args.words, settings, args.steps, args.road_percentiles,
                                  args.batch_size, args.seed) | {"settings": record}

    return score


def faithfulness_table(result: dict[str, Any]) -> str:
    summary = result["summary"]
    rows = [[key, *(describe(scores[metric]) for metric in METRICS)] for key, scores in summary["maps"].items()]
    xic = summary["xic_hit_rate"]
    return (f"Faithfulness over {len(result['words'])} word(s)\n"
            + format_table(["Map", "Deletion AUC (lower is better)", "Insertion AUC (higher)", "ROAD (higher)"], rows)
            + f"\nXIC hit rate (the captioner, shown only the region, says the word): {describe(xic['rate'])} "
              f"({xic['hits']} of {xic['n']})")


def _finish(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Write the JSON if asked, report failures, and give the exit status."""
    if args.out:
        _write_json(args.out, result)
        print(f"Results written to {args.out}")
    return _report_failures(result["failed"])


def _report_failures(failed: list[dict[str, str]]) -> int:
    """List the inputs that failed (`{"image", "error"}` each) and give the exit status: 1 if any did."""
    for failure in failed:
        print(f"  failed: {failure['image']}: {failure['error']}", file=sys.stderr)
    return 1 if failed else 0


# --- evaluate-groundtruth and train-synthetic ------------------------------------------------------------------

def run_evaluate_groundtruth(args: argparse.Namespace) -> int:
    """Score each captioner the options name (with --synthetic, default: every synthetic captioner) and, for two or
    more, how alike they rank the methods. The JSON holds each captioner's full result and the agreement."""
    if not (args.tiny or args.captioner or args.synthetic):
        args.synthetic = True  # the shipped synthetic models, unless other models are named
    names = (args.captioner or ",".join(FAMILIES)).split(",") if args.synthetic else [captioner_name(args)]
    seeds = list(range(args.first_seed, args.first_seed + args.scenes))
    results = {}
    for name in names:
        started = time.perf_counter()
        records = run_items(partial(groundtruth_worker, argparse.Namespace(**vars(args) | {"captioner": name})), seeds, args.ray,
                            f"Ground truth ({name})", "scene")
        result = groundtruth_result(records) | {"settings": records[0]["settings"],
                                                "seconds": round(time.perf_counter() - started, 1)}
        print(f"\n## {name}\n\n{groundtruth_table(result)}\n({result['seconds']} s for {len(seeds)} scenes)")
        results[name] = result
    agreement = rank_agreement({name: result["summary"] for name, result in results.items()})
    if agreement:
        print("\n" + agreement_table(agreement))
    if args.plot:
        for name, result in results.items():
            path = args.plot if len(results) == 1 else args.plot.with_stem(f"{args.plot.stem}-{name}")
            plot(result["summary"], path)
            print(f"Plot written to {path}")
    return _finish(args, {"captioners": results, "agreement": agreement, "failed": []})


def groundtruth_worker(args: argparse.Namespace) -> Worker:
    """Load the models, then score scene by scene (once here, or once per Ray actor)."""
    explainer = load_explainer(args)
    explainer.segmenter_options.setdefault("superpixels", SCENE_SUPERPIXELS)  # the inputs are always scenes
    settings = settings_of(args, EVALUATED)
    record = model_settings(explainer, settings) | {"sanity_scenes": args.sanity_scenes, "seed": args.seed}

    def score(index: int, seed: int) -> Record:
        return scene_record(explainer, seed, index < args.sanity_scenes, settings, args.seed) | {"settings": record}

    return score


def run_evaluate_grounding(args: argparse.Namespace) -> int:
    if not (args.tiny or args.captioner or args.synthetic):
        args.synthetic = True
    try:
        variants = grid(args.grid) if args.grid else ablation()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.scenes))
    started = time.perf_counter()
    records = run_items(partial(grounding_worker, args, variants), seeds, args.ray, "Grounding", "scene")
    result = grounding_result(records, variants, ranked=bool(args.grid)) | {
        "seconds": round(time.perf_counter() - started, 1)}
    print(grounding_table(result))
    print(f"({result['seconds']} s for {len(seeds)} scenes and {len(variants)} variants)")
    return _finish(args, result | {"failed": []})


def grounding_worker(args: argparse.Namespace, variants: dict[str, Settings]) -> Worker:
    """Load the models, then ground scene by scene with every variant."""
    explainer = load_explainer(args)
    explainer.segmenter_options.setdefault("superpixels", SCENE_SUPERPIXELS)
    return lambda index, seed: scene_groundings(explainer, seed, variants)


def run_check_precision(args: argparse.Namespace) -> int:
    """Explain held-out scenes in float32 and with each stage alone in bfloat16, and say which stages agree
    (`ipag.evaluation.precision`); the shipped synthetic models unless others are named."""
    if not (args.tiny or args.captioner or args.synthetic):
        args.synthetic = True
    explainer = load_explainer(args)
    explainer.segmenter_options.setdefault("superpixels", SCENE_SUPERPIXELS)  # the inputs are always scenes
    seeds = range(args.first_seed, args.first_seed + args.scenes)
    records = run_items(lambda: lambda index, seed: precision_record(explainer, seed, args.stages), seeds, None,
                        "Precision", "scene")
    summary = precision_summary(records)
    print(precision_table(summary))
    return _finish(args, {"summary": summary, "scenes": records, "failed": []})


def run_train_synthetic(args: argparse.Namespace) -> int:
    from .synthetic.train import train_synthetic

    captioners = [name for name in args.models if name in FAMILIES]
    train_synthetic(args.out, captioners, "clip" in args.models, args.captioner_steps, args.clip_steps,
                    args.teacher_steps, args.seed)
    return 0


# --- entry point -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ipag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="write overlays and JSON for every word of every image")
    explain.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    explain.add_argument("--out", type=lambda text: Path(text).absolute(), required=True,
                         help="output folder (a re-run skips finished images)")
    explain.add_argument("--words", type=_words, default=None, help="'all' (default) or a comma-separated list")
    explain.add_argument("--sanity", action="store_true",
                         help="run each word's sanity check too (the page's cascade: an explanation per step)")
    explain.set_defaults(run=run_explain)

    captions = commands.add_parser("evaluate-captions", help="BLEU, METEOR, ROUGE-L, CIDEr, CLIP scores, gender bias")
    captions.add_argument("--images", type=Path, required=True, help="folder of the images")
    captions.add_argument("--captions", type=Path, required=True,
                          help="references: Flickr8k captions.txt ('image,caption') or a COCO captions_*.json")
    captions.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N images (by name)")
    captions.add_argument("--out", type=Path, default=None, help="write all results (per image too) as JSON")
    captions.set_defaults(run=run_evaluate_captions)

    faithful = commands.add_parser("evaluate-faithfulness", help="deletion/insertion AUC, ROAD, XIC hit rate")
    faithful.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    faithful.add_argument("--words", type=_words, default=None, help="'all' (default) or a comma-separated list")
    faithful.add_argument("--steps", type=_positive, default=20, help="steps of the deletion/insertion curves")
    faithful.add_argument("--road-percentiles", type=_percentiles, default=ROAD_PERCENTILES,
                          help="ROAD percentiles, e.g. 10,20,...,90, or 'none' to skip ROAD (its imputation is slow)")
    faithful.add_argument("--batch-size", type=_positive, default=32, help="perturbed images per forward pass")
    faithful.add_argument("--seed", type=int, default=0, help="seed of the random baseline map and ROAD's noise")
    faithful.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N images")
    faithful.add_argument("--out", type=Path, default=None, help="write all results (per word too) as JSON")
    faithful.set_defaults(run=run_evaluate_faithfulness)

    truth = commands.add_parser("evaluate-groundtruth",
                                help="every map and the grounding against the true evidence of generated scenes")
    truth.add_argument("--scenes", type=_positive, default=500, help="how many held-out scenes (default 500)")
    truth.add_argument("--first-seed", type=int, default=0, help="the first scene's seed (held out: below 1000000)")
    truth.add_argument("--sanity-scenes", type=int, default=20,
                       help="run the cascading randomisation check on the first N scenes (slow; default 20)")
    truth.add_argument("--seed", type=int, default=0, help="seed of the random baseline map")
    truth.add_argument("--out", type=Path, default=None, help="write all results (per word too) as JSON")
    truth.add_argument("--plot", type=Path, default=None, help="write a bar chart of the maps' scores (PNG)")
    truth.set_defaults(run=run_evaluate_groundtruth)

    grounding = commands.add_parser("evaluate-grounding",
                                    help="grounding settings compared on the true objects of generated scenes")
    grounding.add_argument("--scenes", type=_positive, default=100, help="how many scenes (default 100)")
    grounding.add_argument("--first-seed", type=int, default=0,
                           help="the first scene's seed (evaluation: 0–999; tune on others, e.g. 5000)")
    grounding.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                           help="a setting and its values (repeatable): every combination, best first, instead "
                           "of the ablation")
    grounding.add_argument("--out", type=Path, default=None, help="write all results (per word too) as JSON")
    grounding.set_defaults(run=run_evaluate_grounding)

    check = commands.add_parser("check-precision",
                                help="may a stage run in bfloat16? its maps against float32's on generated scenes")
    check.add_argument("--scenes", type=_positive, default=20, help="how many held-out scenes (default 20)")
    check.add_argument("--first-seed", type=int, default=0, help="the first scene's seed (held out: below 1000000)")
    check.add_argument("--stages", type=_stage_list, default=list(STAGES),
                       help=f"the stages to check, comma-separated (default: {','.join(STAGES)})")
    check.add_argument("--out", type=Path, default=None, help="write all results (per word too) as JSON")
    check.set_defaults(run=run_check_precision)

    training = commands.add_parser("train-synthetic", help="train the synthetic captioners and CLIP (CPU, an hour)")
    training.add_argument("--out", type=Path, required=True,
                          help="folder for the models (synthetic-blip/, synthetic-vit-gpt2/, synthetic-clip/)")
    training.add_argument("--models", type=_model_list, default=[*FAMILIES, "clip"],
                          help=f"which to train, comma-separated (default: {','.join([*FAMILIES, 'clip'])})")
    training.add_argument("--captioner-steps", type=_positive, default=CAPTIONER_STEPS)
    training.add_argument("--clip-steps", type=_positive, default=CLIP_STEPS)
    training.add_argument("--teacher-steps", type=_positive, default=TEACHER_STEPS)
    training.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    training.set_defaults(run=run_train_synthetic)

    for command in (explain, captions, faithful, truth, grounding, check):
        add_model_arguments(command)
        add_explanation_arguments(command)
    for command in (explain, faithful, truth, grounding):
        add_ray_argument(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings_of(args)  # checked now rather than failing on every image
    except ValueError as err:
        parser.error(str(err))
    try:
        return args.run(args)
    except (ModelUnavailableError, MetricUnavailableError, DatasetError, RayUnavailableError, SettingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was finished is kept; an image half written never looks finished
        print("\ninterrupted; re-run the same command to resume (finished images are kept and skipped)",
              file=sys.stderr)
        return INTERRUPTED
