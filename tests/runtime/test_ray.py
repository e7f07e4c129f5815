"""The Ray Data engine gives the local engine's results on a tiny store (local Ray, 2 CPUs)."""

from __future__ import annotations

import pytest

from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine
from pipeline_fixtures import make_store, save_tiny_checkpoints

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_store(root, per_class=4)
    save_tiny_checkpoints(root)
    yield EngineSpec(str(root / "store"), str(root / "b.pt"), str(root / "s.pt"),
                     config=PipelineConfig(batch_size=3, lam=0.2, torch_threads=1))
    ray.shutdown()


def test_ray_engine_matches_the_local_engine(spec):
    from dynres.runtime.ray import run_ray

    local = build_engine(spec).run(progress=False)
    remote = run_ray(spec, num_cpus=2, progress=False)
    assert [p.key for p in remote.predictions] == [p.key for p in local.predictions]
    for r, l in zip(remote.predictions, local.predictions):
        assert (r.resolution, r.top5, r.bytes_read, r.label) == (l.resolution, l.top5, l.bytes_read, l.label)
        assert r.top5_probs == pytest.approx(l.top5_probs, abs=1e-5)
    assert remote.summary["accuracy"] == local.summary["accuracy"]
    assert remote.summary["bytes_read"] == local.summary["bytes_read"]
