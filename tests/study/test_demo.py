"""study.demo: the demo's stages (the whole run is `make demo`; here what can be checked in a second)."""

import pytest

from dynres.errors import ConfigError
from dynres.study.demo import StudyConfig, run_study


def test_the_demo_refuses_the_seed_its_shipped_weights_were_trained_on(tmp_path):
    from dynres.io.synth import PRETRAIN_SEED

    with pytest.raises(ConfigError, match="shipped weights"):
        run_study(StudyConfig(out=tmp_path, seed=PRETRAIN_SEED))
    assert not (tmp_path / "data").exists()


def test_a_run_whose_splits_name_different_classes_stops_after_ingest_naming_them(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog")), ("val", ("cat", "zebra"))):
        for c in classes:
            (tmp_path / "data" / split / c).mkdir(parents=True)
            Image.new("RGB", (64, 48), (120, 30, 200)).save(tmp_path / "data" / split / c / "a.jpg")
    with pytest.raises(ConfigError, match="only in train/: dog; only in val/: zebra"):
        run_study(StudyConfig(out=tmp_path / "run", data=tmp_path / "data"))
    assert not (tmp_path / "run" / "accuracy").exists()  # refused before any training


def test_a_users_data_folder_is_keyed_on_its_files_so_an_added_or_edited_image_reruns_ingest(tmp_path):
    import os

    from dynres.study.demo import data_listing

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"x" * 10)
    first = data_listing(tmp_path)
    assert data_listing(tmp_path) == first  # nothing changed: the cached stages answer
    (tmp_path / "train" / "cat" / "b.jpg").write_bytes(b"y" * 10)
    added = data_listing(tmp_path)
    (tmp_path / "val" / "cat" / "a.jpg").write_bytes(b"z" * 11)
    os.utime(tmp_path / "val" / "cat" / "a.jpg", ns=(1, 1))
    assert len({first, added, data_listing(tmp_path)}) == 3


def test_the_guard_runs_first_and_the_pipeline_times_its_operating_point_then_serving_follows_it(tmp_path, models):
    """From the records of a (tiny) dynamic evaluation: the guard per crop; the pipeline benchmark's settings are its
    crop, r* and λ* (so nothing is chosen on the held-out images the benchmark times); serving.json agrees with the
    guard; the same guard for a dynamic record from before it (its per-image p(r) computed once, afterwards)."""
    import json

    from dynres.paper import crop_area
    from dynres.study.chain import ChainConfig
    from dynres.study.demo import _pipeline_config, guard_step, verdict_step
    from dynres.study.dynamic import PROBS_FILE, DynamicConfig, run_dynamic
    from dynres.study.stages import Study
    from dynres.study.static import EvalConfig

    store, backbone, scale = models
    chain = ChainConfig(eval=EvalConfig(grid=(16, 24, 32, 48), crops=(0.25, 1.0), batch_size=4),
                        dynamic=DynamicConfig(lambdas=(0.0, 0.5, 5.0), plot=False))
    eval_dir = tmp_path / "accuracy" / "eval"
    dyn = run_dynamic(backbone, scale, store, eval_dir, chain.dynamic, chain.eval, progress=False)
    acc = {"backbone": str(backbone), "scale_model": str(scale)}
    guard = guard_step(Study(tmp_path, 1), chain, store, acc, dyn, store.keys[::2])
    row = guard["crops"][-1]  # the default crop side 0.875 is nearest the 100% crop here
    cfg = _pipeline_config(StudyConfig(out=tmp_path, workers=1), 0.5, guard, chain.dynamic.lambdas)
    assert crop_area(cfg.crop_side) == pytest.approx(row["crop"]) and cfg.static_resolution == row["static_resolution"]
    assert cfg.lam == (row["lambda"] if row["lambda"] is not None else 5.0) and cfg.tolerance == 0.5
    # p(r) recalibrated on the selection images by default, and the pipeline times that recalibration
    assert guard["recalibrated"] and cfg.recalibration == tuple(tuple(pair) for pair in row["recalibration"])
    plain = ChainConfig(eval=chain.eval, dynamic=DynamicConfig(lambdas=(0.0, 0.5, 5.0), plot=False, recalibrate=False))
    assert all("recalibration" not in r for r in guard_step(Study(tmp_path, 1), plain, store, acc, dyn,
                                                             store.keys[::2])["crops"])

    line = {"images_per_s": 10.0, "accuracy": 50.0, "bytes_per_image": 1e4, "p50_ms": 1.0, "p99_ms": 2.0,
            "gflops": 1.0}
    pipe = tmp_path / "pipeline.json"
    pipe.write_text(json.dumps({"config": {"crop_side": cfg.crop_side}, "static_resolution": cfg.static_resolution,
                                "baseline_resolution": 32, "lams": {"dynamic": cfg.lam},
                                "recalibration": [list(pair) for pair in cfg.recalibration],
                                "pipeline": {m: line for m in ("baseline", "static_tuned", "dynamic")}}))
    verdict = verdict_step(Study(tmp_path, 1), guard, "STORE", acc, {"policy": None}, {"json": str(pipe)})
    serving = json.loads((tmp_path / "serving.json").read_text())
    assert [e["mode"] for e in serving["crops"]] == [r["mode"] for r in verdict["crops"]]
    for entry, crop in zip(serving["crops"], verdict["crops"]):
        static = crop["mode"] == "static"
        assert (entry["engine"]["scale"] is None) == static
        assert entry["engine"]["config"]["resolution"] == (crop["static_resolution"] if static else None)
        assert entry["recalibration"] == (None if static else crop["recalibration"])
    assert verdict["pipeline"]["guard_crop"] == 1.0 and verdict["pipeline"]["lambda"] == cfg.lam
    assert verdict["pipeline"]["served"] == ("dynamic" if row["mode"] == "dynamic" else "static_tuned")
    assert json.loads((tmp_path / "verdict.json").read_text())["crops"] == guard["crops"]
    health = json.loads((tmp_path / "verdict.json").read_text())["health"]  # every validation image, vs chance
    assert health["backbone"]["images"] == len(store.keys) and health["classes"] == len(store.classes)
    assert bool(health["warnings"]) == health["backbone"]["at_chance"]  # no shard labels beside this run
    (eval_dir / PROBS_FILE).unlink()  # a record from before the guard
    assert guard_step(Study(tmp_path, 1), chain, store, acc, dyn, store.keys[::2])["crops"] == guard["crops"]
    assert (eval_dir / PROBS_FILE).is_file()
