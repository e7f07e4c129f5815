"""report: every table and figure comes from the run's records; numbers in the report equal the JSON."""

import json

import pytest
from PIL import Image

from dynres.errors import DynresError
from dynres.report import figures
from dynres.report.document import build_report


def summary(tmp_path) -> dict:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.jpg")
    static = [{"crop": c, "resolution": r, "accuracy": 50 + r / 10 - c * 7, "gflops": r * r / 1e4}
              for c in (0.25, 1.0) for r in (56, 112, 168)]
    return {
        "wall_s": 123.4,
        "machine": {"cpu": "Test CPU", "cores": 2, "python": "3.11", "versions": {"torch": "2.14.1"}},
        "static": static,
        "dynamic": [{"crop": 0.25, "accuracy": 61.25, "gflops": 1.5, "read_savings": 0.31, "lambda": None},
                    {"crop": 0.25, "accuracy": 60.0, "gflops": 1.0, "read_savings": 0.3, "lambda": 5.0}],
        "oracle": [{"crop": 0.25, "accuracy": 77.5}],
        "calibration": [{"resolution": 112, "crop": 0.75, "acc_full": 70.0, "acc_calibrated": 69.5,
                         "read_savings": 0.25}],
        "calibration_sweep": [{"resolution": 112, "relative_bytes": b, "acc_change": -(1 - b)} for b in (0.5, 1.0)],
        "kernels": [{"model": "resnet18", "resolution": 112, "backend": b, "latency_ms": ms, "gflops_per_s": 100 / ms}
                    for b, ms in (("eager", 10.0), ("ort", 5.0), ("tuned", 5.0))],
        "pipeline": {"baseline": {"images_per_s": 10.0, "accuracy": 70.0, "bytes_per_image": 5e4, "p50_ms": 90.0,
                                  "p99_ms": 120.0},
                     "dynamic": {"images_per_s": 35.0, "accuracy": 71.0, "bytes_per_image": 3e4, "p50_ms": 30.0,
                                 "p99_ms": 40.0}},
        "samples": [{"path": "a.jpg", "resolution": 112, "class_name": "stripes"}],
    }


def test_report_renders_every_section_from_the_summary(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path)))
    html_path, md_path = build_report(tmp_path)
    md, page = md_path.read_text(), html_path.read_text()
    for needle in ("61.25", "77.5", "69.5", "3.5", "Test CPU"):  # dynamic acc, oracle, calibrated, 35/10 speedup
        assert needle in md, needle
    assert "LOSS > target" in md  # 0.5 points lost > 0.05 target is flagged
    assert page.count("data:image/png;base64,") == 4  # Figures 8/9, 6, 7 and the thumbnails (no io record)
    for fig in ("accuracy_vs_gflops", "calibration_sweep", "kernels_resnet18", "scale_choices"):
        assert (tmp_path / "figures" / f"{fig}.png").stat().st_size > 1000


def test_missing_sections_say_so_instead_of_failing(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 1.0}))
    _, md_path = build_report(tmp_path)
    assert "No static evaluation in this run." in md_path.read_text()


def test_a_run_without_summary_is_a_clear_error(tmp_path):
    with pytest.raises(DynresError, match="summary.json"):
        build_report(tmp_path)


def dynamic_summary() -> list[dict]:
    return [{"crop": 0.25, "best_static_resolution": 168, "best_static_accuracy": 65.05, "best_static_gflops": 2.8,
             "dynamic_accuracy": 61.25, "dynamic_gflops": 1.5, "lambda": 5.0, "cost_aware_accuracy": 60.0,
             "cost_aware_gflops": 1.0, "cost_aware_savings_pct": 64.3}]


def test_each_figure_is_drawn_by_its_function_in_report_figures(tmp_path, monkeypatch):
    drawn = []
    for name in ("accuracy_vs_gflops", "calibration_sweep", "kernel_throughput", "bytes_per_scan",
                 "scale_choice_thumbnails"):
        def spy(data, path, _draw=getattr(figures, name), _name=name):
            drawn.append((_name, path.relative_to(tmp_path).as_posix()))
            return _draw(data, path)

        monkeypatch.setattr(figures, name, spy)
    s = summary(tmp_path) | {"io": {"decode": [], "bytes_per_scan": [{"scans": n, "fraction_of_file": n / 4}
                                                                     for n in range(1, 5)]}}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    html_path, _ = build_report(tmp_path)
    assert sorted(drawn) == [("accuracy_vs_gflops", "figures/accuracy_vs_gflops.png"),
                             ("bytes_per_scan", "figures/bytes_per_scan.png"),
                             ("calibration_sweep", "figures/calibration_sweep.png"),
                             ("kernel_throughput", "figures/kernels_resnet18.png"),
                             ("scale_choice_thumbnails", "figures/scale_choices.png")]
    assert html_path.read_text().count("data:image/png;base64,") == 5


