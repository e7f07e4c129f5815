"""The accuracy chain end to end on tiny in-memory data: one grid for every step, and its cached result."""

import dataclasses
import json

import pytest

from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint
from dynres.model.train import TrainConfig
from dynres.study.chain import ChainConfig, run_accuracy_chain
from dynres.study.dynamic import DynamicConfig
from dynres.study.scale import ScaleConfig
from dynres.study.static import EvalConfig
from tiny_store import MemoryStore

CROPS = (0.25, 1.0)


def test_accuracy_chain_runs_end_to_end_and_is_cached(tmp_path, monkeypatch):
    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    cfg = ChainConfig(backbone=backbone, scale=ScaleConfig(folds=2, cheap=True, crops=CROPS, epochs=1, batch_size=8),
                      eval=EvalConfig(crops=CROPS))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    result = run_accuracy_chain(train, val, tmp_path, cfg, progress=False)
    dynamic = json.loads((tmp_path / "eval" / "dynamic.json").read_text())
    assert dynamic["grid"] == [16, 24, 32, 40, 48, 56, 64]  # the paper's 0.5x..2x around 32
    assert [s["crop"] for s in result["summary"]] == list(CROPS)
    assert str(tmp_path) not in (tmp_path / "accuracy_chain.json").read_text()  # $RUN/...: a moved run reads its own
    (tmp_path / "backbone" / "model.pt").unlink()  # a cached chain does not touch its outputs again
    assert run_accuracy_chain(train, val, tmp_path, cfg, progress=False) == result
    other_rules = dataclasses.replace(cfg, dynamic=dataclasses.replace(cfg.dynamic, rules=()))
    (tmp_path / "eval" / "dynamic.json").unlink()  # the guard's rules are not the chain's: still cached
    assert run_accuracy_chain(train, val, tmp_path, other_rules, progress=False) == result
    import dynres.study.chain as chain

    ran = []
    monkeypatch.setattr(chain, "_run_chain", lambda *args: ran.append(args[1]) or result)
    other_val = MemoryStore(per_class=2, offset=60)  # other validation images: the record does not answer for them
    run_accuracy_chain(train, other_val, tmp_path, cfg, progress=False)
    assert ran == [other_val]


def test_an_eval_grid_is_the_whole_chains_grid(tmp_path):
    """A grid set for the evaluations is also the scale labels' and the scale model's (it was silently replaced
    by the default ratios once); two different grids are refused before anything trains."""
    backbone = TrainConfig(resolution=32, epochs=1, batch_size=8)
    scale = ScaleConfig(folds=2, cheap=True, crops=(1.0,), epochs=1, batch_size=8)
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    cfg = ChainConfig(backbone=backbone, scale=scale, eval=EvalConfig(grid=(24, 40), crops=(1.0,)))
    result = run_accuracy_chain(train, val, tmp_path, cfg, progress=False)
    assert load_checkpoint(result["scale_model"])[1].grid == (24, 40)
    assert json.loads((tmp_path / "eval" / "static.json").read_text())["grid"] == [24, 40]
    with pytest.raises(ConfigError, match="differ"):  # refused when the configuration is built
        ChainConfig(backbone=backbone, scale=dataclasses.replace(scale, grid=(24, 48)), eval=cfg.eval)


def test_rules_fitted_on_the_scale_labels_need_labels_at_every_evaluated_crop():
    scale = ScaleConfig(crops=(1.0,))
    with pytest.raises(ConfigError, match=r"not the evaluated crops \[0.25\]"):  # before anything trains
        ChainConfig(scale=scale, eval=EvalConfig(crops=(0.25, 1.0)), dynamic=DynamicConfig(rules=("recentred",), recalibrate=False))
    ChainConfig(scale=scale, eval=EvalConfig(crops=(0.25, 1.0)), dynamic=DynamicConfig(rules=("anchor-r*",)))
