"""Calibration end to end: the hashed split, the pools, the records (the search: test_certify; the policy it saves:
tests/policy)."""

import json
import threading

import numpy as np
import pytest
import torch

from dynres.errors import ConfigError
from dynres.io.store import open_store
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.policy.calibration import CalibrationPolicy, ReadRule, load_policy
from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine
from dynres.study.calibrate import CalibrationConfig, calibrate, judges_from_record, split_keys
from dynres.study.calibration_heldout import dynamic_rows
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


def test_split_is_deterministic_disjoint_and_stable_as_the_store_grows():
    keys = [f"c/{i:04d}" for i in range(400)]
    calib, held = split_keys(keys, 0.5)
    assert set(calib).isdisjoint(held) and len(calib) + len(held) == 400 and 150 < len(held) < 250
    calib2, held2 = split_keys(keys + [f"c/{i:04d}" for i in range(400, 500)], 0.5)
    assert set(held) <= set(held2) and set(calib) <= set(calib2)


def test_calibrate_end_to_end_writes_policy_records_and_figure(store_dir, checkpoint, tmp_path):
    store = open_store(store_dir)
    cfg = CalibrationConfig(target=0.0, delta=None, crops=(1.0,), sweep=(0.94, 0.99, 1.0), batch_size=8)
    record = calibrate(store, checkpoint, tmp_path, cfg, progress=False)
    policy = load_policy(record["policy"])
    for s in record["search"]:  # on the calibration images the target holds by construction
        assert s["family"] == "full" or s["bound"] <= 1e-9
        assert policy.rules[s["resolution"]].to_dict() == s["rule"]
        assert {w["family"] for w in s["families"]} == {"count", "ssim"}
    held = {r["resolution"] for r in record["calibration"]}
    assert held == set(RES) and {r["crop"] for r in record["calibration"]} == {0.765625, 1.0}
    assert record["calibration_images"] + record["heldout_images"] == len(store.keys)
    prov = policy.provenance
    assert prov["target"] == 0.0 and prov["delta"] is None and prov["model_sha256"] and prov["store_manifest_hash"]
    _calib, held_keys = split_keys(store.keys, 0.5)
    assert prov["heldout_images"] == len(held_keys)
    for name in ("calibration.json", "calibration.md", "calibration_sweep.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert {"resolution", "family", "relative_bytes", "acc_change"} <= set(saved["calibration_sweep"][0])
    assert all(0.0 <= r["read_savings"] < 1.0 for r in saved["calibration"])
    # holding a second crop to the target too can only shorten a walk, never save more
    both = calibrate(store, checkpoint, tmp_path / "both", CalibrationConfig(
        target=0.0, delta=None, crops=(1.0,), sweep=(1.0,), batch_size=8, search_crops=(1.0,)), progress=False)
    assert both["search_crops"] == [0.765625, 1.0]
    for one, two in zip(record["search"], both["search"]):
        assert two["read_savings"] <= one["read_savings"] + 1e-12


def test_with_the_default_guarantee_a_handful_of_images_certifies_nothing_and_says_so(store_dir, checkpoint,
                                                                                       tmp_path):
    record = calibrate(open_store(store_dir), checkpoint, tmp_path, CalibrationConfig(crops=(1.0,), sweep=(1.0,),
                                                                                      batch_size=8), progress=False)
    assert all(s["family"] == "full" and s["read_savings"] == 0.0 for s in record["search"])
    assert all(r["read_savings"] == 0.0 for r in record["calibration"])
    assert record["search"][0]["images_needed_without_events"] > 1000
    assert "needs" in (tmp_path / "calibration.md").read_text()


def test_judges_are_the_shard_backbones_each_with_the_shard_it_labelled(store_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = open_store(store_dir)
    keys = list(store.keys)
    folds = [i % 2 for i in range(len(keys))]
    pq.write_table(pa.table({"key": keys, "split": [0] * len(keys), "fold": folds}), tmp_path / "labels.parquet")
    for fold in ("f0", "f1"):  # the checkpoints themselves load only when a judge runs
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "model.pt").write_bytes(b"")
    (tmp_path / "scale.json").write_text(json.dumps({"backbones": ["f0/model.pt", "f1/model.pt"],
                                                     "labels": str(tmp_path / "labels.parquet")}))
    judges = judges_from_record(store, tmp_path / "scale.json")
    assert [j.checkpoint for j in judges] == [str(tmp_path / "f0/model.pt"), str(tmp_path / "f1/model.pt")]
    assert set(judges[0].keys) == set(keys[0::2]) and set(judges[1].keys) == set(keys[1::2])
    (tmp_path / "bad.json").write_text(json.dumps({"backbones": ["f0/model.pt"],
                                                   "labels": str(tmp_path / "labels.parquet")}))
    with pytest.raises(ConfigError, match="1 backbones but 2 labelled shards"):
        judges_from_record(store, tmp_path / "bad.json")


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


def test_dynamic_rows_are_what_engines_built_from_the_paths_give(store_dir, checkpoint, tmp_path):
    """dynamic_rows loads the models once and runs a policy that reads every scan only once (it is the full read);
    either way each row is what a separately built engine reports, and a shorter policy is really run."""
    torch.manual_seed(1)
    store = open_store(store_dir)
    keys = list(store.keys)
    scale = save_checkpoint(create_model("resnet_tiny", len(RES)).eval(),
                            ModelMeta("resnet_tiny", tuple(store.classes), 56, task="scale", grid=RES),
                            tmp_path / "scale" / "model.pt")
    num_scans = np.array([store.num_scans(k) for k in keys])
    policies = {name: CalibrationPolicy.from_rules({r: rule for r in RES}, tuple(keys), num_scans)
                .save(tmp_path / f"{name}.json") for name, rule in (("full", ReadRule("full")),
                                                                    ("short", ReadRule("count", 2)))}
    for name, policy in policies.items():
        [row] = dynamic_rows(str(store_dir), checkpoint, scale, policy, keys, (1.0,), 0.05)
        runs = {run: build_engine(EngineSpec(str(store_dir), str(checkpoint), str(scale), pol, "eager",
                                             PipelineConfig(crop_side=1.0))).run(keys, progress=False).summary
                for run, pol in (("full", None), ("calibrated", str(policy)))}
        assert row["acc_full"] == runs["full"]["accuracy"]
        assert row["acc_calibrated"] == runs["calibrated"]["accuracy"]
        assert row["read_savings"] == 1.0 - runs["calibrated"]["read_fraction"]
        assert row["resolution_histogram"] == runs["calibrated"]["resolution_histogram"]
        assert (row["read_savings"] > 0.1) == (name == "short")
    stopped = threading.Event()
    stopped.set()  # the caller failed: no pipeline run starts
    assert dynamic_rows(str(store_dir), checkpoint, scale, policies["short"], keys, (1.0,), 0.05, stopped) == []


@pytest.mark.parametrize("bad, setting", [
    ({"search_crops": (0.0,)}, "search_crops"), ({"delta": -0.1}, "delta"), ({"delta": 1.0}, "delta"),
    ({"criterion": "median"}, "criterion"), ({"families": ()}, "families"), ({"families": ("psnr",)}, "families"),
    ({"target": -1.0}, "calibration"), ({"holdout_fraction": 1.0}, "calibration"),
    ({"crops": ()}, "crops"), ({"crops": (0.25, 1.5)}, "crops"),
])
def test_a_calibration_config_refuses_bad_settings_when_built(bad, setting):
    assert CalibrationConfig(delta=0).delta is None  # a run file's way to ask for point estimates
    with pytest.raises(ConfigError, match=setting):
        CalibrationConfig(**bad)


def test_the_index_is_needed_for_the_calibration_images_only_until_an_ssim_rule_is_chosen(store_dir, checkpoint,
                                                                                           tmp_path):
    import shutil

    from dynres.policy.quality import QUALITY, QualityConfig, build_quality_index
    from dynres.study.calibrate import calibration_keys

    root = tmp_path / "store"
    shutil.copytree(store_dir, root)
    (root / QUALITY).unlink()
    store = open_store(root)
    calib, held = calibration_keys(store.keys, CalibrationConfig())
    build_quality_index(root, QualityConfig(resolutions=RES, workers=1), progress=False, keys=calib)
    # a count rule needs no index beyond the calibration images': nothing is added
    counts = calibrate(open_store(root), checkpoint, tmp_path / "count", CalibrationConfig(
        target=100.0, delta=None, families=("count",), crops=(1.0,), sweep=(1.0,), batch_size=8), progress=False)
    assert counts["quality_index_extension"] is None
    assert {s["family"] for s in counts["search"]} == {"count"}
    # an SSIM rule at every resolution: the index is extended to the held-out images, and only to them
    ssim = calibrate(open_store(root), checkpoint, tmp_path / "ssim", CalibrationConfig(
        target=100.0, delta=None, families=("ssim",), crops=(1.0,), sweep=(1.0,), batch_size=8), progress=False)
    assert {s["family"] for s in ssim["search"]} == {"ssim"}
    assert ssim["quality_index_extension"]["computed"] == len(held)
    policy = load_policy(ssim["policy"])
    assert set(policy.keys) == set(store.keys) and (policy.counts >= 1).all()


def test_an_ssim_rule_on_a_fully_indexed_store_writes_nothing_to_it(store_dir, checkpoint, tmp_path):
    from dynres.policy.quality import QUALITY

    before = (store_dir / QUALITY).stat().st_mtime_ns
    record = calibrate(open_store(store_dir), checkpoint, tmp_path, CalibrationConfig(
        target=100.0, delta=None, families=("ssim",), crops=(1.0,), sweep=(1.0,), batch_size=8), progress=False)
    assert {s["family"] for s in record["search"]} == {"ssim"} and record["quality_index_extension"] is None
    assert (store_dir / QUALITY).stat().st_mtime_ns == before


def test_a_recorded_path_resolves_beside_its_record_when_the_run_moved(tmp_path, monkeypatch):
    from dynres.errors import StoreError
    from dynres.study.calibrate import recorded_path

    monkeypatch.chdir(tmp_path)  # not a directory where a real run sits at these relative paths (a demo's clone)
    run = tmp_path / "moved" / "accuracy" / "scale"
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "model.pt").write_bytes(b"x")
    record = run / "scale.json"
    assert recorded_path(record, "runs/demo/accuracy/scale/fold0/model.pt") == run / "fold0" / "model.pt"
    assert recorded_path(record, str(run / "fold0" / "model.pt")) == run / "fold0" / "model.pt"
    with pytest.raises(StoreError, match="neither there nor beside"):
        recorded_path(record, "runs/demo/accuracy/scale/fold1/model.pt")
    # another run at the same relative path from here: the record's own files win
    other = tmp_path / "runs" / "demo" / "accuracy" / "scale" / "fold0"
    other.mkdir(parents=True)
    (other / "model.pt").write_bytes(b"y")
    assert recorded_path(record, "runs/demo/accuracy/scale/fold0/model.pt") == run / "fold0" / "model.pt"
    (run / "scale_labels.parquet").write_bytes(b"z")  # a file right beside the record
    assert recorded_path(record, "runs/demo/accuracy/scale/scale_labels.parquet") == run / "scale_labels.parquet"
    with pytest.raises(StoreError):  # a file of the same name under another folder is not this record's
        recorded_path(record, "elsewhere/scale.json")


