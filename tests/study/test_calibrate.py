"""The calibration search: thresholds, the hashed split, the records (the policy it saves: tests/policy)."""

import json

import numpy as np
import pytest
import torch

from dynres.errors import ConfigError
from dynres.io.store import open_store
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.policy.calibration import load_policy
from dynres.study.calibrate import (
    CalibrationConfig,
    calibrate,
    search_areas,
    search_resolution,
    search_threshold,
    split_keys,
)
from photo_store import make_photo_store

RES = (56, 112)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """16 crops of scikit-image photos in two classes, ingested and quality-indexed at two resolutions."""
    return make_photo_store(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("store") / "s", 4, RES)


@pytest.fixture(scope="module")
def checkpoint(store_dir, tmp_path_factory):
    torch.manual_seed(0)
    store = open_store(store_dir)
    model = create_model("resnet_tiny", len(store.classes))
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(model.eval(), ModelMeta("resnet_tiny", tuple(store.classes), 56), path)


def test_binary_search_finds_the_threshold_of_a_synthetic_accuracy_curve():
    def loss(t):  # accuracy loss falls linearly until SSIM 0.9731, then nothing is lost
        return max(0.0, (0.9731 - t) * 50)

    t, trail = search_threshold(loss, target=0.05)  # loss <= 0.05 from t = 0.9721
    assert 0.9721 <= t < 0.9721 + 1e-4
    assert len(trail) <= 12 and all(e["threshold"] >= 0.94 for e in trail)
    assert search_threshold(lambda t: 0.0, 0.05) == (0.94, [{"threshold": 0.94, "loss": 0.0}])
    assert search_threshold(lambda t: 0.0 if t == 1.0 else 9.0, 0.05)[0] > 1 - 1e-4  # nothing lower will do


def test_split_is_deterministic_disjoint_and_stable_as_the_store_grows():
    keys = [f"c/{i:04d}" for i in range(400)]
    calib, held = split_keys(keys, 0.5)
    assert set(calib).isdisjoint(held) and len(calib) + len(held) == 400 and 150 < len(held) < 250
    calib2, held2 = split_keys(keys + [f"c/{i:04d}" for i in range(400, 500)], 0.5)
    assert set(held) <= set(held2) and set(calib) <= set(calib2)


