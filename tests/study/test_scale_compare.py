"""Scale-model candidates on a finished chain's labels: no shard backbone retrained, the run's own recipe, and the
"correct" candidate at the run's seed is the run's scale model again."""

import json

import pytest
import torch

from dynres.bench.scale import ScaleBenchConfig
from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint
from dynres.model.train import TrainConfig
from dynres.study.chain import ChainConfig, run_accuracy_chain
from dynres.study.scale import ScaleConfig, train_scale
from dynres.study.scale_compare import compare_scale_targets, run_scale_config
from dynres.study.static import EvalConfig
from tiny_store import MemoryStore


def test_candidates_are_trained_on_the_runs_labels_and_judged_on_val(tmp_path):
    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    crops = (0.5, 1.0)
    cfg = ChainConfig(backbone=backbone, scale=ScaleConfig(folds=2, crops=crops, epochs=1, batch_size=8,
                                                           arch="resnet_micro"), eval=EvalConfig(crops=crops))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    chain = run_accuracy_chain(train, val, tmp_path / "run", cfg, progress=False)
    payload = compare_scale_targets(train, val, tmp_path / "run", tmp_path / "bench",
                                    ScaleBenchConfig(targets=("correct", "margin")), progress=False)
    assert not (tmp_path / "bench" / "margin-seed0" / "fold0").exists()  # labels reused, no backbone retrained
    assert {(r["target"], r["crop"]) for r in payload["rows"]} == {(t, c) for t in ("correct", "margin")
                                                                   for c in crops}
    assert payload["recipe"]["arch"] == "resnet_micro" and payload["val_images"] == len(val.keys)
    # the baseline candidate is the run's own scale model, reused: retrained from the run's recipe it is the same
    assert not (tmp_path / "bench" / "correct-seed0").exists()
    _, meta = load_checkpoint(chain["scale_model"])
    again = train_scale(train, tmp_path / "again", run_scale_config(meta, tmp_path / "run/scale/scale_labels.parquet"),
                        progress=False)
    ours, runs = (load_checkpoint(p)[0].state_dict() for p in (again["scale_model"], chain["scale_model"]))
    assert all(torch.equal(ours[k], runs[k]) for k in runs)
    margin = load_checkpoint(tmp_path / "bench" / "margin-seed0" / "scale_model" / "model.pt")[1]
    assert margin.recipe["target"] == "margin"
    assert json.loads((tmp_path / "bench" / "bench_scale.json").read_text())["targets"] == ["correct", "margin"]
    assert "## Summary" in (tmp_path / "bench" / "bench_scale.md").read_text()


def test_an_unfinished_run_is_refused_before_training(tmp_path):
    store = MemoryStore(per_class=2)
    with pytest.raises(ConfigError, match="not a finished accuracy chain"):
        compare_scale_targets(store, store, tmp_path, tmp_path / "out", progress=False)