def test_an_ssim_rule_is_not_applied_to_an_index_built_with_other_settings(store_dir, checkpoint, tmp_path):
    import shutil

    from dynres.policy.quality import QUALITY, QualityConfig, build_quality_index

    calib = tmp_path / "calib"
    shutil.copytree(store_dir, calib)
    (calib / QUALITY).unlink()
    build_quality_index(calib, QualityConfig(resolutions=RES, crop_side=0.8, workers=1), progress=False)
    with pytest.raises(ConfigError, match="other settings"):
        calibrate(open_store(store_dir), checkpoint, tmp_path / "out", CalibrationConfig(
            target=100.0, delta=None, families=("ssim",), crops=(1.0,), sweep=(1.0,), batch_size=8),
            calib_store=open_store(calib), progress=False)


def test_the_held_out_table_takes_full_reads_from_the_static_evaluation_and_gives_the_same_rows(
        store_dir, checkpoint, tmp_path, monkeypatch):
    import dynres.study.calibration_heldout as heldout
    from dynres.study.static import EvalConfig, run_static

    store = open_store(store_dir)
    for name, grid in (("eval", RES), ("eval_top", RES[-1:])):  # every resolution; only the largest
        run_static(checkpoint, store, tmp_path / name, EvalConfig(grid=grid, crops=(0.25, 1.0), batch_size=8,
                                                                   backend="ort"), progress=False)
    # target 0 as point estimates: shorter reads are certified, so calibrated reads are predicted too
    cfg = CalibrationConfig(target=0.0, delta=None, crops=(0.25, 1.0), sweep=(1.0,), batch_size=8)
    asked, predict = [], heldout.predict_lanes

    def recording(model, store, keys, grid, crops, scans=None, **kw):
        asked.append((scans is None, tuple(grid), tuple(crops)))
        return predict(model, store, keys, grid, crops, scans=scans, **kw)

    monkeypatch.setattr(heldout, "predict_lanes", recording)
    again = calibrate(store, checkpoint, tmp_path / "again", cfg, progress=False)
    assert again["heldout_full_reads_from"] is None and (True, RES, (0.25, 0.765625, 1.0)) in asked
    assert any(r["read_savings"] > 0 for r in again["calibration"])  # some cells do read less
    for name, predicted in (("eval", []), ("eval_top", [(RES[:1], (0.25, 1.0))])):
        asked.clear()
        reused = calibrate(store, checkpoint, tmp_path / f"reused_{name}", cfg, progress=False,
                           static_eval=tmp_path / name / "static.json")
        assert reused["heldout_full_reads_from"] == str(tmp_path / name / "static.json")
        # full reads are predicted only where the static evaluation has none: the crop it lacks, and its missing
        # resolutions at its crops (decoded as its views were); calibrated reads at its crops are decoded likewise
        assert [(g, c) for full, g, c in asked if full] == predicted + [(RES, (0.765625,))]
        assert any(not full and crops == (0.25, 1.0) for full, _, crops in asked)
        for a, b in zip(again["calibration"], reused["calibration"]):
            if a["crop"] != 0.765625:  # views made with the same crops and largest resolution: the same cells
                assert a == b


