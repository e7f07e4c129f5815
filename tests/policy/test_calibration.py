"""The calibration policy: a rule per resolution (scan count or SSIM threshold) → scans per image, saved and loaded
back; version-1 files (thresholds only) still load."""

import json

import numpy as np
import pytest

from dynres.errors import ConfigError
from dynres.io.store import open_store
from dynres.model.data import StoreDataset
from dynres.policy.calibration import POLICY_VERSION, CalibrationPolicy, ReadRule, load_policy
from dynres.policy.quality import load_quality
from dynres.policy.scans import ScanPolicy
from photo_store import make_photo_store

RES = (56, 112)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """Crops of scikit-image photos in two classes, ingested and quality-indexed at two resolutions."""
    return make_photo_store(tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("store") / "s", 2, RES)


def test_policy_picks_the_fewest_scans_the_threshold_allows_and_round_trips(store_dir, tmp_path):
    index = load_quality(open_store(store_dir))
    policy = CalibrationPolicy.from_index({56: 0.97, 112: 0.995}, index, {"note": "test"})
    assert isinstance(policy, ScanPolicy)
    for i, key in enumerate(index.keys):
        for r, t in policy.thresholds.items():
            k = policy.scans(key, r)
            s = index.ssim[i, index.column(r)]
            assert s[k - 1] >= t  # never fewer scans than the threshold allows
            assert not np.any(s[: k - 1] >= t)  # and no more than needed
    assert policy.scans("no/such", 56) is None and policy.scans(index.keys[0], 999) is None
    back = load_policy(str(policy.save(tmp_path / "p.json")))
    assert back.thresholds == policy.thresholds and back.provenance == {"note": "test"}
    assert all(back.scans(k, r) == policy.scans(k, r) for k in index.keys for r in RES)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json"):
        load_policy(str(tmp_path / "bad.json"))


def test_calibrated_reads_return_exactly_the_bytes_the_policy_says(store_dir):
    store = open_store(store_dir)
    policy = CalibrationPolicy.from_index({56: 0.96, 112: 0.99}, load_quality(store))
    files = {k: open(store.location(k), "rb").read() for k in store.keys}
    for key in store.keys:
        k, ends = policy.scans(key, 56), store.scan_ends(key)
        expected = files[key] if k == len(ends) else files[key][: ends[k - 1]] + b"\xff\xd9"
        assert store.read(key, scans=k) == expected
    fresh = open_store(store_dir)
    dataset = StoreDataset(fresh, 56, scans=policy)
    for i in range(len(dataset)):
        dataset[i]
    assert fresh.bytes_read == sum(store.prefix_size(k, policy.scans(k, 56)) for k in store.keys)
    assert fresh.bytes_read < sum(store.size(k) for k in store.keys)


def test_a_policy_without_thresholds_reads_every_scan():
    policy = CalibrationPolicy({}, ("a/1", "a/2"), np.zeros((2, 0), dtype=np.int64))
    assert policy.resolutions == () and policy.scans("a/1", 56) is None


def test_counts_must_match_keys_and_resolutions():
    with pytest.raises(ConfigError, match="counts"):
        CalibrationPolicy({56: ReadRule("ssim", 0.9), 112: ReadRule("full")}, ("a/1", "a/2"),
                          np.ones((2, 1), dtype=np.int64))


def test_a_count_rule_reads_the_same_scans_everywhere_and_answers_for_new_images(store_dir, tmp_path):
    store = open_store(store_dir)
    keys = tuple(store.keys)
    scans = np.array([store.num_scans(k) for k in keys])
    policy = CalibrationPolicy.from_rules({56: ReadRule("count", 3), 112: ReadRule("full")}, keys, scans)
    assert all(policy.scans(k, 56) == min(3, store.num_scans(k)) for k in keys)
    assert all(policy.scans(k, 112) == store.num_scans(k) for k in keys)
    assert policy.scans("new/upload", 56) == 3 and policy.scans("new/upload", 112) is None
    assert policy.thresholds == {}
    back = load_policy(str(policy.save(tmp_path / "count.json")))
    assert back.rules == policy.rules and back.scans("new/upload", 56) == 3


@pytest.mark.parametrize("rule", [("count", 0), ("count", 2.5), ("ssim", 1.5), ("ssim", None), ("median", 3)])
def test_a_bad_rule_is_refused(rule):
    with pytest.raises(ConfigError):
        ReadRule(*rule)


def test_a_version_1_policy_of_thresholds_still_loads(tmp_path):
    (tmp_path / "v1.json").write_text(json.dumps({"version": 1, "thresholds": {"56": 0.9}, "resolutions": [56],
                                                  "keys": ["a/1"], "counts": [[2]], "provenance": {}}))
    policy = load_policy(str(tmp_path / "v1.json"))
    assert policy.rules == {56: ReadRule("ssim", 0.9)} and policy.scans("a/1", 56) == 2


def write_policy(path, **changes) -> str:
    data = {"version": POLICY_VERSION, "rules": {"56": {"family": "ssim", "value": 0.9}}, "resolutions": [56],
            "keys": ["a/1"], "counts": [[2]], "provenance": {}} | changes
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("changes, reason", [
    ({"version": POLICY_VERSION + 1}, "newer than this dynres"),
    ({"counts": [[2, 3]]}, "malformed policy"),
    ({"resolutions": [112]}, "resolutions do not match"),
    ({"rules": {"big": {"family": "ssim", "value": 0.9}}}, "malformed policy"),
    ({"rules": {"56": {"family": "median", "value": 0.9}}}, "malformed policy"),
])
def test_a_bad_policy_file_is_refused_naming_it(tmp_path, changes, reason):
    assert load_policy(write_policy(tmp_path / "good.json")).scans("a/1", 56) == 2
    with pytest.raises(ConfigError, match=f"bad.json: .*{reason}"):
        load_policy(write_policy(tmp_path / "bad.json", **changes))


def test_a_missing_policy_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="dynres calibrate"):
        load_policy(str(tmp_path / "none.json"))


def test_a_plain_number_is_an_ssim_threshold_as_before_rules():
    policy = CalibrationPolicy({56: 0.97}, ("a/1",), np.array([[3]]))
    assert policy.rules == {56: ReadRule("ssim", 0.97)} and policy.thresholds == {56: 0.97}
