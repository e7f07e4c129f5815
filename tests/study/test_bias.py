"""study.bias: per-resolution biases of the choice rule, fitted from the training labels only, judged on the
validation evidence; and the same biased choice wherever it runs (`dynres infer`, `dynres serve`, the evaluation)."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from dynres.errors import ConfigError
from dynres.model.checkpoint import ModelMeta
from dynres.runtime.engine import Engine, EngineSpec, PipelineConfig, build_engine
from dynres.runtime.runners import EagerRunner, choose
from dynres.runtime.serve import ServeConfig, Service, create_app
from dynres.study.bias import (
    anchor_bias,
    base_rates,
    biased_record,
    fit_rules,
    guard_rules,
    guarded_rows,
    guarded_summary,
    recentred_bias,
)
from dynres.study.dynamic import PROBS_FILE, DynamicConfig, decide, dynamic_record
from dynres.study.static import EvalConfig
from pipeline_fixtures import SCALE_RES, make_store, tiny_classifier, tiny_scale

GRID = (16, 24, 32, 48)  # the scale model's grid (conftest.models)


def labels(rows: dict[float, list[list[bool]]]) -> pa.Table:
    """A scale-labels table: per crop, one 0/1 row over GRID per image."""
    return pa.Table.from_pylist([{"key": f"k{i}", "crop": c, "resolution": r, "correct": ok[j]}
                                 for c, images in rows.items() for i, ok in enumerate(images)
                                 for j, r in enumerate(GRID)])


def test_base_rates_and_the_anchor_come_from_the_labels():
    table = labels({0.5: [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]], 1.0: [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]})
    rates = base_rates(table, GRID)
    assert rates[0.5].tolist() == pytest.approx([1 / 3, 1, 1 / 3, 0])
    assert anchor_bias(rates[0.5], 0.2).tolist() == [0, 0.2, 0, 0]
    assert anchor_bias(rates[1.0], 0.2).tolist() == [0, 0, 0.2, 0]  # a tie: the cheaper resolution
    with pytest.raises(ConfigError, match="tau"):
        anchor_bias(rates[1.0], -1.0)


def test_an_uninformative_scale_model_recentred_picks_the_resolution_most_often_right():
    rates = np.array([0.20, 0.31, 0.30, 0.25])
    p = np.full((5, 4), 0.4) + np.array([0.05, 0.0, 0.02, 0.01])  # the same p for every image: no information
    assert choose(p, np.ones(4), None).tolist() == [0] * 5  # today's rule follows the model's constant offset
    assert choose(p, np.ones(4), None, recentred_bias(rates, p.mean(0))).tolist() == [1] * 5


def test_rules_are_named_and_an_unknown_one_is_refused():
    table = labels({1.0: [[0, 1, 0, 0], [0, 1, 1, 0]]})
    p = {1.0: np.full((2, 4), 0.5)}
    candidates, fitted = fit_rules(table, GRID, ["k0", "k1"], p, {"k1"}, ("anchor", "recentred"), (0.1, 1.0))
    assert [c["name"] for c in candidates] == ["anchor@0.1", "anchor@1", "recentred"]
    assert fitted[0]["anchor_resolution"] == 24 and fitted[0]["p_mean_heldout"] == [0.5] * 4
    with pytest.raises(ConfigError, match="unknown rules"):
        fit_rules(table, GRID, ["k0", "k1"], p, set(), ("oracle",), ())


@pytest.fixture(scope="module")
def evidence(tmp_path_factory, models):
    """The dynamic evaluation of the fixed tiny models with its per-image p(r), as the chain leaves it."""
    store, backbone, scale = models
    out = tmp_path_factory.mktemp("eval")
    cfg = DynamicConfig(lambdas=(0.0, 0.1, 0.5), plot=False)
    dyn = dynamic_record(backbone, scale, store, out, cfg, EvalConfig(grid=GRID, crops=(0.25, 1.0), batch_size=4),
                         progress=False, probs_path=out / PROBS_FILE)
    return out, dyn, cfg


def test_no_bias_gives_the_evaluations_own_numbers_and_a_large_one_its_anchor(evidence):
    out, dyn, cfg = evidence
    assert biased_record(out, dyn, None, cfg)["summary"] == dyn["summary"]
    static = {(r["crop"], r["resolution"]): r["accuracy"] for r in dyn["static"]}
    anchored = biased_record(out, dyn, {0.25: np.array([0, 0, 9.0, 0]), 1.0: np.array([9.0, 0, 0, 0])}, cfg)
    assert [r["dynamic_accuracy"] for r in anchored["summary"]] == [static[0.25, 32], static[1.0, 16]]
    assert anchored["auc"] == dyn["auc"]  # the same p: the same AUC


def test_the_guarded_families_choose_on_one_half_and_are_judged_on_the_other(evidence):
    out, dyn, cfg = evidence
    candidates = [{"name": "anchor@0.2", "bias": {0.25: np.array([0, 0.2, 0, 0]), 1.0: np.array([0, 0.2, 0, 0])}}]
    rows = guarded_rows(out, dyn, candidates, cfg.lambdas, taus=(0.2,), splits=2)
    families = ("b=0", "train-rules", "anchor-r*", "all", "recalibrated", "recalibrated+anchor-r*")
    assert {r["family"] for r in rows} == set(families)
    assert len(rows) == 6 * 2 * 2 * 2  # families x crops x splits x halves
    assert all(r["rule"] in (None, "b=0", "anchor@0.2") for r in rows if r["family"] == "train-rules")
    summary = guarded_summary(rows)
    assert {(s["family"], s["crop"]) for s in summary} == {(f, c) for f in families for c in (0.25, 1.0)}
    assert all(s["decisions"] == 4 for s in summary)


def test_infer_serve_and_the_evaluation_pick_the_same_resolution_for_the_same_bias(tmp_path):
    store = make_store(tmp_path)
    stage = dataclasses.replace(tiny_scale(), bias=(0.0, 0.3, 0.0))  # what build_engine makes of --bias 0,0.3,0
    meta = ModelMeta("mobilenet_v2_tiny", (), SCALE_RES, task="scale", grid=stage.grid, scans=stage.scans)
    evaluation = {k: decide((stage.runner.model, meta), store.read(k, stage.scans), 1.0, 0.1, np.array(stage.costs),
                            stage.bias)[0] for k in store.keys}  # the evaluation's decision, from the prefix alone
    unbiased = {k: decide((stage.runner.model, meta), store.read(k, stage.scans), 1.0, 0.1,
                          np.array(stage.costs))[0] for k in store.keys}
    assert evaluation != unbiased and len(set(evaluation.values())) > 1  # the bias matters, and not as a constant

    config = PipelineConfig(batch_size=4, crop_side=1.0, lam=0.1, decode_once=False)  # views as the evaluation's
    engine = Engine(store, EagerRunner(tiny_classifier()), scale=stage, config=config).run(progress=False)
    assert {p.key: p.resolution for p in engine.predictions} == evaluation  # `dynres infer`

    service = Service(EagerRunner(tiny_classifier()), ("cat", "dog"), scale=stage, store=store,
                      config=ServeConfig(lam=0.1, crop_side=1.0, decode_once=False))
    with TestClient(create_app(service)) as client:  # `dynres serve`
        assert {k: client.post("/predict/key", json={"key": k}).json()["resolution"] for k in store.keys} == evaluation


def test_the_engine_spec_carries_the_bias_to_the_scale_stage(models):
    store, backbone, scale = models
    spec = EngineSpec("", str(backbone), str(scale), None, "eager", PipelineConfig(bias=(0.0, 0.1, 0.0, 0.2)))
    assert build_engine(spec, store=store).scale.bias == (0.0, 0.1, 0.0, 0.2)
    wrong = EngineSpec("", str(backbone), str(scale), None, "eager", PipelineConfig(bias=(0.0, 0.1)))
    with pytest.raises(ConfigError, match="one value per grid resolution"):
        build_engine(wrong, store=store)


def test_the_guard_gets_the_configured_rules(tmp_path):
    anchored = guard_rules(tmp_path, DynamicConfig(rules=("anchor-r*",), taus=(0.1, 0.5)), None)
    assert anchored == {"anchor_taus": (0.1, 0.5), "biases": None}  # nothing to fit: the guard anchors at its r*
    assert guard_rules(tmp_path, DynamicConfig(rules=()), None) == {"anchor_taus": (), "biases": None}  # b = 0
    # the default: b = 0 alone, on recalibrated p (dynres.study.recalibrate)
    assert guard_rules(tmp_path, DynamicConfig(), None) == {"anchor_taus": (), "biases": None}
    assert DynamicConfig().recalibrate
    with pytest.raises(ConfigError, match="training store"):
        guard_rules(tmp_path, DynamicConfig(rules=("recentred",), recalibrate=False), None)
    with pytest.raises(ConfigError, match="unknown rules"):
        DynamicConfig(rules=("oracle",))
    with pytest.raises(ConfigError, match="recalibrate = false"):  # fitted on raw p: not added to recalibrated p
        DynamicConfig(rules=("recentred",))
    with pytest.raises(ConfigError, match="at least one bias size"):  # not silently b = 0 alone
        DynamicConfig(rules=("anchor-r*",), taus=())
