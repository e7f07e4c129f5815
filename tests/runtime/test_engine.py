"""The batch engine agrees with calling the models by hand, and reads exactly the bytes its policy asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_fixtures import GRID, SCALE_RES, StepPolicy, make_store, tiny_classifier, tiny_scale

from dynres.errors import ConfigError
from dynres.io.decode import crop_resize, decode, decode_baseline, decode_scaled
from dynres.model.nets import to_input
from dynres.runtime.engine import Engine, PipelineConfig
from dynres.runtime.runners import EagerRunner, KernelRunner, choose


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
        once = decode_scaled(prefix, max(GRID) / cfg.crop)
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
        once = decode_scaled(store.read(pred.key, longest), max(GRID) / cfg.crop)
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


def test_kernel_runner_cuts_and_pads_batches_like_eager():
    model = tiny_classifier()
    x = torch.randint(0, 255, (7, 3, 32, 32), dtype=torch.uint8)
    runner = KernelRunner(model, batch=3, batches=(3, 1))
    runner._kernels = {(32, 3): lambda t: (t.shape[0] == 3 or pytest.fail("not padded")) and model(t),
                       (32, 1): model}
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)


def test_kernel_runner_cuts_a_batch_down_the_ladder_of_tuned_sizes(tmp_path):
    model, calls = tiny_classifier(), []

    def kernel(size):
        return lambda t: (calls.append(size), t.shape[0] == size or pytest.fail("wrong shape"))[1] and model(t)

    runner = KernelRunner(model, batch=16, cache_dir=Path(tmp_path))  # nothing tuned: the default ladder
    assert runner.ladder(32) == (16, 4, 1)
    runner._kernels = {(32, b): kernel(b) for b in runner.ladder(32)}
    x = torch.randint(0, 255, (23, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert calls == [16, 4, 4]  # 23 = 16 + 4 + 3 (padded to 4); never seven batch-1 calls


def test_kernel_runner_uses_the_batch_sizes_the_cache_holds(tmp_path):
    from dynres.runtime.kernels import TuneConfig, tune

    model = tiny_classifier()
    tune(model, TuneConfig(resolutions=(32,), batch_sizes=(1, 4), threads=1, runs=2, min_runs=1,
                           backends=("eager",), cache_dir=tmp_path), gemm_peak=1.0, progress=False)
    runner = KernelRunner(model, batch=8, threads=1, cache_dir=tmp_path)  # a service allowing batches of 8
    assert runner.ladder(32) == (4, 1)  # the tuned sizes, not an untuned 8
    assert runner.ladder(48) == (8, 4, 1)  # nothing tuned at 48 px: the default ladder
    x = torch.randint(0, 255, (9, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(runner(x, 32), EagerRunner(model)(x, 32), atol=1e-5)
    assert set(runner._kernels) == {(32, 4), (32, 1)}


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


def test_infer_command_writes_predictions_and_a_summary(store, tmp_path):
    from typer.testing import CliRunner

    from dynres.cli.main import app
    from dynres.model.checkpoint import ModelMeta, save_checkpoint
    from dynres.model.nets import create_model

    torch.manual_seed(0)
    save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", ("cat", "dog"), 48), tmp_path / "b.pt")
    save_checkpoint(create_model("mobilenet_v2_tiny", len(GRID)),
                    ModelMeta("mobilenet_v2_tiny", (), SCALE_RES, task="scale", grid=GRID, scans=2), tmp_path / "s.pt")
    from dynres.policy.calibration import CalibrationPolicy

    counts = np.array([[1 + i % 3, 3, 4] for i in range(len(store.keys))])  # scans per (image, 32/48/64 px)
    policy = CalibrationPolicy({32: 0.95, 48: 0.96, 64: 0.97}, tuple(store.keys), counts)
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


def test_bench_pipeline_writes_every_mode_and_their_ratios(store, tmp_path):
    import json

    from dynres.bench.pipeline import PipelineBenchConfig, run_bench_pipeline
    from dynres.model.checkpoint import ModelMeta, save_checkpoint
    from dynres.model.nets import create_model

    torch.manual_seed(0)
    save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", ("cat", "dog"), 48), tmp_path / "b.pt")
    save_checkpoint(create_model("mobilenet_v2_tiny", len(GRID)),
                    ModelMeta("mobilenet_v2_tiny", (), SCALE_RES, task="scale", grid=GRID, scans=2), tmp_path / "s.pt")
    from dynres.policy.calibration import CalibrationPolicy

    counts = np.full((len(store.keys), len(GRID)), 3)
    CalibrationPolicy(dict.fromkeys(GRID, 0.95), tuple(store.keys), counts).save(tmp_path / "policy.json")
    cfg = PipelineBenchConfig(batch_size=4, kernels="eager", warmup=2)
    run_bench_pipeline(str(store.root), str(tmp_path / "b.pt"), str(tmp_path / "s.pt"), tmp_path / "out",
                       str(tmp_path / "policy.json"), cfg=cfg, progress=False)
    record = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    rows = record["pipeline"]
    assert set(rows) == {"baseline", "static_tuned", "dynamic", "dynamic_read_ahead", "dynamic_exact"}
    assert all({"images_per_s", "accuracy", "bytes_per_image", "p50_ms", "p99_ms"} <= set(r) for r in rows.values())
    for row in rows.values():  # the median of the interleaved timed runs
        assert len(row["images_per_s_runs"]) == cfg.repeats
        assert row["images_per_s"] == sorted(row["images_per_s_runs"])[(cfg.repeats - 1) // 2]
    assert rows["baseline"]["read_fraction"] == 1.0  # the baseline always reads whole files
    assert rows["dynamic"]["bytes_per_image"] == rows["static_tuned"]["bytes_per_image"] == pytest.approx(
        sum(store.prefix_size(k, 3) for k in store.keys) / len(store.keys))  # the policy's 3 scans, nothing more
    assert record["static_resolution"] == max(record["static_sweep"], key=lambda r: (r["accuracy"], -r["resolution"]))[
        "resolution"]
    static_acc = next(r["accuracy"] for r in record["static_sweep"] if r["resolution"] == record["static_resolution"])
    for mode, lam in record["lams"].items():
        sweep = [r for r in record["lam_sweep"] if r["mode"] == mode]
        assert [r["lam"] for r in sweep] == list(cfg.lambdas)
        within = [r["lam"] for r in sweep if r["accuracy"] >= static_acc - cfg.tolerance]
        assert lam == max(within, default=0.0)  # each variant runs at the cheapest λ that keeps (b)'s accuracy
    best = record["ratios"]["dynamic_mode"]  # the targets judge the fastest variant that keeps (b)'s accuracy
    ok = [m for m in record["lams"] if rows[m]["accuracy"] >= rows["static_tuned"]["accuracy"] - cfg.tolerance]
    if ok:
        assert rows[best]["images_per_s"] == max(rows[m]["images_per_s"] for m in ok)
    assert record["ratios"]["dynamic_vs_baseline_images_per_s"] == pytest.approx(
        rows[best]["images_per_s"] / rows["baseline"]["images_per_s"])
    assert "(c)/(a)" in (tmp_path / "out" / "pipeline.md").read_text()