def test_static_full_reads_are_taken_only_where_they_are_this_calibrations(store_dir, checkpoint, tmp_path):
    from dynres.study.calibration_heldout import static_full_reads
    from dynres.study.static import EvalConfig, run_static

    store = open_store(store_dir)
    for backend in ("ort", "eager"):
        run_static(checkpoint, store, tmp_path / backend, EvalConfig(grid=RES, crops=(1.0,), batch_size=8,
                                                                     backend=backend), progress=False)
    keys = store.keys[:5]
    found = static_full_reads(tmp_path / "ort" / "static.json", store, checkpoint, "ort", False, RES, keys)
    assert found is not None and found.crops == (1.0,) and found.table.num_rows == len(keys) * len(RES)
    assert static_full_reads(tmp_path / "eager" / "static.json", store, checkpoint, "eager", False, RES, keys) is None
    assert static_full_reads(tmp_path / "ort" / "static.json", store, checkpoint, "ort", True, RES, keys) is None
    # a full read of other bytes, or a static evaluation that read a policy's prefixes
    moved = _OneImageChanged(store)
    assert static_full_reads(tmp_path / "ort" / "static.json", moved, checkpoint, "ort", False, RES, keys) is None
    run_static(checkpoint, store, tmp_path / "prefix", EvalConfig(grid=RES, crops=(1.0,), batch_size=8, backend="ort"),
               scans=1, progress=False)
    assert static_full_reads(tmp_path / "prefix" / "static.json", store, checkpoint, "ort", False, RES, keys) is None
    # a part of its grid is taken; a resolution above its largest is not (its views were decoded too small)
    part = static_full_reads(tmp_path / "ort" / "static.json", store, checkpoint, "ort", False, (56, 84), keys)
    assert part is not None and part.resolutions == (56,) and part.top == max(RES)
    assert static_full_reads(tmp_path / "ort" / "static.json", store, checkpoint, "ort", False, (56, 224), keys) is None
    torch.manual_seed(1)
    other = save_checkpoint(create_model("resnet_tiny", len(store.classes)).eval(),
                            ModelMeta("resnet_tiny", tuple(store.classes), 56), tmp_path / "other.pt")
    assert static_full_reads(tmp_path / "ort" / "static.json", store, other, "ort", False, RES, keys) is None


class _OneImageChanged:
    """The store with other bytes behind its first key, as its manifest tells."""

    def __init__(self, store):
        self._store = store

    def __getattr__(self, name):
        return getattr(self._store, name)

    def sha256(self, key):
        return "0" * 64 if key == self._store.keys[0] else self._store.sha256(key)
