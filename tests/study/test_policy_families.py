"""Every policy family reads the same bytes for the same image in `dynres infer` (the batch engine), `dynres serve`
(the service) and the calibration's held-out evaluation (issue 17: one policy, one meaning, wherever it runs)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dynres.io.store import open_store
from dynres.policy.calibration import CalibrationPolicy, ReadRule, load_policy
from dynres.policy.quality import QualityConfig, build_quality_index, load_quality
from dynres.runtime.engine import Engine, PipelineConfig
from dynres.runtime.runners import EagerRunner
from dynres.runtime.serve import ServeConfig, Service, create_app
from dynres.study.calibration_heldout import heldout_table
from pipeline_fixtures import GRID, make_store, tiny_classifier

# one family per resolution: a scan count, an SSIM threshold (per image, from the quality index), every scan
RULES = {32: ReadRule("count", 2), 48: ReadRule("ssim", 0.93), 64: ReadRule("full")}


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory):
    """The store, its quality index, and the mixed policy written to a file as `dynres calibrate` writes it."""
    root = tmp_path_factory.mktemp("families")
    store = make_store(root)
    build_quality_index(store, QualityConfig(resolutions=GRID, workers=1), progress=False)
    index = load_quality(store)
    policy = CalibrationPolicy.from_rules(RULES, index.keys, index.num_scans, index)
    return store, policy.save(root / "policy.json")


def test_the_mixed_policy_reads_fewer_bytes_per_family_as_its_rule_says(policy_path):
    store, path = policy_path
    policy = load_policy(str(path))
    counts = {r: [policy.scans(k, r) for k in store.keys] for r in GRID}
    assert counts[32] == [min(2, store.num_scans(k)) for k in store.keys]
    assert counts[64] == [store.num_scans(k) for k in store.keys]
    # the SSIM rule is per image: not one count for all, and never past the file
    assert len(set(counts[48])) > 1 and all(1 <= c <= store.num_scans(k) for c, k in zip(counts[48], store.keys))


@pytest.mark.parametrize("resolution", GRID)
def test_infer_serve_and_the_evaluation_read_the_same_bytes(policy_path, resolution):
    store, path = policy_path
    policy = load_policy(str(path))  # what `dynres infer --policy` and `dynres serve --policy` load
    want = {k: store.prefix_size(k, policy.scans(k, resolution)) for k in store.keys}

    fresh = open_store(store.root)  # each path on its own store: its counter is what storage really served
    engine = Engine(fresh, EagerRunner(tiny_classifier()), policy=policy,
                    config=PipelineConfig(batch_size=4, resolution=resolution)).run(progress=False)
    assert {p.key: p.bytes_read for p in engine.predictions} == want
    assert fresh.bytes_read == engine.summary["bytes_read"] == sum(want.values())

    fresh = open_store(store.root)
    service = Service(EagerRunner(tiny_classifier()), ("cat", "dog"), store=fresh, policy=policy,
                      config=ServeConfig(resolution=resolution))
    with TestClient(create_app(service)) as client:
        served = {k: client.post("/predict/key", json={"key": k}).json()["bytes_read"] for k in store.keys}
    assert served == want and fresh.bytes_read == sum(want.values())

    fresh, reads = open_store(store.root), set()
    read = fresh.read

    def recording(key, scans=None):
        reads.add((key, scans))
        return read(key, scans)

    fresh.read = recording
    rows = heldout_table(tiny_classifier(), fresh, policy, store.keys, crops=(1.0,), target=0.05, batch_size=4,
                         progress=False)
    for k in store.keys:  # the evaluation decoded the policy's prefix (every scan: the whole file)
        scans = policy.scans(k, resolution)
        assert (k, scans) in reads or (scans == store.num_scans(k) and (k, None) in reads)
    (row,) = [r for r in rows if r["resolution"] == resolution]
    sizes = sum(store.size(k) for k in store.keys)
    assert row["read_savings"] == pytest.approx(1.0 - sum(want.values()) / sizes, abs=1e-12)
    assert (row["read_savings"] == 0.0) == (RULES[resolution].family == "full")


def test_a_new_upload_reads_its_count_rule_and_every_scan_otherwise(policy_path):
    _, path = policy_path
    policy = load_policy(str(path))
    assert policy.scans("not/in/the/store.jpg", 32) == 2
    assert policy.scans("not/in/the/store.jpg", 48) is None and policy.scans("not/in/the/store.jpg", 64) is None
    assert np.shape(policy.counts) == (len(policy.keys), len(GRID))
