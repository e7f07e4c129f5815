"""The layout search: frontiers per resolution, dominance on both halves, and a known-worse layout ranked last.

The sample is striped images (horizontal vs vertical stripes, a random tint) and the model a fixed stripe detector
(vertical vs horizontal luminance gradients): it needs luma AC coefficients and nothing else, so a layout that sends
luma AC last (``luma-last``) needs the whole file for the full read's accuracy, where libjpeg's default needs two
scans."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dynres.errors import ConfigError
from dynres.io.layout import CANDIDATES
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.study.layout import (
    LayoutConfig,
    choose,
    dominates,
    fewest_bytes,
    run_layout,
    sample_source,
    score_layouts,
    split_halves,
)

pytestmark = pytest.mark.skipif(shutil.which("jpegtran") is None, reason="custom scan scripts need jpegtran")
CLASSES = ("horizontal", "vertical")
GRID = (32, 48)


def stripes(root, per_class: int = 8):
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            y, x = np.mgrid[0:64, 0:80]
            t = y if label == 0 else x
            wave = 70 * np.sin(2 * np.pi * t / 8 + rng.uniform(0, 6.3))  # a whole period per 8x8 block: DC flat
            tint = rng.uniform(-40, 40, 3)
            arr = 128 + wave[..., None] + tint + rng.normal(0, 6, (64, 80, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(root / name / f"{i}.jpg", quality=90)
    return root


class StripeDetector(nn.Module):
    """Class 0 (horizontal stripes) when vertical luminance gradients dominate, else class 1."""

    def forward(self, x):
        y = x.mean(1)
        dv = (y[:, 1:, :] - y[:, :-1, :]).abs().mean((1, 2))
        dh = (y[:, :, 1:] - y[:, :, :-1]).abs().mean((1, 2))
        return 100 * torch.stack([dv - dh, dh - dv], 1)


CFG = LayoutConfig(grid=GRID, crop=1.0, sample=16, candidates=("spectral", "luma-last"), backend="eager", workers=1)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    src = stripes(tmp_path_factory.mktemp("layout") / "src")
    return score_layouts(StripeDetector().eval(), CLASSES, src, GRID, CFG, progress=False)


def test_the_search_ranks_the_known_worse_layout_last_and_follows_the_model(scored):
    by_name = {c["name"]: c for c in scored["candidates"]}
    assert [c["name"] for c in scored["candidates"]] == ["libjpeg", "spectral", "luma-last"]
    assert scored["ranking"][-1] == "luma-last"
    for half in ("selection", "held_out"):
        worst, default = by_name["luma-last"]["fewest_bytes"][half], by_name["libjpeg"]["fewest_bytes"][half]
        for r in GRID:
            assert worst[r]["full_top1"] == default[r]["full_top1"] == 100.0  # lossless: the same full read
            assert worst[r]["scans"] == 4 and worst[r]["bytes"] > 0.9  # the whole file
            assert default[r]["bytes"] < 0.6
    assert not any(by_name["luma-last"]["dominates_default"].values())
    # this detector needs only the lowest luma frequencies, which the spectral layout sends first and alone: it
    # dominates the default on both halves, so it is chosen (the demo backbone wants the opposite: docs/layout.md)
    assert all(by_name["spectral"]["dominates_default"].values())
    assert scored["chosen"] == "spectral" and "selection and the held-out half" in scored["reason"]
    assert scored["halves"] == {"selection": 8, "held_out": 8}


def test_every_frontier_covers_every_scan_count_at_every_resolution(scored):
    for c in scored["candidates"]:
        assert c["lossless"] == c["images"] == 16
        for half in ("selection", "held_out"):
            points = c["frontier"][half]
            assert {(p["resolution"], p["scans"]) for p in points} == {
                (r, k) for r in GRID for k in range(1, len(CANDIDATES[c["name"]].scans) + 1)}
            for r in GRID:  # bytes grow with the scans read, and the default's full read is 1.0
                b = [p["bytes"] for p in sorted(points, key=lambda p: p["scans"]) if p["resolution"] == r]
                assert b == sorted(b)
    assert scored["candidates"][0]["frontier"]["held_out"][-1]["bytes"] == pytest.approx(1.0)


def point(r, k, b, top1):
    return {"resolution": r, "scans": k, "bytes": b, "top1": top1}


def test_fewest_bytes_is_the_cheapest_read_within_the_tolerance_of_the_full_read():
    pts = [point(56, 1, 0.1, 70.0), point(56, 2, 0.3, 79.95), point(56, 3, 1.0, 80.0),
           point(112, 1, 0.1, 60.0), point(112, 2, 0.3, 79.0), point(112, 3, 1.0, 80.0)]
    best = fewest_bytes(pts, 0.1)
    assert best[56]["scans"] == 2 and best[112]["scans"] == 3 and best[56]["full_top1"] == 80.0
    assert fewest_bytes(pts, 1.0)[112]["scans"] == 2


def test_dominance_needs_lower_or_equal_everywhere_and_strictly_lower_somewhere():
    def f(*bs):
        return {r: {"bytes": b} for r, b in zip(GRID, bs)}

    assert dominates(f(0.3, 0.5), f(0.3, 0.6)) and not dominates(f(0.3, 0.6), f(0.3, 0.6))
    assert not dominates(f(0.2, 0.7), f(0.3, 0.6))


def test_a_candidate_is_chosen_only_if_it_dominates_on_both_halves():
    def result(name, sel, held, dom_sel, dom_held):
        return {"name": name, "fewest_bytes": {"selection": {32: {"bytes": sel}}, "held_out": {32: {"bytes": held}}},
                "dominates_default": {"selection": dom_sel, "held_out": dom_held}}

    default = result("libjpeg", 0.5, 0.5, False, False)
    assert choose([default, result("a", 0.3, 0.3, True, True), result("b", 0.2, 0.6, True, False)])[0] == "libjpeg"
    assert choose([default, result("a", 0.3, 0.3, True, True), result("b", 0.4, 0.4, True, True)])[0] == "a"
    assert choose([default, result("a", 0.6, 0.3, False, True)])[0] == "libjpeg"


def test_halves_and_samples_are_deterministic_and_disjoint(tmp_path):
    halves = split_halves([f"k{i}" for i in range(11)], seed=3)
    assert halves == split_halves([f"k{i}" for i in reversed(range(11))], seed=3)
    assert not set(halves["selection"]) & set(halves["held_out"]) and len(halves["selection"]) == 6
    src = stripes(tmp_path / "src", per_class=3)
    classes, picked = sample_source(src, tmp_path / "a", 4, seed=1)
    assert classes == list(CLASSES) and len(picked) == 4
    assert sample_source(src, tmp_path / "b", 4, seed=1)[1] == picked
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == list(CLASSES)  # every class, sampled or not


def test_run_layout_writes_the_record_the_figure_and_the_chosen_script(tmp_path):
    src = stripes(tmp_path / "src", per_class=3)
    torch.manual_seed(0)
    ckpt = save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", CLASSES, 32), tmp_path / "b.pt")
    cfg = LayoutConfig(crop=1.0, sample=6, candidates=("luma-last",), backend="eager", workers=1)
    payload = run_layout(src, ckpt, tmp_path / "out", cfg, progress=False)
    assert payload["grid"] == [16, 24, 32, 40, 48, 56, 64]  # the paper's ratios around 32 px
    record = json.loads((tmp_path / "out" / "layout.json").read_text())
    assert record["chosen"] in ("libjpeg", "luma-last") and record["config"]["sample"] == 6
    assert set(record["candidates"][0]["fewest_bytes"]["held_out"]) == {str(r) for r in payload["grid"]}
    assert (tmp_path / "out" / "layout_frontiers.png").stat().st_size > 0
    assert "Fewest bytes" in (tmp_path / "out" / "layout.md").read_text()
    assert (tmp_path / "out" / "layout.scans").read_text().startswith(f"# dynres scan script: {record['chosen']}")


def test_a_checkpoint_for_other_classes_is_refused(tmp_path):
    src = stripes(tmp_path / "src", per_class=2)
    with pytest.raises(ConfigError, match="differ from the checkpoint"):
        score_layouts(StripeDetector(), ("a", "b"), src, GRID, CFG, progress=False)
