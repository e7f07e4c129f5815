"""Scale-model candidates on a finished chain's labels: no shard backbone retrained, the run's own recipe, and the
"correct" candidate at the run's seed is the run's scale model again."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynres.bench.scale import ScaleBenchConfig
from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint
from dynres.model.train import TrainConfig
from dynres.study.bias import base_rates, guard_rules
from dynres.study.chain import ChainConfig, run_accuracy_chain
from dynres.study.dynamic import DynamicConfig
from dynres.study.scale import ScaleConfig, train_scale
from dynres.study.scale_compare import compare_scale_targets, run_scale_config
from dynres.study.static import EvalConfig
from dynres.study.verdict import run_guard
from tiny_store import MemoryStore

CROPS = (0.5, 1.0)


def tiny_run(tmp_path) -> tuple[MemoryStore, MemoryStore, dict]:
    """A tiny chain (two shard backbones, resnet_micro scale model) on in-memory data: train, val and its record."""
    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    cfg = ChainConfig(backbone=backbone, scale=ScaleConfig(folds=2, crops=CROPS, epochs=1, batch_size=8,
                                                           arch="resnet_micro"), eval=EvalConfig(crops=CROPS))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    return train, val, run_accuracy_chain(train, val, tmp_path / "run", cfg, progress=False)


def test_candidates_are_trained_on_the_runs_labels_and_judged_on_val(tmp_path):
    train, val, chain = tiny_run(tmp_path)
    payload = compare_scale_targets(train, val, tmp_path / "run", tmp_path / "bench",
                                    ScaleBenchConfig(targets=("correct", "margin")), progress=False)
    assert not (tmp_path / "bench" / "margin-seed0" / "fold0").exists()  # labels reused, no backbone retrained
    assert {(r["target"], r["crop"]) for r in payload["rows"]} == {(t, c) for t in ("correct", "margin")
                                                                   for c in CROPS}
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


def test_a_run_recorded_with_relative_paths_is_benchmarked_from_another_directory(tmp_path, monkeypatch):
    """`dynres demo` records paths relative to where it ran (runs/demo/...): the run's own scale model is found
    beside its record wherever the bench starts."""
    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    cfg = ChainConfig(backbone=backbone, scale=ScaleConfig(folds=2, crops=CROPS, epochs=1, batch_size=8,
                                                           arch="resnet_micro"), eval=EvalConfig(crops=CROPS))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    run_accuracy_chain(train, val, Path("runs/demo/accuracy"), cfg, progress=False)
    assert not Path(json.loads(Path("runs/demo/accuracy/scale/scale.json").read_text())["scale_model"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    payload = compare_scale_targets(train, val, tmp_path / "work/runs/demo/accuracy", tmp_path / "bench",
                                    ScaleBenchConfig(targets=("correct",)), progress=False)
    assert {r["crop"] for r in payload["rows"]} == set(CROPS)


def test_biased_rules_are_fitted_on_the_training_labels_and_judged_on_val(tmp_path):
    train, val, _ = tiny_run(tmp_path)
    payload = compare_scale_targets(train, val, tmp_path / "run", tmp_path / "bench",
                                    ScaleBenchConfig(targets=("correct",), rules=("anchor", "recentred"),
                                                     taus=(0.1, 1.0)), progress=False)
    names = ["correct", "b=0", "anchor@0.1", "anchor@1", "recentred"]
    assert list(dict.fromkeys(r["target"] for r in payload["rows"])) == names
    by = {(r["target"], r["crop"]): r for r in payload["rows"]}
    for c in CROPS:  # b = 0 is the run's own scale model under today's rule: the same numbers
        assert by["b=0", c]["argmax_accuracy"] == by["correct", c]["argmax_accuracy"]
        assert by["b=0", c]["iso_cost_accuracy"] == by["correct", c]["iso_cost_accuracy"]
    labels = pq.read_table(tmp_path / "run/scale/scale_labels.parquet")
    rates = base_rates(labels, payload["grid"])
    for fit in payload["rules"]["fit"]:  # the anchor is where the training labels' backbones were right most often
        assert fit["base_rate"] == pytest.approx(rates[fit["crop"]].tolist())
        assert fit["anchor_resolution"] == payload["grid"][int(np.argmax(rates[fit["crop"]]))]
    # the scale model's own held-out training images, as train_scale drew them: as many as it reported
    scale = json.loads((tmp_path / "run/scale/scale.json").read_text())
    assert payload["rules"]["p_out_of_sample_images"] == scale["heldout_images"]
    assert {r["family"] for r in payload["rules"]["guarded"]} == {"b=0", "train-rules", "anchor-r*", "all",
                                                                  "recalibrated", "recalibrated+anchor-r*"}
    assert "## Biased rules" in (tmp_path / "bench" / "bench_scale.md").read_text()
    # the study's guard gets the same fits from the chain (`[dynamic] rules` in a run file)
    rules = guard_rules(tmp_path / "run", DynamicConfig(rules=("anchor", "anchor-r*"), taus=(0.1,)), train)
    assert rules["anchor_taus"] == (0.1,) and list(rules["biases"]) == ["anchor@0.1"]
    assert rules["biases"]["anchor@0.1"][1.0].tolist() == payload["rules"]["bias"]["anchor@0.1"]["1.0"]
    dyn = json.loads((tmp_path / "run/eval/dynamic.json").read_text())
    guard = run_guard(tmp_path / "run/eval", dyn, val.keys[::2], (0.0, 0.5), **rules)
    assert all(r.get("rule") in (None, "b=0", "anchor@0.1", "anchor-r*@0.1") for r in guard["crops"])


def test_an_unfinished_run_is_refused_before_training(tmp_path):
    store = MemoryStore(per_class=2)
    with pytest.raises(ConfigError, match="not a finished accuracy chain"):
        compare_scale_targets(store, store, tmp_path, tmp_path / "out", progress=False)
