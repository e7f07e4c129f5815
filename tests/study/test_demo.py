"""study.demo: the demo's stages (the whole run is `make demo`; here what can be checked in a second)."""

import pytest

from dynres.errors import ConfigError
from dynres.study.demo import StudyConfig, run_study


def test_the_demo_refuses_the_seed_its_shipped_weights_were_trained_on(tmp_path):
    from dynres.io.synth import PRETRAIN_SEED

    with pytest.raises(ConfigError, match="shipped weights"):
        run_study(StudyConfig(out=tmp_path, seed=PRETRAIN_SEED))
    assert not (tmp_path / "data").exists()


def test_the_verdict_step_writes_a_serving_config_that_follows_the_guard(tmp_path, models):
    """From the records of a (tiny) dynamic evaluation: the guard per crop, serving.json agreeing with it, and the
    same verdict for a dynamic record from before the guard (its per-image p(r) computed once, afterwards)."""
    import json

    from dynres.study.chain import ChainConfig
    from dynres.study.demo import verdict_step
    from dynres.study.dynamic import PROBS_FILE, DynamicConfig, run_dynamic
    from dynres.study.stages import Study
    from dynres.study.static import EvalConfig

    store, backbone, scale = models
    chain = ChainConfig(eval=EvalConfig(grid=(16, 24, 32, 48), crops=(0.25, 1.0), batch_size=4),
                        dynamic=DynamicConfig(lambdas=(0.0, 0.5, 5.0), plot=False))
    eval_dir = tmp_path / "accuracy" / "eval"
    dyn = run_dynamic(backbone, scale, store, eval_dir, chain.dynamic, chain.eval, progress=False)
    row = {"images_per_s": 10.0, "accuracy": 50.0, "bytes_per_image": 1e4, "p50_ms": 1.0, "p99_ms": 2.0}
    pipe = tmp_path / "pipeline.json"
    pipe.write_text(json.dumps({"config": {"crop_side": 0.875}, "static_resolution": 32, "baseline_resolution": 32,
                                "pipeline": {m: row for m in ("baseline", "static_tuned", "dynamic")}}))
    args = (chain, store, "STORE", {"backbone": str(backbone), "scale_model": str(scale)}, dyn, {"policy": None},
            store.keys[::2], {"json": str(pipe)})
    verdict = verdict_step(Study(tmp_path, 1), *args)
    serving = json.loads((tmp_path / "serving.json").read_text())
    assert [e["mode"] for e in serving["crops"]] == [r["mode"] for r in verdict["crops"]]
    for entry, guard in zip(serving["crops"], verdict["crops"]):
        static = guard["mode"] == "static"
        assert (entry["engine"]["scale"] is None) == static
        assert entry["engine"]["config"]["resolution"] == (guard["static_resolution"] if static else None)
    assert verdict["pipeline"]["guard_crop"] == 1.0 and json.loads((tmp_path / "verdict.json").read_text())
    (eval_dir / PROBS_FILE).unlink()  # a record from before the guard
    assert verdict_step(Study(tmp_path, 1), *args)["crops"] == verdict["crops"]
    assert (eval_dir / PROBS_FILE).is_file()
