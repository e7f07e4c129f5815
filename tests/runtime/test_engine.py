"""The batch engine agrees with calling the models by hand, and reads exactly the bytes its policy asks for."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynres.errors import ConfigError
from dynres.io.decode import crop_resize, decode, decode_baseline, decode_scaled
from dynres.model.nets import to_input
from dynres.runtime.engine import Engine, PipelineConfig
from dynres.runtime.runners import EagerRunner, choose
from pipeline_fixtures import (
    GRID,
    SCALE_RES,
    StepPolicy,
    make_store,
    save_tiny_checkpoints,
    tiny_classifier,
    tiny_scale,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("pipeline"))


def direct_logits(model, image):
    with torch.inference_mode():
        return model(to_input(image[None]))[0]


@pytest.mark.parametrize("decode_once", [True, False])
def test_dynamic_matches_direct_model_calls_and_reads_the_policys_bytes(store, decode_once):
    backbone, scale, policy = tiny_classifier(), tiny_scale(), StepPolicy()
    cfg = PipelineConfig(batch_size=3, workers=2, lam=0.3, decode_once=decode_once)
    store.reset_stats()
    result = Engine(store, EagerRunner(backbone), scale=scale, policy=policy, config=cfg,
                    classes=("cat", "dog")).run(progress=False)

    assert [p.key for p in result.predictions] == store.keys
    expected_bytes, reused = 0, 0
    for pred in result.predictions:
        key = pred.key
        # the scale prefix is decoded once, large enough for the largest grid resolution; views are resizes of it
        # (decode_once=False: every view is `decode`'s own, at its DCT scale)
        prefix = store.read(key, scale.scans)
        once = decode_scaled(prefix, max(GRID) / cfg.crop_side)
        small = crop_resize(once, SCALE_RES) if decode_once else decode(prefix, SCALE_RES)
        probs = torch.sigmoid(direct_logits(scale.runner.model, small)).numpy()[None]
        r = GRID[int(choose(probs, np.array(scale.costs), 0.3)[0])]
        scans = max(scale.scans, policy.scans(key, r))  # bytes already in hand are used, never re-read
        if scans == scale.scans:  # ... and so is their decode
            image, reused = (crop_resize(once, r) if decode_once else decode(prefix, r)), reused + 1
        else:
            image = decode(store.read(key, scans), r)
        logits = direct_logits(backbone, image)
        assert pred.resolution == r
        assert pred.top5 == torch.softmax(logits, 0).topk(2).indices.tolist()
        assert pred.top5_probs == pytest.approx(torch.softmax(logits, 0).topk(2).values.tolist(), abs=1e-5)
        assert pred.bytes_read == store.prefix_size(key, scans)
        assert pred.label == store.label(key) and pred.lam == 0.3
        expected_bytes += store.prefix_size(key, scans)
    s = result.summary
    assert s["bytes_read"] == expected_bytes == s["policy_bytes"]
    assert sum(s["resolution_histogram"].values()) == len(store.keys)
    assert len(s["resolution_histogram"]) > 1, "the random scale model should pick several resolutions"
    assert 0 < reused < len(store.keys), "both paths (decode reused, more scans fetched) should be exercised"
    assert 0 < s["scale_overhead"] < 1 and s["p50_ms"] <= s["p99_ms"]


def test_read_ahead_reads_and_decodes_each_image_once(store):
    backbone, scale, policy = tiny_classifier(), tiny_scale(), StepPolicy()
    store.reset_stats()
    cfg = PipelineConfig(batch_size=3, lam=0.3, read_ahead=True)
    result = Engine(store, EagerRunner(backbone), scale=scale, policy=policy, config=cfg).run(progress=False)

    longest = max(scale.scans, *(policy.scans(k, r) for k in store.keys for r in GRID))  # 64 px: 4 scans
    assert store.reads == len(store.keys)  # one read per image, never a second range
    for pred in result.predictions:
        assert pred.bytes_read == store.prefix_size(pred.key, longest)
        once = decode_scaled(store.read(pred.key, longest), max(GRID) / cfg.crop_side)
        logits = direct_logits(backbone, crop_resize(once, pred.resolution))
        assert pred.top5 == torch.softmax(logits, 0).topk(2).indices.tolist()
    assert result.summary["work_s"].get("read", 0.0) == 0.0


def test_static_mode_matches_direct_calls_with_calibrated_reads(store):
    backbone, policy = tiny_classifier(), StepPolicy()
    store.reset_stats()
    result = Engine(store, EagerRunner(backbone), policy=policy,
                    config=PipelineConfig(batch_size=4, resolution=48)).run(progress=False)
    for pred in result.predictions:
        logits = direct_logits(backbone, decode(store.read(pred.key, 3), 48))
        assert pred.resolution == 48 and pred.lam is None
        assert pred.top5 == torch.softmax(logits, 0).topk(2).indices.tolist()
    assert result.summary["bytes_read"] == sum(store.prefix_size(k, 3) for k in store.keys)
    assert result.summary["read_fraction"] < 1
    assert result.summary["mode"] == "static"


def test_baseline_reads_whole_files_and_uses_the_full_decode(store):
    backbone = tiny_classifier()
    store.reset_stats()
    result = Engine(store, EagerRunner(backbone), policy=StepPolicy(),
                    config=PipelineConfig(resolution=48, baseline=True)).run(progress=False)
    key = store.keys[0]
    logits = direct_logits(backbone, decode_baseline(store.read(key), 48))
    assert result.predictions[0].top5 == torch.softmax(logits, 0).topk(2).indices.tolist()
    assert result.summary["bytes_read"] == sum(store.size(k) for k in store.keys)
    assert result.summary["read_fraction"] == 1.0


def test_predictions_parquet_has_class_names_and_accuracy_matches(store, tmp_path):
    result = Engine(store, EagerRunner(tiny_classifier()), scale=tiny_scale(), policy=StepPolicy(),
                    classes=("cat", "dog")).run(progress=False)
    table = pq.read_table(result.write_parquet(tmp_path / "preds.parquet")).to_pylist()
    assert len(table) == len(store.keys)
    row = table[0]
    assert set(row["top5_classes"]) == {"cat", "dog"} and row["label"] == "cat"
    assert row["bytes_read"] <= row["file_bytes"]
    correct = sum(r["top5_classes"][0] == r["label"] for r in table)
    assert result.summary["accuracy"] == pytest.approx(100 * correct / len(table))


def test_a_scale_prefix_pushed_out_of_the_stores_cache_is_not_read_again(store):
    """The backbone's longer read fetches only the range the scale prefix lacks, although a cache of one entry
    has dropped that prefix by then (other keys were read meanwhile): the bytes read are the policy's, no more."""
    from dynres.io.store import open_store

    small_cache = open_store(store.root, cache_entries=1)
    cfg = PipelineConfig(batch_size=3, workers=2, lam=0.3)
    s = Engine(small_cache, EagerRunner(tiny_classifier()), scale=tiny_scale(), policy=StepPolicy(), config=cfg,
               classes=("cat", "dog")).run(progress=False).summary
    assert s["bytes_read"] == s["policy_bytes"]