def test_calibrate_end_to_end_writes_policy_records_and_figure(store_dir, checkpoint, tmp_path):
    store = open_store(store_dir)
    cfg = CalibrationConfig(target=0.0, crops=(1.0,), sweep=(0.94, 0.99, 1.0), batch_size=8)
    record = calibrate(store, checkpoint, tmp_path, cfg, progress=False)
    for s in record["search"]:  # on the calibration split the target holds by construction
        assert s["acc_full"] - s["acc_calibrated"] <= 1e-9
        assert 0.94 <= s["threshold"] <= 1.0
    policy = load_policy(record["policy"])
    held = {r["resolution"] for r in record["calibration"]}
    assert held == set(RES) and {r["crop"] for r in record["calibration"]} == {0.765625, 1.0}
    assert record["calibration_images"] + record["heldout_images"] == len(store.keys)
    prov = policy.provenance
    assert prov["target"] == 0.0 and prov["model_sha256"] and prov["store_manifest_hash"]
    calib, held_keys = split_keys(store.keys, 0.5)
    assert prov["heldout_images"] == len(held_keys)
    for name in ("calibration.json", "calibration.md", "calibration_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert {"resolution", "relative_bytes", "acc_change"} <= set(saved["calibration_sweep"][0])
    assert all(0.0 <= r["read_savings"] < 1.0 for r in saved["calibration"])
    # holding a second crop to the target too can only raise a threshold, never lower it
    both = calibrate(store, checkpoint, tmp_path / "both", CalibrationConfig(
        target=0.0, crops=(1.0,), sweep=(1.0,), batch_size=8, search_crops=(1.0,)), progress=False)
    for one, two in zip(record["search"], both["search"]):
        assert two["search_crops"] == [0.765625, 1.0] and two["threshold"] >= one["threshold"]
        assert two["acc_full"] == one["acc_full"]  # reported at the index's crop either way


def test_dynamic_row_counts_the_scale_models_calibrated_read(store_dir, checkpoint, tmp_path):
    torch.manual_seed(1)
    store = open_store(store_dir)
    scale = save_checkpoint(create_model("resnet_tiny", len(RES)).eval(),
                            ModelMeta("resnet_tiny", tuple(store.classes), 56, task="scale", grid=RES),
                            tmp_path / "scale" / "model.pt")
    cfg = CalibrationConfig(target=0.0, crops=(1.0,), sweep=(1.0,), batch_size=8)
    record = calibrate(store, checkpoint, tmp_path / "out", cfg, scale_model=scale, progress=False)
    rows = record["dynamic"]
    assert [r["crop"] for r in rows] == [0.765625, 1.0]
    for r in rows:
        assert abs(r["read_savings_full"]) < 1e-12  # without a policy the pipeline reads whole files
        assert 0.0 <= r["read_savings"] < 1.0
        assert sum(r["resolution_histogram"].values()) == record["heldout_images"]
    assert "dynamic" in (tmp_path / "out" / "calibration.md").read_text()
    # whatever the scale model picks, the pipeline reads no more than the largest calibrated prefix
    assert min(r["read_savings"] for r in rows) >= record["summary"]["dynamic_read_savings_worst_case"] - 1e-12


class _Index:
    """Four images of 5 scans whose SSIM reaches any threshold below ``cut`` with 2 scans, the rest only with 5."""
    rows = {k: i for i, k in enumerate("abcd")}
    num_scans = np.full(4, 5)

    def __init__(self, cut: float):
        self.cut = cut

    def fewest_scans(self, t, resolution, rows):
        return np.where(np.full(len(rows), t) < self.cut, 2, 5)


class _Store:
    """Label 0 everywhere; 100 bytes a scan, 500 a file."""

    def label(self, key):
        return 0

    def prefix_size(self, key, scans):
        return 100 * scans

    def size(self, key):
        return 500


def test_a_lucky_gain_does_not_buy_a_loss():
    """Short reads turn image a wrong and image b right: the net accuracy is unchanged, but a was lost."""

    class Preds:
        evaluated, crop_areas = 0, (1.0,)

        def predict(self, keys, scans):  # one crop; label 0 everywhere; full reads: a right, b wrong
            short = np.asarray(scans) < 5
            return np.where(short, [1, 0, 0, 0], [0, 1, 0, 0])[None]

    result = search_resolution(Preds(), _Store(), _Index(0.97), list("abcd"), 32, CalibrationConfig(sweep=()))
    assert result["threshold"] >= 0.97 and result["acc_calibrated"] == result["acc_full"] == 75.0
    assert result["read_savings"] == 0.0


def test_search_crops_hold_every_crop_to_the_target():
    """Short reads cost nothing at the index's crop but lose image a at a 25% crop: only a search that looks at
    that crop too pays for the longer read."""

    class Preds:
        def __init__(self, crop_areas):
            self.crop_areas, self.evaluated = tuple(crop_areas), 0
            self.small = [area < 0.8 for area in crop_areas]

        def predict(self, keys, scans):  # label 0 everywhere; every image right on a full read
            lost = [small & (np.asarray(scans) < 5) & (np.asarray(keys) == "a") for small in self.small]
            return np.array(lost, dtype=np.int64)

    def search(cfg):
        return search_resolution(Preds(search_areas(cfg, 1.0)), _Store(), _Index(0.98), list("abcd"), 32, cfg)

    one = search(CalibrationConfig(sweep=()))
    both = search(CalibrationConfig(sweep=(), search_crops=(0.25, 1.0)))
    assert one["threshold"] == 0.94 and one["read_savings"] == pytest.approx(0.6)
    assert both["threshold"] >= 0.98 and both["read_savings"] == 0.0
    assert both["search_crops"] == [1.0, 0.25]  # the index's crop first; a repeat of it is not searched twice


@pytest.mark.parametrize("bad, setting", [
    ({"search_crops": (0.0,)}, "search_crops"), ({"low": 0.99, "high": 0.98}, "calibration"),
    ({"step": 0.0}, "calibration"), ({"target": -1.0}, "calibration"), ({"holdout_fraction": 1.0}, "calibration"),
    ({"crops": ()}, "crops"), ({"crops": (0.25, 1.5)}, "crops"),
])
def test_a_calibration_config_refuses_bad_settings_when_built(bad, setting):
    with pytest.raises(ConfigError, match=setting):
        CalibrationConfig(**bad)