def test_the_report_draws_the_stage_figures_from_the_stage_records(tmp_path):
    """Figures 8/9 come from the dynamic record the summary points to, Figure 6 from the sweep rows: the report's
    PNGs are byte for byte what the stage's own call of the same function writes. A summary from before
    ``dynamic_tolerance`` gets the tolerance from the accuracy stage's recorded settings."""
    s = summary(tmp_path) | {"dynamic_summary": dynamic_summary(),
                             "stages": {"accuracy": {"outputs": {"dynamic": str(tmp_path / "dynamic.json")}}}}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    record = {"crops": [0.25], "static": [r for r in s["static"] if r["crop"] == 0.25],
              "dynamic": [{"crop": 0.25, "accuracy": 61.25, "gflops": 1.5, "lambda": None}],
              "cost_aware": [{"crop": 0.25, "accuracy": 60.0, "gflops": 1.0, "lambda": 5.0}],
              "oracle": [{"crop": 0.25, "accuracy": 77.5, "gflops": 0.9}]}
    (tmp_path / "dynamic.json").write_text(json.dumps(record))
    (tmp_path / "stages").mkdir()
    settings = {"inputs": {"chain": {"dynamic": {"tolerance": 1.5}}}}  # the accuracy stage's record
    (tmp_path / "stages" / "accuracy.json").write_text(json.dumps(settings))
    _, md_path = build_report(tmp_path)
    stage = figures.accuracy_vs_gflops(record, tmp_path / "stage" / "dynamic.png")
    assert (tmp_path / "figures" / "accuracy_vs_gflops.png").read_bytes() == stage.read_bytes()
    sweep = figures.calibration_sweep(s["calibration_sweep"], tmp_path / "stage" / "calibration_sweep.png")
    assert (tmp_path / "figures" / "calibration_sweep.png").read_bytes() == sweep.read_bytes()
    assert "within 1.5 points of the best static accuracy" in md_path.read_text()  # the recorded tolerance


def test_without_the_accuracy_stage_record_the_tolerance_is_not_made_up(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"dynamic_summary": dynamic_summary()}))
    _, md_path = build_report(tmp_path)
    md = md_path.read_text()
    assert "within the run's tolerance (its accuracy stage record is missing)" in md and "0.5 points" not in md


def test_the_tolerance_the_summary_records_is_rendered(tmp_path):
    s = summary(tmp_path) | {"dynamic_summary": dynamic_summary(), "dynamic_tolerance": 0.25}
    (tmp_path / "summary.json").write_text(json.dumps(s))
    _, md_path = build_report(tmp_path)
    assert "within 0.25 points of the best static accuracy" in md_path.read_text()


def verdict() -> dict:
    """The guard's record as `dynres run` writes it (dynres.study.verdict): dynamic at 25% crops, static at 100%."""
    return {
        "rule": "the guard's rule", "selection_images": 300, "held_out_images": 300,
        "views": {"static": "static_images_exact.parquet", "dynamic": "static_images_engine.parquet",
                  "dynamic_exact_images": 0},
        "crops": [{"crop": 0.25, "mode": "dynamic", "lambda": 0.05, "static_resolution": 112, "reason": "wins",
                   "held_discordance": {"dynamic_only": 20, "static_only": 7, "p_value": 0.019},
                   "held_static_accuracy": 70.25, "held_static_gflops": 0.041, "held_dynamic_accuracy": 74.75,
                   "held_dynamic_gflops": 0.038, "baseline_resolution": 112, "held_baseline_accuracy": 70.25,
                   "held_baseline_gflops": 0.041},
                  {"crop": 1.0, "mode": "static", "lambda": 0.1, "static_resolution": 168,
                   "reason": "less accurate: dynamic 88.5% vs static 89.25%", "held_static_accuracy": 89.25,
                   "held_static_gflops": 0.092, "held_dynamic_accuracy": 88.5, "held_dynamic_gflops": 0.09}],
        "pipeline": {"crop": 1.0, "guard_crop": 1.0, "served": "static_tuned", "reason": "the guard chose static",
                     "lambda": 0.1, "dynamic_mode": "dynamic", "static_resolution": 168, "baseline_resolution": 112,
                     "rows": {"static_tuned": {"images_per_s": 500.0, "accuracy": 85.5, "bytes_per_image": 9000.0,
                                               "gflops": 0.092},
                              "dynamic": {"images_per_s": 450.0, "accuracy": 85.0, "bytes_per_image": 7000.0,
                                          "gflops": 0.09},
                              "baseline": {"images_per_s": 200.0, "accuracy": 77.0, "bytes_per_image": 10000.0}}},
        "serving": "/runs/x/serving.json",
        "default_serving": {"crop": 0.75, "mode": "static", "infer": "dynres infer S --resolution 168",
                            "serve": "dynres serve --resolution 168"},
    }