def test_store_classes_the_backbone_lacks_count_in_no_accuracy(store, tmp_path):
    """A backbone of classes ("dog", "fox") on a cat/dog store: dog images are scored against its "dog" (index
    0), cat images against nothing (the store's index 0 is not the backbone's class 0)."""
    result = Engine(store, EagerRunner(tiny_classifier()), policy=StepPolicy(), config=PipelineConfig(resolution=48),
                    classes=("dog", "fox")).run(progress=False)
    cat = store.classes.index("cat")
    for p in result.predictions:
        assert p.label == (None if store.label(p.key) == cat else 0)
    dogs = [p for p in result.predictions if p.label is not None]
    assert result.summary["accuracy"] == pytest.approx(100 * np.mean([p.top5[0] == 0 for p in dogs]))
    labels = pq.read_table(result.write_parquet(tmp_path / "preds.parquet")).column("label").to_pylist()
    assert set(labels) == {None, "dog"}


@pytest.mark.parametrize("static", [False, True])
def test_an_image_that_cannot_be_read_is_skipped_and_reported_not_the_run(store, tmp_path, static):
    """One stored file changed on disk (its checksum fails): every other image still gets its prediction, and the
    summary names the one that did not; ``skip_bad=False`` stops at it instead."""
    import shutil

    from dynres.errors import ChecksumError
    from dynres.io.store import open_store

    shutil.copytree(store.root, tmp_path / "s")
    damaged = open_store(tmp_path / "s")
    bad = damaged.keys[3]
    path = damaged.location(bad)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    cfg = PipelineConfig(batch_size=3, resolution=48 if static else None)
    scale = None if static else tiny_scale()
    result = Engine(damaged, EagerRunner(tiny_classifier()), scale=scale, config=cfg).run(progress=False)
    assert [p.key for p in result.predictions] == [k for k in damaged.keys if k != bad]
    assert result.summary["failed"] == 1 and result.summary["images"] == len(damaged.keys) - 1
    assert result.summary["failures"][0]["key"] == bad and "sha256" in result.summary["failures"][0]["error"]
    with pytest.raises(ChecksumError, match=bad):
        Engine(open_store(tmp_path / "s"), EagerRunner(tiny_classifier()), scale=scale,
               config=PipelineConfig(batch_size=3, resolution=cfg.resolution, skip_bad=False)).run(progress=False)


