"""study.verdict: the guard serves the dynamic pipeline only where held-out evidence says it is at least as accurate
as the best static resolution at no more GFLOPs; the serving configuration and the pipeline's mode follow it."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynres.bench.pipeline import PipelineBenchConfig
from dynres.errors import ConfigError
from dynres.runtime.engine import build_engine
from dynres.study.dynamic import PROBS_FILE, write_probs
from dynres.study.verdict import (
    EngineViews,
    engine_spec,
    guard_crop,
    pipeline_point,
    run_guard,
    served_pipeline,
    serving_config,
)

GRID = (56, 112)
COST = np.array([1.0, 4.0])  # GFLOPs per grid resolution
LAMBDAS = (0.0, 0.1, 1.0)


def images(n: int) -> np.ndarray:
    """Correctness at (56, 112) of ``n`` images: 30% right at 56 only, 50% at 112 only, 20% at both. The best
    static resolution is 112 (70%); a scale model that knows which is which gets all of them right for less."""
    kinds = [[True, False]] * 3 + [[False, True]] * 5 + [[True, True]] * 2
    return np.array([kinds[i % 10] for i in range(n)], dtype=bool)


def test_the_guard_picks_dynamic_when_it_wins_on_held_out_images():
    ok = images(40)
    select = np.arange(40) < 20
    row = guard_crop(0.5, ok.astype(float), ok, GRID, COST, 0.1, LAMBDAS, select, baseline_resolution=112)
    assert row["mode"] == "dynamic" and row["static_resolution"] == 112
    assert row["held_static_accuracy"] == 70.0 and row["held_dynamic_accuracy"] == 100.0
    assert row["held_dynamic_gflops"] <= row["held_static_gflops"] == 4.0
    assert row["held_baseline_accuracy"] == 70.0 and row["held_out_images"] == row["selection_images"] == 20
    # the 6 held-out images right at 56 only: dynamic gets them, static misses them, nothing the other way
    assert row["held_discordance"] == {"dynamic_only": 6, "static_only": 0, "p_value": pytest.approx(2 / 2**6)}


def test_the_held_out_split_of_answers_and_its_p_value():
    """McNemar's exact test on the images only one mode gets right: 3 against 1 is no evidence (p = 0.625)."""
    from dynres.study.verdict import discordance

    dynamic = np.array([True] * 3 + [False] + [True] * 4)
    static = np.array([False] * 3 + [True] + [True] * 4)
    assert discordance(dynamic, static) == {"dynamic_only": 3, "static_only": 1, "p_value": pytest.approx(0.625)}
    assert discordance(dynamic, dynamic) == {"dynamic_only": 0, "static_only": 0, "p_value": 1.0}  # the same answers


def test_the_guard_picks_the_best_static_resolution_when_dynamic_is_worse():
    ok = images(40)
    row = guard_crop(0.5, (~ok).astype(float), ok, GRID, COST, 0.1, LAMBDAS, np.arange(40) < 20)
    assert row["mode"] == "static" and row["static_resolution"] == 112
    assert row["held_dynamic_accuracy"] < row["held_static_accuracy"]
    assert row["reason"].startswith("less accurate")
    split = row["held_discordance"]
    assert split["static_only"] > split["dynamic_only"] and split["p_value"] < 0.05


def test_the_decision_rests_on_the_held_out_images_not_on_the_ones_it_chose_on():
    """A scale model right on the selection half and wrong on the held-out half: the selection alone would say
    dynamic; the held-out evidence says static."""
    ok = images(40)
    select = np.arange(40) < 20
    p = np.where(select[:, None], ok, ~ok).astype(float)
    row = guard_crop(1.0, p, ok, GRID, COST, 0.1, LAMBDAS, select)
    assert row["selection_dynamic_accuracy"] == 100.0 > row["selection_static_accuracy"]
    assert row["mode"] == "static"


def test_no_affordable_lambda_or_no_held_out_image_means_static():
    ok = images(20)
    costly = guard_crop(1.0, ok.astype(float), ok, GRID, COST, scale_g=10.0, lambdas=LAMBDAS,
                        select=np.arange(20) < 10)  # the scale model alone costs more than the best static
    assert costly["mode"] == "static" and costly["lambda"] is None and "as cheap" in costly["reason"]
    none_held = guard_crop(1.0, ok.astype(float), ok, GRID, COST, 0.1, LAMBDAS, np.ones(20, dtype=bool))
    assert none_held["mode"] == "static" and none_held["static_resolution"] == 112


