"""study.summary: the summary schema assembled from the stages' own records."""

from dynres.study.stages import Study
from dynres.study.summary import assemble_summary, kernel_rows

DYN = {"static": [{"crop": 1.0, "resolution": 56, "accuracy": 50.0, "gflops": 0.1, "extra": 1}],
       "dynamic": [{"crop": 1.0, "accuracy": 52.0, "gflops": 0.09, "lambda": None}],
       "cost_aware": [{"crop": 1.0, "accuracy": 51.0, "gflops": 0.08, "lambda": 0.1}],
       "oracle": [{"crop": 1.0, "accuracy": 70.0, "gflops": 0.05}], "summary": [{"crop": 1.0}], "tolerance": 0.5}
CAL = {"calibration": [{"resolution": 56, "crop": 1.0, "acc_full": 50.0, "acc_calibrated": 49.9, "read_savings": 0.3,
                        "flag": False}], "dynamic": [{"crop": 1.0, "read_savings": 0.25}], "target": 0.05}
KERNELS = {"rows": [{"resolution": 56, "backend": "eager", "batch": 1, "latency_ms": 2.0},
                    {"resolution": 56, "backend": "eager", "batch": 8, "latency_ms": 9.0},
                    {"resolution": 56, "backend": "tvm", "batch": 1, "latency_ms": None}],
           "limits": {"gemm_gflops_per_s": 100.0}}
PIPE = {"pipeline": {"dynamic": {"images_per_s": 10.0, "accuracy": 50.0, "bytes_per_image": 1e4, "p50_ms": 1.0,
                                 "p99_ms": 2.0, "other": 0}}, "ratios": {"x": 1.5}}
IO = {"decode": [], "bytes_per_scan": [], "ingest": None}


def test_kernel_rows_keep_the_measured_batch_one_latencies():
    assert kernel_rows(KERNELS, "backbone") == [{"model": "backbone", "resolution": 56, "backend": "eager",
                                                 "latency_ms": 2.0, "gflops_per_s": None}]


def test_the_summary_copies_the_rows_the_report_needs(tmp_path):
    study = Study(tmp_path, total_stages=1)
    study.stage("a", {}, lambda: {"v": 1})
    s = assemble_summary(study, DYN, CAL, KERNELS, {"rows": []}, PIPE, IO, samples=[])
    assert s["stages"]["a"]["outputs"] == {"v": 1}
    assert s["static"] == [{"crop": 1.0, "resolution": 56, "accuracy": 50.0, "gflops": 0.1}]
    assert [d["lambda"] for d in s["dynamic"]] == [None, 0.1]  # the paper's rule, then the cost-aware sweep
    assert [d["read_savings"] for d in s["dynamic"]] == [0.25, 0.25]  # the calibrated pipeline's, per crop
    assert s["dynamic_tolerance"] == 0.5 and s["calibration_target"] == 0.05 and s["gemm_gflops_per_s"] == 100.0
    assert "flag" not in s["calibration"][0] and "other" not in s["pipeline"]["dynamic"]


def test_every_effective_setting_is_recorded_with_where_it_came_from(tmp_path):
    from dynres.study.runfile import load_study_config
    from dynres.study.summary import study_settings

    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\nfolds = 3\n[dynamic]\nscans = 2\n')
    settings = study_settings(load_study_config(tmp_path / "run.toml"))
    rows = {r["setting"]: r for r in settings["rows"]}
    assert rows["scale.folds"] == {"setting": "scale.folds", "value": 3, "source": "file"}
    assert rows["scale.cheap"] == {"setting": "scale.cheap", "value": False, "source": "default"}
    assert rows["backbone.epochs"]["source"] == "preset"  # dynres run's choice for a user's data, not TrainConfig's
    assert rows["calibration.target"]["source"] == "default" and "scale.backbone" not in rows
    assert any(w.startswith("dynamic.scans = 2") for w in settings["warnings"])  # a setting serving does not honour


def test_the_demo_records_its_settings_too(tmp_path):
    from dynres.study.demo import demo_study_config
    from dynres.study.summary import study_settings

    rows = {r["setting"]: r for r in study_settings(demo_study_config(tmp_path, quick=True))["rows"]}
    assert rows["quick"] == {"setting": "quick", "value": True, "source": "preset"}
    assert rows["scale.arch"]["value"] == "resnet_micro" and not any(r["source"] == "file" for r in rows.values())
    assert rows["scale.cheap"] == {"setting": "scale.cheap", "value": True, "source": "preset"}
    assert any(w.startswith("scale.cheap = true") for w in study_settings(demo_study_config(tmp_path, quick=True))
               ["warnings"])  # said, not silent
