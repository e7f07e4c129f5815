"""study.recalibrate: p(r) mapped to the deployed backbone's chance of being right at r, fitted on the guard's
selection images, and applied the same way by every engine that serves the guard's choice."""

import numpy as np
import pytest
import torch

from dynres.errors import ConfigError
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.study.recalibrate import apply_platt, fit_platt
from dynres.study.verdict import guard_crop, serving_config

GRID = (56, 112)
COST = np.array([1.0, 4.0])
LAMBDAS = (0.0, 0.1, 1.0)


def test_platt_scaling_recovers_a_known_miscalibration():
    """Outcomes drawn with P(right) = σ(0.5·logit p − 1): the fit finds (0.5, −1) from 20,000 images."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(20_000, 1))
    p = 1 / (1 + np.exp(-z))
    right = rng.random(z.shape) < 1 / (1 + np.exp(-(0.5 * z - 1)))
    coef = fit_platt(p, right)
    assert coef[0] == pytest.approx([0.5, -1.0], abs=0.05)
    assert apply_platt(p, coef).mean() == pytest.approx(right.mean(), abs=0.01)  # calibrated on average


def test_a_resolution_right_on_every_selection_image_still_gets_a_finite_fit():
    """Platt's smoothed targets: no image wrong at 112 px does not send its coefficients to infinity."""
    p = np.array([[0.2, 0.4], [0.6, 0.5], [0.9, 0.7], [0.4, 0.3]])
    right = np.array([[False, True], [True, True], [True, True], [False, True]])
    coef = fit_platt(p, right)
    assert np.isfinite(coef).all()
    q = apply_platt(p, coef)
    assert (q[:, 1] > 0.7).all()  # right everywhere: p' high whatever the scale model said
    assert q[2, 0] > q[0, 0]  # monotone per resolution: the order of images at r is kept


def _scale_checkpoint(path, activation="sigmoid"):
    torch.manual_seed(0)
    net = create_model("mobilenet_v2_tiny", len(GRID))
    return save_checkpoint(net, ModelMeta("mobilenet_v2_tiny", (), 32, task="scale", grid=GRID,
                                          activation=activation), path)


