"""The Ray Data engine gives the local engine's results on a tiny store (local Ray, 2 CPUs)."""

from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import GRID, SCALE_RES, make_store

from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_store(root, per_class=4)
    torch.manual_seed(0)
    save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", ("cat", "dog"), 48), root / "b.pt")
    save_checkpoint(create_model("mobilenet_v2_tiny", len(GRID)),
                    ModelMeta("mobilenet_v2_tiny", (), SCALE_RES, task="scale", grid=GRID, scans=2), root / "s.pt")
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
