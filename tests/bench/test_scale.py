"""The scale-candidates record: per-crop rows from a candidate's records, the summary against the best static
resolution, and the Markdown (the runner itself is tested in tests/study/test_scale_compare.py)."""

import pytest

from dynres.bench.scale import ScaleBenchConfig, bench_scale_markdown, candidate_rows, summarize
from dynres.errors import ConfigError


def records(iso: float, argmax: float, aucs: tuple[float, float]) -> tuple[dict, dict]:
    scale = {"auc": [{"resolution": 16, "auc": 0.7}, {"resolution": 32, "auc": None}]}
    dynamic = {
        "summary": [{"crop": 1.0, "dynamic_accuracy": argmax, "dynamic_gflops": 0.05, "iso_cost_accuracy": iso,
                     "iso_cost_gflops": 0.04, "best_static_resolution": 32, "best_static_accuracy": 80.0,
                     "best_static_gflops": 0.06}],
        "auc": [{"crop": 1.0, "resolution": 16, "auc": aucs[0]}, {"crop": 1.0, "resolution": 32, "auc": aucs[1]}],
        "oracle": [{"crop": 1.0, "accuracy": 95.0}],
    }
    return scale, dynamic


def test_rows_and_summary_measure_each_candidate_against_the_best_static():
    rows = candidate_rows("correct", 0, *records(79.0, 78.0, (0.6, 0.8)))
    rows += candidate_rows("correct", 1, *records(81.0, 80.0, (0.7, 0.9)))
    rows += candidate_rows("margin", 0, *records(83.0, 82.0, (0.8, 0.9)))
    assert rows[0]["auc_min"] == 0.6 and rows[0]["auc_mean"] == pytest.approx(0.7)
    assert rows[0]["label_auc_mean"] == 0.7 and rows[0]["oracle_accuracy"] == 95.0  # a None AUC is left out
    summary = {(r["target"], r["crop"]): r for r in summarize(rows)}
    assert summary[("correct", 1.0)]["seeds"] == 2
    assert summary[("correct", 1.0)]["iso_cost_vs_best_static"] == pytest.approx(0.0)  # mean of 79 and 81 vs 80
    assert summary[("margin", "all")]["iso_cost_vs_best_static"] == pytest.approx(3.0)
    assert summary[("margin", "all")]["argmax_vs_best_static"] == pytest.approx(2.0)
    assert summary[("correct", "all")]["auc_min"] == pytest.approx(0.65)
    payload = {"val_images": 10, "run": "r", "labelled_images": 40, "scale_arch": "resnet_micro",
               "scale_resolution": 16, "seeds": [0, 1], "rows": rows, "summary": summarize(rows)}
    text = bench_scale_markdown(payload)
    assert "| margin | all |" in text and text.count("\n| correct |") == 4


def test_a_candidate_without_an_iso_cost_point_has_no_gap():
    rows = candidate_rows("prob", 0, *records(None, 78.0, (0.6, 0.8)))
    cell = [r for r in summarize(rows) if r["crop"] == 1.0][0]
    assert cell["iso_cost_vs_best_static"] is None and cell["argmax_vs_best_static"] == pytest.approx(-2.0)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="targets"):
        ScaleBenchConfig(targets=())
    with pytest.raises(ConfigError, match="seeds"):
        ScaleBenchConfig(seeds=(0, 0))
    with pytest.raises(ConfigError, match="probes"):  # the same candidate spelled twice
        ScaleBenchConfig(probes=("softmax-linear", "probe-softmax-linear"))
    with pytest.raises(ConfigError, match="head"):
        ScaleBenchConfig(probes=("softmax-forest",))
    assert ScaleBenchConfig(probes=("softmax-linear", "softmax-linear@84")).probes[1] == "softmax-linear@84"
    with pytest.raises(ConfigError, match="rules"):
        ScaleBenchConfig(rules=("anchor", "oracle"))
    with pytest.raises(ConfigError, match="taus"):
        ScaleBenchConfig(rules=("anchor",), taus=(-0.1,))
    assert ScaleBenchConfig(rules=("recentred",), taus=()).rules == ("recentred",)  # τ only matters to the anchor


def test_the_markdown_states_what_a_probe_costs():
    rows = candidate_rows("probe-softmax-linear", 0, *records(79.0, 78.0, (0.6, 0.8)))
    payload = {"val_images": 10, "run": "r", "labelled_images": 40, "scale_arch": "resnet_micro",
               "scale_resolution": 16, "seeds": [0], "rows": rows, "summary": summarize(rows),
               "probe_gflops": {"probe-softmax-linear": 0.0106}}
    text = bench_scale_markdown(payload)
    assert "probe-softmax-linear 0.0106" in text and "| probe-softmax-linear | all |" in text
    assert "Probe candidates" not in bench_scale_markdown(payload | {"probe_gflops": {}})
