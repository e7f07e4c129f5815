"""Static and dynamic evaluation on a fixed tiny model and tiny in-memory data."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_store import MemoryStore

from dynres.errors import ConfigError
from dynres.io.decode import decode
from dynres.model.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from dynres.model.nets import create_model
from dynres.paper import crop_side, scaled_grid
from dynres.runtime.runners import choose
from dynres.study.dynamic import DynamicConfig, decide, run_dynamic
from dynres.study.static import EvalConfig, GridModel, image_views, predict_grid, run_static

GRID = (16, 24, 32, 48)
CROPS = (0.25, 1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fixed (seeded, untrained) backbone and scale model: the numbers only have to be reproducible."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    store = MemoryStore(per_class=3)
    backbone = save_checkpoint(create_model("resnet_tiny", 3),
                               ModelMeta(arch="resnet_tiny", classes=tuple(store.classes), train_resolution=32),
                               root / "backbone.pt")
    scale = save_checkpoint(create_model("mobilenet_v2_tiny", len(GRID)),
                            ModelMeta(arch="mobilenet_v2_tiny", classes=(), train_resolution=16, task="scale",
                                      grid=GRID, scans=2), root / "scale.pt")
    return store, backbone, scale


def test_paper_grid_scales_with_the_train_resolution():
    assert scaled_grid(224) == (112, 168, 224, 280, 336, 392, 448)
    assert scaled_grid(112) == (56, 84, 112, 140, 168, 196, 224)


def test_fast_views_match_decode_up_to_resampling():
    store = MemoryStore(per_class=1)
    key = store.keys[0]
    fast = image_views(store, key, GRID, CROPS)
    exact = image_views(store, key, GRID, CROPS, exact=True)
    assert fast.keys() == exact.keys()
    for view in fast:
        assert fast[view].shape == (3, view[1], view[1])
        assert torch.equal(exact[view], decode(store.read(key), view[1], crop_side(view[0])))
        assert (fast[view].float() - exact[view].float()).abs().mean() < 12  # same geometry, other resampler


def test_ort_and_eager_evaluation_give_the_same_predictions(models):
    """ONNX Runtime (one session, any batch and size) runs the grid like PyTorch does."""
    store, backbone, _ = models
    model, _ = load_checkpoint(backbone)
    ort, eager = GridModel(model, "ort"), GridModel(model, "eager")
    assert (ort.backend, eager.backend, GridModel(model).backend) == ("ort", "eager", "ort")
    tables = [predict_grid(m, store, store.keys, GRID, CROPS, batch_size=4, progress=False) for m in (ort, eager)]
    assert tables[0].column("pred").to_pylist() == tables[1].column("pred").to_pylist()
    np.testing.assert_allclose(tables[0].column("prob").to_numpy(), tables[1].column("prob").to_numpy(), atol=1e-5)


def test_views_decoded_in_threads_give_the_rows_of_a_single_thread(models):
    store, backbone, _ = models
    model = GridModel(load_checkpoint(backbone)[0], "eager")
    one, two = (predict_grid(model, store, store.keys, GRID, CROPS, batch_size=2, progress=False, workers=w)
                for w in (1, 2))
    assert one.equals(two) and one.num_rows == len(store.keys) * len(GRID) * len(CROPS)


def test_evaluation_without_onnx_runtime_falls_back_to_eager_unless_asked_for_it(models, monkeypatch):
    from dynres.errors import ConfigError
    from dynres.runtime import backends as _backends

    store, backbone, _ = models
    model, _ = load_checkpoint(backbone)
    absent = dataclasses.replace(_backends.BACKENDS["ort"], requires=("onnxruntime_not_here",))
    monkeypatch.setitem(_backends.BACKENDS, "ort", absent)
    assert GridModel(model).backend == "eager"
    with pytest.raises(ConfigError, match="'onnxruntime_not_here' is not installed"):
        GridModel(model, "ort")


def test_an_onnx_runtime_model_that_disagrees_with_pytorch_is_never_used(models, monkeypatch):
    """Like the tuner's rejected candidates: a wrong export (injected) falls back to eager, with the number."""
    from dynres.errors import ConfigError
    from dynres.runtime import backends as _backends

    store, backbone, _ = models
    model, _ = load_checkpoint(backbone)
    real = _backends.ort_any_shape
    monkeypatch.setattr(_backends, "ort_any_shape", lambda *a: (lambda x, run=real(*a): run(x) * 1.01))
    assert GridModel(model).backend == "eager"
    with pytest.raises(ConfigError, match="differs from PyTorch's by 1.0e-02"):
        GridModel(model, "ort")