def write_records(eval_dir, n: int = 40) -> tuple[dict, list[str]]:
    """A static per-image table and the scale model's p(r), as the dynamic evaluation writes them: at crop 0.25 the
    scale model knows the answer, at crop 1.0 it has it backwards."""
    ok = images(n)
    keys = [f"k{i:03d}" for i in range(n)]
    rows = [{"key": k, "crop": c, "resolution": r, "correct": bool(ok[i, j])}
            for c in (0.25, 1.0) for i, k in enumerate(keys) for j, r in enumerate(GRID)]
    pq.write_table(pa.Table.from_pylist(rows), eval_dir / "static_images.parquet")
    pairs = [(k, c) for c in (0.25, 1.0) for k in keys]
    probs = np.concatenate([ok, ~ok]).astype(float)
    write_probs(eval_dir / PROBS_FILE, pairs, probs, GRID)
    dyn = {"static": [{"crop": c, "resolution": r, "gflops": float(COST[j])} for c in (0.25, 1.0)
                      for j, r in enumerate(GRID)], "scale_gflops": 0.1}
    return dyn, keys[::2]  # every other image held out


def test_the_guard_reads_the_evaluations_records(tmp_path):
    dyn, held = write_records(tmp_path)
    guard = run_guard(tmp_path, dyn, held, LAMBDAS, baseline_resolution=112)
    assert guard["held_out_images"] == 20 and guard["selection_images"] == 20
    assert [(r["crop"], r["mode"]) for r in guard["crops"]] == [(0.25, "dynamic"), (1.0, "static")]
    json.dumps(guard)  # a record: plain JSON


def test_the_guard_reads_rules_fitted_elsewhere_per_crop(tmp_path):
    dyn, held = write_records(tmp_path)
    fitted = {"anchor@0.5": {0.25: [0.0, 0.5], 1.0: [0.0, 0.5]}}
    guard = run_guard(tmp_path, dyn, held, LAMBDAS, biases=fitted)
    assert guard["rules"] == ["anchor@0.5"] and all(r["rule"] in ("b=0", "anchor@0.5") for r in guard["crops"])
    with pytest.raises(ConfigError, match="no bias at crop 1"):
        run_guard(tmp_path, dyn, held, LAMBDAS, biases={"anchor@0.5": {0.25: [0.0, 0.5]}})


def test_each_mode_is_judged_on_its_own_engines_views():
    """The static engine sees other pixels than the dynamic one: on the dynamic views 112 px is right on 70% and
    the scale model wins; on the static engine's views 56 px is right on every image, and the guard serves it."""
    ok = images(40)
    select = np.arange(40) < 20
    row = guard_crop(0.5, ok.astype(float), ok, GRID, COST, 0.1, LAMBDAS, select, ok_static=np.ones_like(ok))
    assert row["mode"] == "static" and row["static_resolution"] == 56 and row["held_static_accuracy"] == 100.0
    assert "as cheap" in row["reason"]  # nothing the scale model picks costs no more than 56 px
    same = guard_crop(0.5, ok.astype(float), ok, GRID, COST, 0.1, LAMBDAS, select)
    assert same["mode"] == "dynamic"  # judged on one table, as before