def test_the_report_opens_with_the_verdict_rendered_from_the_records(tmp_path):
    run_config = {"rows": [{"setting": "scale.folds", "value": 3, "source": "file"},
                           {"setting": "scale.cheap", "value": False, "source": "default"}],
                  "warnings": ["dynamic.scans = 2 applies to the dynamic evaluation only"]}
    health = {"warnings": ["the backbone is no better than chance: best top-1 10.3%"]}
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"verdict": verdict() | {"health": health},
                                                                           "run_config": run_config}))
    _, md_path = build_report(tmp_path)
    md = md_path.read_text()
    verdict_at = md.index("## Verdict on this data")
    assert verdict_at < md.index("Warning: the backbone is no better than chance") < md.index("Recommended on")
    assert verdict_at < md.index("## Settings") < md.index("torch") < md.index("## Accuracy and GFLOPs")
    head = md[verdict_at:md.index("## Settings")]
    assert "25% crop: dynamic (λ=0.05); 100% crop: static 168 px" in head
    for needle in ("74.75", "89.25", "88.5", "less accurate", "2.50x the common baseline",
                   "dynres infer S --resolution 168", "Warning: dynamic.scans = 2", "9,000 bytes/image",
                   "r* and λ* chosen on 300 validation images; dynamic vs static decided on these 300 held-out",
                   "with every scan read; serving.json runs with the calibrated policy's reads",
                   "dynamic rows run at λ=0.1, static @168", "Timed dynamic row (dynamic, λ=0.1): 450 images/s",
                   "0.31 (dynamic at λ=0)",  # the calibration's dynamic row is at λ=0, not λ*: labelled
                   "static on the static engine's views, dynamic on the dynamic engine's decode-once views.",
                   "What the 300 held-out images can tell apart", "25% crop 20 / 7 (p = 0.019)"):
        assert needle in head, needle
    assert "folds=3" in md[md.index("## Settings"):]
    assert "The backbones learned" not in md  # not beside a warning that one did not


def test_the_verdict_says_how_far_above_chance_the_backbones_are(tmp_path):
    health = {"chance": 25.0, "warnings": [],
              "backbone": {"accuracy": 50.0, "crop": 1.0, "resolution": 168, "images": 400},
              "shards": [{"accuracy": 43.25}, {"accuracy": 48.75}], "scale_auc": {"min": 0.51, "max": 0.634}}
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"verdict": verdict() | {"health": health}}))
    md = build_report(tmp_path)[1].read_text()
    assert ("The backbones learned this data: best top-1 50.0% (100% crop, 168 px) on 400 validation images against "
            "chance 25.0%; the 2 shard backbones 43.2–48.8% on the images they label.") in md
    assert "Where static is recommended: the scale model's AUC on the validation images is 0.51–0.63" in md
    copies = health | {"warnings": ["3 of 400 validation images are byte-identical to training images"]}
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"verdict": verdict() | {"health": copies}}))
    md = build_report(tmp_path)[1].read_text()
    assert "The backbones learned this data" in md and "3 of 400 validation images are byte-identical" in md


def test_a_run_from_before_the_guard_says_it_has_no_verdict(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path)))
    _, md_path = build_report(tmp_path)
    assert "No verdict (a run from before the guard) in this run." in md_path.read_text()


def test_the_verdict_says_how_the_scale_models_p_was_recalibrated(tmp_path):
    rows = verdict()["crops"]
    rows[0] = rows[0] | {"recalibration": [[0.62, 0.1], [0.8, -0.3]]}
    rows[1] = rows[1] | {"recalibration": [[0.41, 0.2], [1.1, 0.0]]}
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"verdict": verdict() | {"crops": rows}}))
    md = build_report(tmp_path)[1].read_text()
    assert "on the 300 selection images: slopes 0.41–1.10 (1: its confidence taken as it is" in md
    assert "25% crop: dynamic (recalibrated p, λ=0.05)" in md
    (tmp_path / "summary.json").write_text(json.dumps(summary(tmp_path) | {"verdict": verdict()}))
    assert "recalibrated" not in build_report(tmp_path)[1].read_text()  # a run with `recalibrate = false`
