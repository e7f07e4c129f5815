"""`bench pipeline` on a tiny store: every mode runs on the same images, (b)'s resolution and (c)'s λ are chosen
as documented, the ratios use the variant the rule picks, and the Markdown is rendered from the record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynres.bench.pipeline import MODES, PipelineBenchConfig, pipeline_record, render_markdown, run_bench_pipeline
from dynres.errors import ConfigError
from pipeline_fixtures import GRID, make_store, save_tiny_checkpoints


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bench-pipeline"))


@pytest.fixture(scope="module")
def models(store, tmp_path_factory):
    """Backbone and scale checkpoints, and a policy that reads 3 scans everywhere."""
    from dynres.policy.calibration import CalibrationPolicy, ReadRule

    root = tmp_path_factory.mktemp("bench-pipeline-models")
    backbone, scale = save_tiny_checkpoints(root)
    counts = np.full((len(store.keys), len(GRID)), 3)
    CalibrationPolicy(dict.fromkeys(GRID, ReadRule("ssim", 0.95)), tuple(store.keys), counts).save(root / "policy.json")
    return str(backbone), str(scale), str(root / "policy.json")


def test_bench_pipeline_writes_every_mode_and_their_ratios(store, models, tmp_path):
    backbone, scale, policy = models
    cfg = PipelineBenchConfig(batch_size=4, kernels="eager", warmup=2)
    run_bench_pipeline(str(store.root), backbone, scale, tmp_path / "out", policy, cfg=cfg, progress=False)
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    rows = record["pipeline"]
    assert set(rows) == {"baseline", "static_tuned", "dynamic", "dynamic_read_ahead", "dynamic_exact"}
    assert all({"images_per_s", "accuracy", "bytes_per_image", "p50_ms", "p99_ms"} <= set(r) for r in rows.values())
    assert record["images"] == len(store.keys) and all(r["images"] == len(store.keys) for r in rows.values())
    for row in rows.values():  # the median of the interleaved timed runs
        assert len(row["images_per_s_runs"]) == cfg.repeats
        assert row["images_per_s"] == sorted(row["images_per_s_runs"])[(cfg.repeats - 1) // 2]
    assert rows["baseline"]["read_fraction"] == 1.0  # the baseline always reads whole files
    assert rows["dynamic"]["bytes_per_image"] == rows["static_tuned"]["bytes_per_image"] == pytest.approx(
        sum(store.prefix_size(k, 3) for k in store.keys) / len(store.keys))  # the policy's 3 scans, nothing more
    assert record["static_resolution"] == max(record["static_sweep"], key=lambda r: (r["accuracy"], -r["resolution"]))[
        "resolution"]
    static_acc = next(r["accuracy"] for r in record["static_sweep"] if r["resolution"] == record["static_resolution"])
    for mode, lam in record["lams"].items():
        sweep = [r for r in record["lam_sweep"] if r["mode"] == mode]
        assert [r["lam"] for r in sweep] == list(cfg.lambdas)
        within = [r["lam"] for r in sweep if r["accuracy"] >= static_acc - cfg.tolerance]
        assert lam == max(within, default=0.0)  # each variant runs at the cheapest λ that keeps (b)'s accuracy
    best = record["ratios"]["dynamic_mode"]  # the targets judge the fastest variant that keeps (b)'s accuracy
    ok = [m for m in record["lams"] if rows[m]["accuracy"] >= rows["static_tuned"]["accuracy"] - cfg.tolerance]
    if ok:
        assert rows[best]["images_per_s"] == max(rows[m]["images_per_s"] for m in ok)
    assert record["ratios"]["dynamic_vs_baseline_images_per_s"] == pytest.approx(
        rows[best]["images_per_s"] / rows["baseline"]["images_per_s"])
    assert "(c)/(a)" in (tmp_path / "out" / "pipeline.md").read_text()


def test_fixed_operating_points_skip_the_sweeps_and_every_mode_runs_the_given_images(store, models, tmp_path):
    backbone, scale, policy = models
    keys = store.keys[::2]
    cfg = PipelineBenchConfig(batch_size=4, kernels="eager", warmup=2, repeats=1, static_resolution=48, lam=0.3)
    run_bench_pipeline(str(store.root), backbone, scale, tmp_path / "out", policy, cfg=cfg, progress=False, keys=keys)
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert list(record)[:2] == ["created", "machine"] and list(record)[-3:] == ["pipeline", "ratios", "targets"]
    assert record["static_sweep"] == [] and record["lam_sweep"] == []
    assert record["static_resolution"] == 48 and record["lams"] == dict.fromkeys(MODES[2:], 0.3)
    assert record["baseline_resolution"] == 48  # the backbone's train resolution
    rows = record["pipeline"]
    assert list(rows) == list(MODES)
    assert record["images"] == len(keys) and all(r["images"] == len(keys) for r in rows.values())
    assert all(len(r["images_per_s_runs"]) == 1 for r in rows.values())
    assert set(rows["static_tuned"]["resolution_histogram"]) == {"48"}
    # GFLOPs per image, as the guard counts them: what the served decision compares with the static row
    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.nets import gflops

    net, smodel = load_checkpoint(backbone)[0], load_checkpoint(scale)
    assert rows["static_tuned"]["gflops"] == rows["baseline"]["gflops"] == pytest.approx(gflops(net, 48))
    scale_g = gflops(smodel[0], smodel[1].train_resolution)
    for mode in MODES[2:]:
        hist = rows[mode]["resolution_histogram"]
        mean = sum(k * gflops(net, int(r)) for r, k in hist.items()) / sum(hist.values())
        assert rows[mode]["gflops"] == pytest.approx(mean + scale_g) and scale_g > 0
    markdown = (tmp_path / "out" / "pipeline.md").read_text()
    assert markdown == render_markdown(record).rstrip() + "\n"  # rendered from the record, nothing else


def mode_row(images_per_s: float, accuracy: float, bytes_per_image: float = 100.0, overhead: float = 0.05) -> dict:
    return {"images_per_s": images_per_s, "accuracy": accuracy, "bytes_per_image": bytes_per_image,
            "scale_overhead": overhead}


def test_the_ratios_use_the_fastest_dynamic_variant_within_the_tolerance():
    measured = {"pipeline": {
        "baseline": mode_row(10.0, 80.0, 400.0), "static_tuned": mode_row(20.0, 85.0, 200.0),
        "dynamic": mode_row(40.0, 84.8), "dynamic_read_ahead": mode_row(50.0, 84.0, 150.0),
        "dynamic_exact": mode_row(30.0, 85.0)}}
    record = pipeline_record(measured, tolerance=0.5)
    r = record["ratios"]
    assert r["dynamic_mode"] == "dynamic"  # read-ahead is faster but 1 point below (b)
    assert r["dynamic_vs_baseline_images_per_s"] == 4.0 and r["dynamic_vs_static_images_per_s"] == 2.0
    assert r["read_ahead_vs_dynamic_bytes"] == 1.5 and r["decode_once_minus_exact_accuracy"] == pytest.approx(-0.2)
    assert record["targets"] == {"dynamic_3x_baseline_at_no_lower_accuracy": True,
                                 "dynamic_1.3x_static_within_0.5_points": True, "scale_overhead_at_most_10pct": True}
    assert pipeline_record(measured, tolerance=2.0)["ratios"]["dynamic_mode"] == "dynamic_read_ahead"
    for row in measured["pipeline"].values():
        if row is not measured["pipeline"]["static_tuned"]:
            row["accuracy"] -= 5  # none within the tolerance: the most accurate variant
    assert pipeline_record(measured, tolerance=0.5)["ratios"]["dynamic_mode"] == "dynamic_exact"


@pytest.mark.parametrize("bad", [{"images": -1}, {"tolerance": -0.5}, {"lambdas": ()}, {"crop_side": 0.0}])
def test_a_bad_pipeline_bench_config_is_refused(bad):
    with pytest.raises(ConfigError):
        PipelineBenchConfig(**bad)


class _Timed:
    """An engine whose runs report a fixed images/s (accuracy 80%): what the timing loop sees of a mode."""

    def __init__(self, images_per_s: float):
        self.images_per_s = images_per_s

    def run(self, keys, progress=False):
        summary = {"images_per_s": self.images_per_s, "accuracy": 80.0, "bytes_per_image": 1.0, "p50_ms": 1.0,
                   "p99_ms": 1.0, "images": len(keys), "seconds": 1.0, "read_fraction": 1.0,
                   "resolution_histogram": {}, "scale_overhead": 0.0, "work_s": 1.0, "top5_accuracy": None}
        return type("Run", (), {"summary": summary})()


class _Store:
    def reset_stats(self):
        pass


@pytest.mark.parametrize("dynamic_speed, max_repeats, rounds", [
    (103.0, 7, 7),  # within 10% of the static row: timed up to max_repeats
    (97.0, 7, 7),  # on either side
    (150.0, 7, 3),  # clearly apart: the first 3 rounds decide
    (60.0, 7, 3),
    (103.0, 0, 3),  # max_repeats 0: exactly `repeats`
])
def test_close_rows_are_timed_longer_whichever_leads(dynamic_speed, max_repeats, rounds):
    from dynres.bench.pipeline import DYNAMIC, _time_modes

    engines = {"baseline": _Timed(50.0), "static_tuned": _Timed(100.0), **{m: _Timed(dynamic_speed) for m in DYNAMIC}}
    rows = _time_modes(_Store(), engines, ["k"] * 4, PipelineBenchConfig(repeats=3, max_repeats=max_repeats),
                       progress=False)
    assert {len(row["images_per_s_runs"]) for row in rows.values()} == {rounds}