def test_the_guard_reads_each_engines_table_and_the_images_the_dynamic_engine_decodes_exactly(tmp_path):
    """The static engine's views: 112 px right and 56 px wrong on every image. The dynamic engine's own views let
    the scale model get every image right at crop 0.25; where the dynamic engine decodes as the static one (its
    scale prefix is short), its choices of 56 px are wrong too."""
    dyn, held = write_records(tmp_path)
    keys = [f"k{i:03d}" for i in range(40)]
    rows = [{"key": k, "crop": c, "resolution": r, "correct": r == 112} for c in (0.25, 1.0) for k in keys
            for r in GRID]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "exact.parquet")
    views = EngineViews(tmp_path / "exact.parquet", tmp_path / "static_images.parquet")
    guard = run_guard(tmp_path, dyn, held, LAMBDAS, views=views)
    first = guard["crops"][0]
    assert first["static_resolution"] == 112 and first["held_static_accuracy"] == 100.0
    assert first["mode"] == "dynamic" and first["held_dynamic_accuracy"] == 100.0
    assert guard["views"] == {"static": "exact.parquet", "dynamic": "static_images.parquet",
                              "dynamic_exact_images": 0}
    every = run_guard(tmp_path, dyn, held, LAMBDAS, views=EngineViews(views.static, views.dynamic, frozenset(keys)))
    assert every["crops"][0]["mode"] == "static" and every["crops"][0]["held_dynamic_accuracy"] < 100.0
    assert every["views"]["dynamic_exact_images"] == 40
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "short.parquet")
    with pytest.raises(ConfigError, match="short.parquet"):
        run_guard(tmp_path, dyn, held, LAMBDAS, views=EngineViews(tmp_path / "short.parquet", views.dynamic))


def test_the_serving_config_follows_the_guard(tmp_path, models):
    store, backbone, scale = models
    guard = {"rule": "r", "crops": [
        {"crop": 0.25, "mode": "dynamic", "lambda": 0.1, "static_resolution": 32, "reason": "wins"},
        {"crop": 0.75, "mode": "static", "lambda": 0.1, "static_resolution": 24, "reason": "loses"}]}
    with_policy = serving_config(guard, "STORE", str(backbone), str(scale), "calib/policy.json")
    assert all("--policy calib/policy.json --kernels tuned" in e["infer"] for e in with_policy["crops"])
    serving = serving_config(guard, "STORE", str(backbone), str(scale), None, kernels="eager")
    dynamic, static = serving["crops"]
    assert serving["default"]["crop"] == 0.75  # the crop `dynres infer` uses unless told (side 0.875)
    assert static["engine"]["scale"] is None and static["engine"]["config"]["resolution"] == 24
    assert "--resolution 24" in static["infer"] and "--scale" not in static["infer"] + static["serve"]
    assert dynamic["engine"]["config"]["resolution"] is None and dynamic["engine"]["config"]["lam"] == 0.1
    assert "--lambda 0.1" in dynamic["serve"] and "--resolution" not in dynamic["infer"]
    assert "--crop 0.5 " in dynamic["serve"] and "--crop 0.866 " in static["serve"]  # the entry's crop side
    assert build_engine(engine_spec(static), store=store).scale is None  # the backbone alone, at 24 px
    engine = build_engine(engine_spec(dynamic), store=store)
    assert engine.scale is not None and engine.config.lam == 0.1
    assert engine.config.crop_side == pytest.approx(0.5)


def test_dynamic_must_also_match_the_best_static_resolution_on_the_images_that_chose_it():
    """Backwards on the selection half, right on the held-out half: the held-out images alone would say dynamic."""
    ok = images(40)
    select = np.arange(40) < 20
    p = np.where(select[:, None], ~ok, ok).astype(float)
    row = guard_crop(1.0, p, ok, GRID, COST, 0.1, LAMBDAS, select)
    assert row["held_dynamic_accuracy"] == 100.0 > row["held_static_accuracy"]
    assert row["selection_dynamic_accuracy"] < row["selection_static_accuracy"]
    assert row["mode"] == "static" and row["reason"].startswith("less accurate on the 20 selection images")


def test_dynamic_costlier_on_the_held_out_images_means_static():
    """On the selection images every image is right at both resolutions and the rule picks 56 px (as cheap as r*,
    the cheaper on the tie); on the held-out ones it is right at 112 px only and the rule goes there: as accurate
    as it can be, but costlier than r*."""
    select = np.arange(20) < 10
    ok = np.where(select[:, None], [True, True], [False, True])
    row = guard_crop(1.0, ok.astype(float), ok, GRID, COST, 0.0, LAMBDAS, select)
    assert row["static_resolution"] == 56 and row["held_dynamic_accuracy"] == 100.0 > row["held_static_accuracy"]
    assert row["held_dynamic_gflops"] == 4.0 > row["held_static_gflops"] == 1.0
    assert row["mode"] == "static" and row["reason"].startswith("costlier")


