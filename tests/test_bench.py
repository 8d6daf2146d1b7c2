"""The benchmark's bookkeeping, on tiny models: every metric reported, ratios consistent, goals judged right.

No timing thresholds here: how fast the playground is lives in `python -m ipag.bench`, not in tests.
"""

import contextlib
import io
import json
import math
import statistics

import pytest
import torch
from transformers import BertTokenizer, BlipConfig

from ipag import bench


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run through the command line: (returned results, the JSON file's content, printed table)."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:  # one thread: tiny models gain nothing from more, and on a busy machine each parallel op waits for a core
        with contextlib.redirect_stdout(printed):
            results = bench.main(["--tiny", "--runs", "1", "--device", "cpu", "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    return results, json.loads(path.read_text()), printed.getvalue()


def test_every_metric_is_reported_positive_and_finite(run):
    results, _, _ = run
    assert list(results["metrics"]) == [metric.key for metric in bench.METRICS]
    for key, value in results["metrics"].items():
        assert math.isfinite(value) and value > 0, key
    assert results["metrics"]["explanation_gflop"] > 0
    for key, values in results["samples"].items():
        assert len(values) == 1, key
    assert list(results["grounding"]) == list(bench.GROUNDING_VARIANTS)
    assert all(cost["prepare_s"] > 0 and cost["word_s"] > 0 for cost in results["grounding"].values())


def test_medians_and_ratios_are_consistent(run):
    results, _, _ = run
    metrics = results["metrics"]
    for key, values in results["samples"].items():
        assert metrics[key] == statistics.median(values), key
    assert metrics["speedup_vs_original"] == pytest.approx(metrics["original_way_s"] / metrics["click_s"])
    assert metrics["flop_floor_s"] == pytest.approx(metrics["explanation_gflop"] / metrics["matmul_peak_gflops"])
    assert metrics["flop_floor_ratio"] == pytest.approx(metrics["explanation_s"] / metrics["flop_floor_s"])


def test_goals_are_judged_against_their_limits(run):
    results, _, _ = run
    goals = {goal.metric: goal for goal in bench.CPU_GOALS}
    assert [g["metric"] for g in results["goals"]] == list(goals)
    for reported in results["goals"]:
        goal = goals[reported["metric"]]
        assert reported["value"] == results["metrics"][goal.metric]
        expected = reported["value"] >= goal.limit if goal.at_least else reported["value"] <= goal.limit
        assert reported["met"] is expected


def test_environment_json_and_table(run):
    results, saved, table = run
    assert saved == json.loads(json.dumps(results))
    env = results["environment"]
    assert env["device"] == "cpu" and env["tiny"] and env["threads"] == 1
    assert (env["caption_words"], env["caption_tokens"]) == (bench.CAPTION_WORDS, 12)
    assert env["clip_proposals"] >= 1
    for metric in bench.METRICS:
        assert metric.label in table
    assert "torch " + env["torch"] in table
    assert all(name in table for name in bench.GROUNDING_VARIANTS)


def test_budgets_and_peaks_are_reported_per_step(run):
    """Where the budgeted waits go, by section, and the default path's peak memory apart from the optional maps'."""
    results, _, table = run
    assert set(results["budgets"]) == set(bench.BUDGETED_STEPS)
    for spent in results["budgets"].values():
        assert {"forward", "decoder backward", "segmentation", "CLIP proposals"} <= set(spent["sections"])
        assert sum(section["seconds"] for section in spent["sections"].values()) > 0
    assert table.count("goes (medians)") == len(bench.BUDGETED_STEPS)
    metrics = results["metrics"]
    assert 0 < metrics["peak_rss_default_gb"] <= metrics["peak_rss_gb"]
    assert metrics["peak_rss_default_gb"] == max(max(results["peaks_gb"][key]) for key in bench.DEFAULT_PATH_STEPS)
    assert set(bench.DEFAULT_PATH_STEPS) < set(results["peaks_gb"])  # the comparison and the optional maps are not in it
    assert metrics["peak_rss_gb"] == max(max(values) for values in results["peaks_gb"].values())


def test_real_size_vocabulary_fits_blip_base_and_gives_the_same_caption_tokens():
    """The full-size run needs minutes; its tokenizer is checked here without building the model."""
    vocab = bench.bert_like_vocab()
    text = BlipConfig().text_config
    assert len(vocab) == text.vocab_size == len(set(vocab.values()))
    assert (vocab["[PAD]"], vocab["[SEP]"], vocab["[DEC]"]) == (text.pad_token_id, text.sep_token_id,
                                                                 text.bos_token_id)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    assert tokenizer.tokenize(bench.CAPTION) == ["a", "man", "riding", "a", "skate", "##board", "next", "to", "a",
                                                 "red", "car"]
    for query in bench.FREE_QUERIES:
        assert tokenizer.tokenize(query) == [query]


def test_runs_are_bounded_by_the_typed_queries():
    with pytest.raises(ValueError, match="runs"):
        bench.run_benchmark(runs=len(bench.FREE_QUERIES) + 1, tiny=True)


def test_page_benchmark_uploads_new_photos_and_reports_every_metric(tmp_path):
    """`scripts/bench_page.py` in tiny mode: each upload is a photo the cache has not seen (an earlier version
    re-used photos, so two of its three runs timed cache hits), and every metric is measured in the page."""
    from PIL import Image

    from ipag.cache import image_key
    from scripts import bench_page

    paths = bench_page.photos(tmp_path, 7, tiny=True)
    assert len({image_key(Image.open(path)) for path in paths}) == len(paths)
    results = bench_page.run_page_benchmark(runs=1, tiny=True)
    assert set(results["metrics"]) == set(bench_page.METRICS)
    assert all(math.isfinite(value) and value >= 0 for value in results["metrics"].values())
    assert results["backward_passes_on_precomputed_clicks"] == [0]
    report = bench_page.format_report(results)
    assert "in Chromium" in report and f"precision {results['environment']['precision']}" in report
    assert set(results["budgets"]) == set(bench_page.BUDGETED)
    assert "caption" in results["budgets"]["precompute_all_s"]["sections"]  # the upload's caption, then every word
