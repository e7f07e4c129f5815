"""The verdict's evidence is each engine's own answers: the per-image tables the guard reads give, image for image,
the predictions the static and the dynamic engine make (study.static.views_table, study.demo.engine_views)."""

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint, save_checkpoint
from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine
from dynres.runtime.runners import choose
from dynres.study.demo import engine_views
from dynres.study.dynamic import PROBS_FILE, DynamicConfig, dynamic_record
from dynres.study.static import VIEW_TABLES, EvalConfig, run_static, views_table
from dynres.study.verdict import load_evidence

GRID = (16, 24, 32, 48)  # the scale model's grid (conftest.models)
CROP = 1.0


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, models):
    """The static evaluation (the cheap shared views, as the study runs it) and the scale model's p(r) per image."""
    store, backbone, scale = models
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(grid=GRID, crops=(CROP,), batch_size=4, backend="eager")
    run_static(backbone, store, out, cfg, progress=False)
    dyn = dynamic_record(backbone, scale, store, out, DynamicConfig(plot=False), cfg, progress=False,
                         probs_path=out / PROBS_FILE)
    return store, backbone, scale, out, dyn


def engine_answers(store, backbone, scale, **config) -> dict[str, tuple[int, int, float]]:
    """Per image: the resolution the engine ran, its top-1 class and that class's probability."""
    spec = EngineSpec("", str(backbone), None if "resolution" in config else str(scale),
                      config=PipelineConfig(batch_size=4, crop_side=CROP, **config))
    result = build_engine(spec, store).run(progress=False)
    return {p.key: (p.resolution, p.top5[0], p.top5_probs[0]) for p in result.predictions}


def table_answers(path, keys, resolutions) -> list[tuple[int, int, float]]:
    """What a per-image table says each image's answer is at its resolution: (resolution, top-1, probability)."""
    rows = {(r["key"], r["resolution"]): r for r in pq.read_table(path).to_pylist() if r["crop"] == CROP}
    return [(r, rows[(k, r)]["pred"], rows[(k, r)]["prob"]) for k, r in zip(keys, resolutions)]


def assert_same_answers(engine: dict, keys, table: list) -> None:
    """Same resolution and class, and the same probability up to float rounding (the pixels are the same; views
    resampled otherwise move it by up to a few hundredths on these models)."""
    for k, (r, pred, prob) in zip(keys, table):
        assert engine[k][:2] == (r, pred), k
        assert engine[k][2] == pytest.approx(prob, abs=1e-4), k


def test_the_static_engine_answers_as_the_exact_table_says(evaluated):
    store, backbone, scale, out, _ = evaluated
    keys, grid, _, _ = load_evidence(out)
    table = views_table(out, backbone, store, exact=True, progress=False)
    for r in grid:
        assert_same_answers(engine_answers(store, backbone, scale, resolution=r), keys,
                            table_answers(table, keys, [r] * len(keys)))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_the_dynamic_engine_chooses_and_answers_as_the_guards_evidence_says(evaluated, lam):
    """The scale model reads a 2-scan prefix, so the engine reads the rest and decodes the backbone's view as the
    static engine does: the guard takes those images' answers from the exact table."""
    store, backbone, scale, out, dyn = evaluated
    views = engine_views(out, backbone, store, dyn["scale_scans"], 4)
    assert dyn["scale_scans"] == 2 and views.exact_keys == frozenset(store.keys)
    keys, grid, p, _ = load_evidence(out, views.dynamic)
    cost = np.array([r["gflops"] for r in dyn["static"] if r["crop"] == CROP])
    pick = choose(p[CROP], cost, lam)
    assert_same_answers(engine_answers(store, backbone, scale, lam=lam), keys,
                        table_answers(views.static, keys, [grid[j] for j in pick]))


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_with_a_whole_file_scale_prefix_the_dynamic_engine_answers_as_the_decode_once_table_says(tmp_path, models,
                                                                                                  lam):
    """A scale model that reads every scan: its prefix's one decode serves the backbone's view too, so the guard
    reads the dynamic engine's decode-once table, and the engine chooses and answers image for image as it says."""
    store, backbone, scale = models
    model, meta = load_checkpoint(scale)
    whole = save_checkpoint(model, dataclasses.replace(meta, scans=None), tmp_path / "scale_whole.pt")
    cfg = EvalConfig(grid=GRID, crops=(CROP,), batch_size=4, backend="eager")
    run_static(backbone, store, tmp_path, cfg, progress=False)
    dyn = dynamic_record(backbone, whole, store, tmp_path, DynamicConfig(plot=False), cfg, progress=False,
                         probs_path=tmp_path / PROBS_FILE)
    views = engine_views(tmp_path, backbone, store, dyn["scale_scans"], 4)
    assert dyn["scale_scans"] is None and views.exact_keys == frozenset()
    assert views.dynamic == tmp_path / VIEW_TABLES[False]
    keys, grid, p, _ = load_evidence(tmp_path, views.dynamic)
    cost = np.array([r["gflops"] for r in dyn["static"] if r["crop"] == CROP])
    pick = choose(p[CROP], cost, lam)
    assert_same_answers(engine_answers(store, backbone, whole, lam=lam), keys,
                        table_answers(views.dynamic, keys, [grid[j] for j in pick]))


def test_a_views_table_is_made_once_and_only_for_the_checkpoint_it_evaluated(evaluated, models, tmp_path):
    store, backbone, scale, out, _ = evaluated
    path = views_table(out, backbone, store, exact=True, progress=False)
    assert path == out / VIEW_TABLES[True]
    stamp = path.stat().st_mtime_ns
    assert views_table(out, backbone, store, exact=True, progress=False).stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ConfigError, match="not the checkpoint"):
        views_table(out, scale, store, exact=True, progress=False)