def test_static_eval_is_reproducible_and_consistent(tmp_path, models):
    store, backbone, _ = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    a = run_static(backbone, store, tmp_path / "a", cfg, progress=False)
    b = run_static(backbone, store, tmp_path / "b", cfg, progress=False)
    assert a["static"] == b["static"]
    table = pq.read_table(tmp_path / "a" / "static_images.parquet").to_pylist()
    assert len(table) == len(store.keys) * len(GRID) * len(CROPS)
    for row in a["static"]:  # each accuracy is the mean of its per-image rows
        hits = [t["correct"] for t in table if t["crop"] == row["crop"] and t["resolution"] == row["resolution"]]
        assert row["accuracy"] == pytest.approx(100 * sum(hits) / len(hits))
    flops = {r["resolution"]: r["gflops"] for r in a["static"]}
    assert [flops[r] for r in GRID] == sorted(set(flops.values()))  # cost grows with resolution
    assert json.loads((tmp_path / "a" / "static.json").read_text())["grid"] == list(GRID)
    assert "Resolution" in (tmp_path / "a" / "static.md").read_text()


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
    assert store.bytes_read == len(prefix) < len(store.read(key))
    resolution, probs = decide(scale, prefix, crop=0.56)
    assert resolution in GRID and probs.shape == (len(GRID),)
    assert decide(scale, bytes(prefix), crop=0.56)[0] == resolution  # a pure function of those bytes


def test_dynamic_eval_records(tmp_path, models):
    store, backbone, scale = models
    cfg = EvalConfig(grid=GRID, crops=CROPS, batch_size=4)
    run_static(backbone, store, tmp_path, cfg, progress=False)
    store.bytes_read = 0
    result = run_dynamic(backbone, scale, store, tmp_path, DynamicConfig(lambdas=(0.0, 0.5, 5.0)), cfg,
                         progress=False)
    # the scale model read each image's 2-scan prefix once (all crops come from it), nothing else
    assert result["scale_bytes_read"] == sum(len(store.read(k, scans=2)) for k in store.keys)
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


def test_accuracy_chain_runs_end_to_end_and_is_cached(tmp_path):
    from dynres.model.train import TrainConfig
    from dynres.study.chain import ChainConfig, run_accuracy_chain
    from dynres.study.scale import ScaleConfig

    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    cfg = ChainConfig(backbone=backbone, scale=ScaleConfig(folds=2, cheap=True, crops=CROPS, epochs=1, batch_size=8),
                      eval=EvalConfig(crops=CROPS))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    result = run_accuracy_chain(train, val, tmp_path, cfg, progress=False)
    dynamic = json.loads((tmp_path / "eval" / "dynamic.json").read_text())
    assert dynamic["grid"] == [16, 24, 32, 40, 48, 56, 64]  # the paper's 0.5x..2x around 32
    assert [s["crop"] for s in result["summary"]] == list(CROPS)
    (tmp_path / "backbone" / "model.pt").unlink()  # a cached chain does not touch its outputs again
    assert run_accuracy_chain(train, val, tmp_path, cfg, progress=False) == result


def test_an_eval_grid_is_the_whole_chains_grid(tmp_path):
    """A grid set for the evaluations is also the scale labels' and the scale model's (it was silently replaced
    by the default ratios once); two different grids are refused before anything trains."""
    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.train import TrainConfig
    from dynres.study.chain import ChainConfig, run_accuracy_chain
    from dynres.study.scale import ScaleConfig

    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    scale = ScaleConfig(folds=2, cheap=True, crops=(1.0,), epochs=1, batch_size=8)
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    cfg = ChainConfig(backbone=backbone, scale=scale, eval=EvalConfig(grid=(24, 40), crops=(1.0,)))
    result = run_accuracy_chain(train, val, tmp_path, cfg, progress=False)
    assert load_checkpoint(result["scale_model"])[1].grid == (24, 40)
    assert json.loads((tmp_path / "eval" / "static.json").read_text())["grid"] == [24, 40]
    clash = ChainConfig(backbone=backbone, scale=dataclasses.replace(scale, grid=(24, 48)), eval=cfg.eval)
    with pytest.raises(ConfigError, match="differ"):
        run_accuracy_chain(train, val, tmp_path / "clash", clash, progress=False)
    assert not (tmp_path / "clash" / "backbone").exists()


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
