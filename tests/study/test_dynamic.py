"""Dynamic evaluation (Figures 8/9) on a fixed tiny backbone and scale model: choices, records, reuse of static
results."""

import json

import numpy as np
import pytest
import torch

from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.runtime.runners import choose
from dynres.study.dynamic import DynamicConfig, decide, run_dynamic
from dynres.study.static import EvalConfig, run_static

GRID = (16, 24, 32, 48)  # the scale model's grid (conftest.models)
CROPS = (0.25, 1.0)


def test_choice_rules():
    probs = np.array([[0.5, 0.9, 0.95], [0.8, 0.2, 0.1]])
    cost = np.array([1.0, 4.0, 9.0])
    assert choose(probs, cost, None).tolist() == [2, 0]
    assert choose(probs, cost, 0.1).tolist() == [1, 0]  # 0.95 - 0.1 < 0.9 - 0.1 * 4 / 9
    assert choose(probs, cost, 10.0).tolist() == [0, 0]


def test_scale_decision_reads_only_the_prefix_it_is_given(models):
    store, _, scale = models
    key = store.keys[0]
    store.bytes_read = 0
    prefix = store.read(key, scans=2)
    assert store.bytes_read == store.prefix_size(key, 2) < len(store.read(key))  # the EOI marker is not read
    resolution, probs = decide(scale, prefix, crop_area=0.56)
    assert resolution in GRID and probs.shape == (len(GRID),)
    assert decide(scale, bytes(prefix), crop_area=0.56)[0] == resolution  # a pure function of those bytes


def test_dynamic_eval_records(tmp_path, models):
    store, backbone, scale = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    run_static(backbone, store, tmp_path, cfg, progress=False)
    store.bytes_read = 0
    result = run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0, 0.5, 5.0)), cfg,
                         progress=False)
    # the scale model read each image's 2-scan prefix once (all crops come from it), nothing else
    assert result["scale_bytes_read"] == sum(store.prefix_size(k, 2) for k in store.keys)
    assert {r["crop"] for r in result["dynamic"]} == set(CROPS)
    assert all(r["lambda"] is None for r in result["dynamic"])
    static_best = {c: max(r["accuracy"] for r in result["static"] if r["crop"] == c) for c in CROPS}
    smallest = {r["resolution"]: r["gflops"] for r in result["static"]}[16]
    for o in result["oracle"]:
        assert o["accuracy"] >= static_best[o["crop"]]
    for point in result["cost_aware"]:
        if point["lambda"] == 5.0:  # a huge cost weight always picks the cheapest resolution
            assert point["gflops"] == pytest.approx(smallest + result["scale_gflops"])
    for row in result["summary"]:  # iso-cost: the most accurate sweep point within the best static's GFLOPs
        affordable = [q for q in result["cost_aware"] if q["crop"] == row["crop"]
                      and q["gflops"] <= row["best_static_gflops"]]
        assert row["iso_cost_accuracy"] == (max(q["accuracy"] for q in affordable) if affordable else None)
    assert (tmp_path / "dynamic.png").stat().st_size > 1000
    assert "Oracle" in (tmp_path / "dynamic.md").read_text()


def test_dynamic_eval_does_not_reuse_another_backbones_static_results(tmp_path, models):
    store, backbone, scale = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    run_static(backbone, store, tmp_path, cfg, progress=False)
    torch.manual_seed(1)
    other = save_checkpoint(create_model("resnet_tiny", 3),
                            ModelMeta(arch="resnet_tiny", classes=tuple(store.classes), train_resolution=32),
                            tmp_path / "other" / "model.pt")
    run_dynamic(other, scale, store, tmp_path, DynamicConfig(lambdas=(0.0,), plot=False), cfg, progress=False)
    assert json.loads((tmp_path / "static.json").read_text())["checkpoint"] == str(other)  # recomputed


def test_the_record_carries_the_configured_tolerance_and_the_markdown_states_it(tmp_path, models):
    store, backbone, scale = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    result = run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0, 0.5, 5.0), tolerance=2.0,
                                                                         plot=False), cfg, progress=False)
    assert result["tolerance"] == 2.0
    assert json.loads((tmp_path / "dynamic.json").read_text())["tolerance"] == 2.0
    assert "within 2 points of the best static" in (tmp_path / "dynamic.md").read_text()
    for row in result["summary"]:  # the cost-aware pick is the cheapest point within that tolerance
        within = [q for q in result["cost_aware"] if q["crop"] == row["crop"]
                  and q["accuracy"] >= row["best_static_accuracy"] - 2.0]
        assert row["cost_aware_gflops"] == (min(q["gflops"] for q in within) if within else None)


def test_dynamic_eval_reuses_the_static_results_of_the_same_backbone(tmp_path, models):
    store, backbone, scale = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    run_static(backbone, store, tmp_path, cfg, progress=False)
    record = json.loads((tmp_path / "static.json").read_text())
    (tmp_path / "static.json").write_text(json.dumps(record | {"marker": "kept"}))
    run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0,), plot=False), cfg, progress=False)
    assert json.loads((tmp_path / "static.json").read_text())["marker"] == "kept"  # not recomputed
    smaller = EvalConfig(grid=GRID, crops=(1.0,), batch_size=4)  # a record that covers more is reused too
    run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0,), plot=False), smaller, progress=False)
    assert json.loads((tmp_path / "static.json").read_text())["marker"] == "kept"
    wider = EvalConfig(grid=GRID, crops=(0.5, 1.0), batch_size=4)  # one that covers less is not
    run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0,), plot=False), wider, progress=False)
    assert "marker" not in json.loads((tmp_path / "static.json").read_text())


@pytest.mark.parametrize("bad, setting", [
    ({"lambdas": ()}, "lambdas"), ({"lambdas": (0.0, -0.1)}, "lambdas"), ({"tolerance": -1.0}, "tolerance"),
    ({"scans": 0}, "scans"),
])
def test_a_dynamic_config_refuses_bad_settings_when_built(bad, setting):
    from dynres.errors import ConfigError

    with pytest.raises(ConfigError, match=setting):
        DynamicConfig(**bad)


def test_the_default_sweep_reaches_the_cheapest_resolution_whatever_p_says():
    """The λ sweep spans the cost range: its largest λ sends every image to the cheapest resolution of the paper's
    grid (costs as resolution²), so a cheap best static resolution always has a point of the sweep to meet."""
    from dynres.paper import PAPER_GRID
    from dynres.study.dynamic import DEFAULT_LAMBDAS

    cost = np.array([float(r) ** 2 for r in PAPER_GRID])
    p = np.random.default_rng(0).random((500, len(PAPER_GRID)))
    p[:, 0], p[:, 1] = 0.0, 1.0  # the strongest preference against the cheapest resolution
    assert (choose(p, cost, max(DEFAULT_LAMBDAS)) == 0).all()
    assert (choose(p, cost, 1.0) != 0).all()  # where the sweep stopped before