def test_a_higher_cost_weight_picks_cheaper_resolutions(store):
    def mean_resolution(lam):
        engine = Engine(store, EagerRunner(tiny_classifier()), scale=tiny_scale(), config=PipelineConfig(lam=lam))
        preds = engine.run(progress=False).predictions
        return sum(p.resolution for p in preds) / len(preds)

    assert mean_resolution(2.0) < mean_resolution(0.0)
    assert mean_resolution(100.0) == min(GRID)


def test_bad_configuration_is_a_clear_error(store):
    with pytest.raises(ConfigError, match="static resolution"):
        Engine(store, EagerRunner(tiny_classifier()))
    with pytest.raises(ConfigError, match="baseline"):
        PipelineConfig(baseline=True)
    with pytest.raises(ConfigError, match="crop_side"):
        PipelineConfig(crop_side=1.2)
    with pytest.raises(ConfigError, match="no scale model"):  # a bias with nothing to choose is not dropped silently
        PipelineConfig(resolution=112, bias=(0.0, 0.1))
    with pytest.raises(ConfigError, match="finite"):
        PipelineConfig(bias=(float("nan"), 0.0))
    assert PipelineConfig(bias=[0, 0.5]).bias == (0.0, 0.5)  # serving.json's list is the declared tuple
    from dynres.runtime.engine import EngineSpec
    from dynres.runtime.infer import run_inference

    with pytest.raises(ConfigError, match="limit"):  # not "all but the last 5"
        run_inference(EngineSpec(str(store.root), "unused.pt"), limit=-5)


def test_a_policy_without_rules_at_some_grid_resolutions_is_named_at_load(store, tmp_path, monkeypatch, capsys):
    """Reads at a resolution the policy has no rule for take every scan: said once, when the engine is built."""
    from dynres.policy.calibration import CalibrationPolicy, ReadRule
    from dynres.runtime.engine import EngineSpec, build_engine

    monkeypatch.delenv("DYNRES_NO_PROGRESS", raising=False)
    save_tiny_checkpoints(tmp_path)
    CalibrationPolicy({32: ReadRule("count", 2)}, (), np.zeros((0, 1), dtype=int)).save(tmp_path / "policy.json")
    build_engine(EngineSpec(str(store.root), str(tmp_path / "b.pt"), str(tmp_path / "s.pt"),
                            str(tmp_path / "policy.json")))
    assert "has no rule at 48, 64 px: reads there take every scan" in capsys.readouterr().err


