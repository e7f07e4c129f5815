"""Static evaluation (Table I) on a fixed tiny model and tiny in-memory data: views, the model runner, records."""

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynres.errors import ConfigError
from dynres.io.decode import decode
from dynres.model.checkpoint import load_checkpoint
from dynres.paper import crop_side, scaled_grid
from dynres.study.static import EvalConfig, GridModel, image_views, predict_grid, run_static
from tiny_store import MemoryStore

GRID = (16, 24, 32, 48)
CROPS = (0.25, 1.0)


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


def test_a_view_changes_only_with_the_bytes_behind_it():
    """A policy that reads every scan at some resolutions and fewer at others gives, where it reads every scan,
    exactly the full read's views (the prefix is decoded at the grid's size, not its own group's)."""
    store = MemoryStore(per_class=1)
    key = store.keys[0]
    total = store.num_scans(key)

    grid = (8, 16, 24)  # views smaller than the 56 px image, so the decoded size follows the views

    class Policy:
        def scans(self, k, r):
            return 1 if r == max(grid) else total  # a short read at the largest resolution only

    full = image_views(store, key, grid, (1.0,))
    mixed = image_views(store, key, grid, (1.0,), Policy())
    for (c, r), view in mixed.items():
        assert torch.equal(view, full[(c, r)]) == (r != max(grid)), (c, r)


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
    from dynres.runtime import backends

    store, backbone, _ = models
    model, _ = load_checkpoint(backbone)
    absent = dataclasses.replace(backends.BACKENDS["ort"], requires=("onnxruntime_not_here",))
    monkeypatch.setitem(backends.BACKENDS, "ort", absent)
    assert GridModel(model).backend == "eager"
    with pytest.raises(ConfigError, match="'onnxruntime_not_here' is not installed"):
        GridModel(model, "ort")


def test_an_onnx_runtime_model_that_disagrees_with_pytorch_is_never_used(models, monkeypatch):
    """Like the tuner's rejected candidates: a wrong export (injected) falls back to eager, with the number."""
    from dynres.runtime import backends

    store, backbone, _ = models
    model, _ = load_checkpoint(backbone)
    real = backends.ort_any_shape
    monkeypatch.setattr(backends, "ort_any_shape", lambda *a: (lambda x, run=real(*a): run(x) * 1.01))
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


@pytest.mark.parametrize("bad", [{"grid": ()}, {"grid": (4, 16)}, {"crops": ()}, {"crops": (0.0, 1.0)},
                                 {"crops": (1.5,)}])
def test_an_eval_config_refuses_bad_grids_and_crop_areas_when_built(bad):
    with pytest.raises(ConfigError, match="grid|crops"):
        EvalConfig(**bad)