def test_a_tie_in_images_right_at_equal_gflops_serves_dynamic():
    ok = np.ones((20, 2), dtype=bool)  # right at both resolutions: the rule and r* both take 56 px
    row = guard_crop(1.0, ok.astype(float), ok, GRID, COST, 0.0, LAMBDAS, np.arange(20) < 10)
    assert row["held_dynamic_accuracy"] == row["held_static_accuracy"] == 100.0
    assert row["held_dynamic_gflops"] == row["held_static_gflops"] == 1.0
    assert row["mode"] == "dynamic" and row["reason"].startswith("at least as accurate")


GUARD = {"crops": [{"crop": 0.25, "mode": "dynamic", "lambda": 0.5, "static_resolution": 56, "reason": "x"},
                   {"crop": 0.75, "mode": "dynamic", "lambda": 0.1, "static_resolution": 112, "reason": "y"}]}


def test_the_pipeline_runs_the_guards_operating_point_at_its_crop():
    point = pipeline_point(GUARD, LAMBDAS)  # the default crop side 0.875: nearest the 75% crop
    assert point == {"crop_side": pytest.approx(0.75 ** 0.5), "static_resolution": 112, "lam": 0.1, "bias": None,
                     "recalibration": None}
    PipelineBenchConfig(**point)  # the fields the benchmark takes
    biased = {"crops": [GUARD["crops"][1] | {"rule": "anchor-r*@0.05", "bias": [0.0, 0.05, 0.0]}]}
    assert pipeline_point(biased, LAMBDAS)["bias"] == (0.0, 0.05, 0.0)  # the pipeline times the guard's rule
    no_lam = {"crops": [{"crop": 1.0, "mode": "static", "lambda": None, "static_resolution": 112, "reason": "z"}]}
    assert pipeline_point(no_lam, LAMBDAS)["lam"] == 1.0  # the cheapest rule of the sweep, for reference


def pipeline(dynamic_accuracy: float = 71.0, **dynamic) -> dict:
    """A pipeline record as the stage writes it, run at the guard's 75% crop, r* = 112 and λ* = 0.1."""
    row = {"images_per_s": 10.0, "bytes_per_image": 1e4, "p50_ms": 1.0, "p99_ms": 2.0, "gflops": 4.0}
    fast = row | {"accuracy": dynamic_accuracy, "images_per_s": 20.0, "gflops": 3.0}
    return {"config": {"crop_side": 0.75 ** 0.5}, "static_resolution": 112, "baseline_resolution": 112,
            "ratios": {"dynamic_mode": "dynamic_read_ahead"}, "lams": {"dynamic_read_ahead": 0.1},
            "pipeline": {"baseline": row | {"accuracy": 60.0}, "static_tuned": row | {"accuracy": 70.0},
                         "dynamic_read_ahead": fast | dynamic}}


@pytest.mark.parametrize("mode, pipe, served, why", [
    ("dynamic", pipeline(), "dynamic_read_ahead", "y"),
    ("dynamic", pipeline(70.0, gflops=4.0), "dynamic_read_ahead", "y"),  # ties serve dynamic
    ("dynamic", pipeline(69.0), "static_tuned", "less accurate than the static row on the pipeline's images (69.00% "
                                               "vs 70.00%)"),  # the pipeline's own run has it less accurate
    ("dynamic", pipeline(gflops=4.5), "static_tuned", "costlier in GFLOPs"),
    ("dynamic", pipeline(images_per_s=9.0), "static_tuned", "slower in images/s than the static row (9.0 vs 10.0"),
    ("dynamic", pipeline(gflops=None), "static_tuned", "no GFLOPs"),
    ("dynamic", pipeline() | {"lams": {"dynamic_read_ahead": 0.3}}, "static_tuned", "not at the guard's"),
    ("dynamic", pipeline() | {"config": {"crop_side": 0.875}}, "static_tuned", "not at the guard's"),
    ("dynamic", pipeline() | {"static_resolution": 84}, "static_tuned", "not at the guard's"),
    ("static", pipeline(80.0), "static_tuned", "the guard chose static"),
])
def test_the_pipeline_serves_dynamic_only_where_the_guard_and_its_own_run_agree(mode, pipe, served, why):
    guard = {"crops": [GUARD["crops"][0], GUARD["crops"][1] | {"mode": mode}]}
    result = served_pipeline(guard, pipe)
    assert result["guard_crop"] == 0.75 and result["served"] == served and why in result["reason"]
    assert result["lambda"] == pipe["lams"]["dynamic_read_ahead"]  # the λ actually run, for the report
    assert set(result["rows"]) == {served, "dynamic_read_ahead", "static_tuned", "baseline"}