def test_the_engines_apply_the_recalibration_the_guard_fitted(tmp_path):
    """The runtime's scale stage (every engine's: local, service, Ray, the pipeline benchmark) maps the scale
    model's logits as the guard mapped its p(r): σ(a·logit p + c)."""
    from dynres.runtime.runners import load_scale

    src = _scale_checkpoint(tmp_path / "s.pt")
    coef = np.array([[0.5, -1.0], [2.0, 0.3]])
    x = (torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    backbone = create_model("resnet_tiny", 2).eval()
    _, raw = load_scale(src, backbone).choose(x, 0.0)
    _, recal = load_scale(src, backbone, recalibration=coef.tolist()).choose(x, 0.0)
    assert recal == pytest.approx(apply_platt(raw, coef), abs=1e-5)
    assert not np.allclose(recal, raw, atol=1e-3)


def test_a_softmax_scale_model_is_not_recalibrated(tmp_path):
    from dynres.runtime.runners import load_scale

    src = _scale_checkpoint(tmp_path / "s.pt", activation="softmax")
    with pytest.raises(ConfigError, match="sigmoid"):
        load_scale(src, create_model("resnet_tiny", 2).eval(), recalibration=[[1.0, 0.0]] * 2)


def test_every_path_to_the_scale_stage_refuses_a_malformed_recalibration(tmp_path):
    """The check lives in the scale stage, so the pipeline benchmark's path (no PipelineConfig) is held to it."""
    from dynres.runtime.runners import load_scale

    src = _scale_checkpoint(tmp_path / "s.pt")
    backbone = create_model("resnet_tiny", 2).eval()
    for bad, why in (([[1.0, float("nan")], [1.0, 0.0]], "finite"), ([[1.0, 0.0]], "one .a, c. per grid"),
                     ([[1.0]] * 2, "pairs")):
        with pytest.raises(ConfigError, match=why):
            load_scale(src, backbone, recalibration=bad)


def _kinds(n):
    """30% right at 56 px only, 50% at 112 only, 20% at both (best static: 112 px, 70%)."""
    kinds = [[True, False]] * 3 + [[False, True]] * 5 + [[True, True]] * 2
    return np.array([kinds[i % 10] for i in range(n)], dtype=bool)


def test_the_guard_serves_dynamic_once_p_is_recalibrated_where_raw_p_loses():
    """A scale model that knows where the backbone is right but speaks on two scales (p at 56 px always above p
    at 112 px): the rule on raw p picks 56 px for every image and loses to static 112 px; recalibrated on the
    selection images, the same p picks right and wins on the held-out ones."""
    ok = _kinds(40)
    p = np.where(ok, [0.9, 0.3], [0.8, 0.2])
    select = np.arange(40) < 20
    raw = guard_crop(0.5, p, ok, GRID, COST, 0.1, LAMBDAS, select)
    assert raw["mode"] == "static" and raw["static_resolution"] == 112 and "recalibration" not in raw
    recal = guard_crop(0.5, p, ok, GRID, COST, 0.1, LAMBDAS, select, recalibrate=True)
    assert recal["mode"] == "dynamic" and recal["held_dynamic_accuracy"] == 100.0
    assert np.asarray(recal["recalibration"]).shape == (2, 2) and "recalibrated p" in recal["reason"]


def test_the_recalibration_sees_only_the_selection_images():
    """Changing the held-out images' correctness changes nothing the guard fitted or chose, only its evidence."""
    ok = _kinds(40)
    p = np.where(ok, [0.9, 0.3], [0.8, 0.2])
    select = np.arange(40) < 20
    flipped = ok.copy()
    flipped[~select] = ~flipped[~select]
    a = guard_crop(0.5, p, ok, GRID, COST, 0.1, LAMBDAS, select, recalibrate=True)
    b = guard_crop(0.5, p, flipped, GRID, COST, 0.1, LAMBDAS, select, recalibrate=True)
    assert a["recalibration"] == b["recalibration"] and a["lambda"] == b["lambda"]
    assert a["held_dynamic_accuracy"] != b["held_dynamic_accuracy"]


def test_the_serving_configuration_and_the_pipeline_carry_the_guards_recalibration():
    """serving.json's engine and command lines hold each dynamic crop's (a, c) pairs; the pipeline stage times
    them, and a timed run without them is not served."""
    from dynres.runtime.engine import PipelineConfig
    from dynres.study.verdict import engine_spec, pipeline_point, served_pipeline

    coef = [[0.5, -1.0], [2.0, 0.25]]
    base = {"selection_images": 20, "held_out_images": 20, "static_resolution": 112, "reason": "wins",
            "lambda": 0.1, "recalibration": coef}
    guard = {"rule": "r", "crops": [base | {"crop": 0.5625, "mode": "dynamic"}, base | {"crop": 1.0, "mode": "static"}]}
    serving = serving_config(guard, "store", "b.pt", "s.pt", None)
    dynamic, static = serving["crops"]
    assert engine_spec(dynamic).config.recalibration == ((0.5, -1.0), (2.0, 0.25))
    assert "--recalibration 0.5,-1.0;2.0,0.25" in dynamic["infer"].replace("'", "")
    assert static["recalibration"] is None and "--recalibration" not in static["infer"]
    point = pipeline_point(guard, LAMBDAS, side=0.75)
    assert point["recalibration"] == ((0.5, -1.0), (2.0, 0.25))
    with pytest.raises(ConfigError, match="static resolution"):
        PipelineConfig(resolution=112, recalibration=coef)
    rows = {name: {"images_per_s": 100.0, "accuracy": 90.0, "gflops": 1.0} for name in ("dynamic", "static_tuned")}
    pipe = {"pipeline": rows, "lams": {"dynamic": 0.1}, "static_resolution": 112, "config": {"crop_side": 0.75},
            "bias": None, "recalibration": coef}
    assert served_pipeline(guard, pipe)["served"] == "dynamic"
    assert served_pipeline(guard, pipe | {"recalibration": None})["served"] == "static_tuned"


def test_a_chain_with_a_softmax_scale_head_must_say_it_does_not_recalibrate():
    """The default recalibration cannot apply to a softmax head: refused by name before anything trains."""
    from dynres.study.chain import ChainConfig
    from dynres.study.dynamic import DynamicConfig
    from dynres.study.scale import ScaleConfig

    with pytest.raises(ConfigError, match="recalibrate = false"):
        ChainConfig(scale=ScaleConfig(target="best"))
    assert not ChainConfig(scale=ScaleConfig(target="best"), dynamic=DynamicConfig(recalibrate=False)).dynamic.recalibrate


def test_the_engine_spec_carries_the_recalibration_to_the_scale_stage(models):
    """serving.json's engine spec (`dynres infer`, `dynres serve` and every Ray actor build from it)."""
    from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine

    store, backbone, scale = models
    pairs = [[0.5, 0.1], [1.0, 0.0], [0.8, -0.2], [0.3, 0.4]]  # one per grid resolution of the fixture's scale model
    spec = EngineSpec("", str(backbone), str(scale), None, "eager", PipelineConfig(recalibration=pairs))
    assert build_engine(spec, store=store).scale.recalibration == tuple(map(tuple, pairs))
    wrong = EngineSpec("", str(backbone), str(scale), None, "eager", PipelineConfig(recalibration=pairs[:2]))
    with pytest.raises(ConfigError, match="one \\(a, c\\) per grid resolution"):
        build_engine(wrong, store=store)
    for bad in ([[float("nan"), 0.0]] * 4, [[1.0]] * 4):
        with pytest.raises(ConfigError, match="recalibration"):
            PipelineConfig(recalibration=bad)