def test_infer_command_writes_predictions_and_a_summary(store, tmp_path):
    from typer.testing import CliRunner

    from dynres.cli.app import app
    from dynres.policy.calibration import CalibrationPolicy, ReadRule

    save_tiny_checkpoints(tmp_path)
    counts = np.array([[1 + i % 3, 3, 4] for i in range(len(store.keys))])  # scans per (image, 32/48/64 px)
    policy = CalibrationPolicy({r: ReadRule("ssim", t) for r, t in ((32, 0.95), (48, 0.96), (64, 0.97))},
                               tuple(store.keys), counts)
    policy.save(tmp_path / "policy.json")
    out = tmp_path / "preds.parquet"
    res = CliRunner().invoke(app, ["infer", str(store.root), "--model", str(tmp_path / "b.pt"), "--scale",
                                   str(tmp_path / "s.pt"), "--policy", str(tmp_path / "policy.json"),
                                   "--out", str(out), "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(out).to_pylist()
    assert [r["key"] for r in rows] == store.keys
    for row in rows:  # the scale model reads 2 scans (its checkpoint says so), the backbone the policy's count
        want = max(2, policy.scans(row["key"], row["resolution"]))
        assert row["bytes_read"] == store.prefix_size(row["key"], want) < row["file_bytes"]
    assert (tmp_path / "preds.json").is_file() and "images/s" in res.output


@pytest.mark.parametrize("ahead_resolution", [None, GRID[0]])
def test_fetch_ahead_gives_the_same_predictions_in_fewer_requests(store, ahead_resolution):
    backbone, scale, policy = tiny_classifier(), tiny_scale(), StepPolicy()
    runs = {}
    for fetch_ahead in (False, True):
        cfg = PipelineConfig(batch_size=3, lam=0.3, fetch_ahead=fetch_ahead, fetch_ahead_resolution=ahead_resolution)
        store.reset_stats()
        runs[fetch_ahead] = Engine(store, EagerRunner(backbone), scale=scale, policy=policy, config=cfg).run(
            progress=False)
    plain, ahead = runs[False], runs[True]
    assert [(p.key, p.resolution, p.top5, p.bytes_read) for p in ahead.predictions] == [
        (p.key, p.resolution, p.top5, p.bytes_read) for p in plain.predictions]
    # plain: one request for the scale prefix, one more for each image whose resolution needs more scans
    more = [p for p in plain.predictions if policy.scans(p.key, p.resolution) > scale.scans]
    assert plain.summary["requests"] == len(store.keys) + len(more)
    ahead_scans = policy.scans("", ahead_resolution or max(GRID))
    beyond = [p for p in plain.predictions if policy.scans(p.key, p.resolution) > max(scale.scans, ahead_scans)]
    assert ahead.summary["requests"] == len(store.keys) + len(beyond)
    if ahead_resolution is None:  # the largest grid resolution's prefix: never a second request
        assert ahead.summary["requests_per_image"] == 1.0
        assert ahead.summary["bytes_read"] == sum(store.prefix_size(k, max(scale.scans, ahead_scans))
                                                  for k in store.keys)


class PeakPolicy:
    """A policy that does not grow with the resolution: the smallest reads the most (calibrated policies can)."""

    def scans(self, key: str, resolution: int) -> int:
        return 4 if resolution == GRID[0] else 2


def test_fetch_ahead_fetches_the_longest_prefix_any_resolution_needs_not_the_largest_resolutions(store):
    backbone, scale = tiny_classifier(), tiny_scale()
    cfg = PipelineConfig(batch_size=3, lam=0.3, fetch_ahead=True)
    store.reset_stats()
    result = Engine(store, EagerRunner(backbone), scale=scale, policy=PeakPolicy(), config=cfg).run(progress=False)
    assert any(p.resolution == GRID[0] for p in result.predictions)  # some image needs the longest prefix
    assert result.summary["requests_per_image"] == 1.0
    assert result.summary["bytes_read"] == sum(store.prefix_size(k, 4) for k in store.keys)


def test_fetch_ahead_and_read_ahead_do_not_combine():
    with pytest.raises(ConfigError, match="read_ahead"):
        PipelineConfig(read_ahead=True, fetch_ahead=True)