def noisy_scale(n: int) -> np.ndarray:
    """p(r) of a scale model that knows only the images right at 56 px alone (p = 0.9 there) and is noise elsewhere:
    on the images right at 112 px alone it leans one way or the other by turns, on the rest it is undecided."""
    kinds = [[0.9, 0.1]] * 3 + [[0.6, 0.4], [0.4, 0.6]] * 2 + [[0.6, 0.4]] + [[0.5, 0.5]] * 2
    return np.array([kinds[i % 10] for i in range(n)])


def test_the_guard_chooses_an_anchor_bias_on_the_selection_images_when_it_wins():
    """Plain argmax follows the noise half the time; anchoring at r* (112) keeps the noisy images there and still
    sends the images the scale model knows to 56 px: all right, for less than static 112."""
    ok, select = images(40), np.arange(40) < 20
    plain = guard_crop(0.5, noisy_scale(40), ok, GRID, COST, 0.1, LAMBDAS, select)
    anchored = guard_crop(0.5, noisy_scale(40), ok, GRID, COST, 0.1, LAMBDAS, select, anchor_taus=(0.05, 0.5))
    assert "rule" not in plain and plain["held_dynamic_accuracy"] < 100.0
    assert anchored["rule"] == "anchor-r*@0.5" and anchored["bias"] == [0.0, 0.5]
    assert anchored["mode"] == "dynamic" and anchored["held_dynamic_accuracy"] == 100.0
    assert anchored["held_dynamic_gflops"] < anchored["held_static_gflops"]
    assert "anchor-r*@0.5, λ=" in anchored["reason"]
    trained = guard_crop(0.5, noisy_scale(40), ok, GRID, COST, 0.1, LAMBDAS, select,
                         biases={"b=0": None, "anchor@0.5": np.array([0.0, 0.5])})  # a rule fitted elsewhere
    assert trained["rule"] == "anchor@0.5" and trained["held_dynamic_accuracy"] == 100.0


def test_the_serving_config_carries_the_chosen_bias_to_the_engine(tmp_path, models):
    store, backbone, scale = models
    guard = {"rule": "r", "crops": [{"crop": 0.25, "mode": "dynamic", "lambda": 0.1, "static_resolution": 32,
                                     "reason": "wins", "rule": "anchor-r*@0.2", "bias": [0.0, 0.0, 0.2, 0.0]}]}
    (entry,) = serving_config(guard, "STORE", str(backbone), str(scale), None, kernels="eager")["crops"]
    assert entry["bias"] == [0.0, 0.0, 0.2, 0.0] and entry["rule"] == "anchor-r*@0.2"
    assert "--lambda 0.1 --bias 0.0,0.0,0.2,0.0" in entry["infer"] and "--bias 0.0,0.0,0.2,0.0" in entry["serve"]
    assert build_engine(engine_spec(json.loads(json.dumps(entry))), store=store).scale.bias == (0.0, 0.0, 0.2, 0.0)


def test_the_pipeline_does_not_serve_a_biased_rule_it_timed_without_its_bias():
    row = {"crop": 0.75, "mode": "dynamic", "lambda": 0.1, "static_resolution": 112, "reason": "wins",
           "rule": "anchor-r*@0.2", "bias": [0.0, 0.2]}
    rows = {"static_tuned": {"images_per_s": 10.0, "accuracy": 50.0, "gflops": 4.0},
            "dynamic": {"images_per_s": 12.0, "accuracy": 60.0, "gflops": 3.0}}
    pipe = {"pipeline": rows, "lams": {"dynamic": 0.1}, "static_resolution": 112,
            "config": {"crop_side": 0.75 ** 0.5}, "ratios": {"dynamic_mode": "dynamic"}}
    served = served_pipeline({"crops": [row]}, pipe)
    assert served["served"] == "static_tuned" and "another bias than the guard's rule" in served["reason"]
    assert served_pipeline({"crops": [row]}, pipe | {"bias": [0.0, 0.2]})["served"] == "dynamic"
