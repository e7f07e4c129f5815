"""The Ray engine's actors, called in this process (their code does not need Ray running)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dynres.errors import BadImageError
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.ray_actors import BackboneActor, FusedActor, ScaleActor
from pipeline_fixtures import make_store, save_tiny_checkpoints


def test_a_failed_call_cancels_the_reads_that_have_not_started(tmp_path):
    """With ``skip_bad`` off the call stops at the first bad image, and the reads queued behind it never run."""
    store = make_store(tmp_path, per_class=5)
    save_tiny_checkpoints(tmp_path)
    spec = EngineSpec(str(tmp_path / "store"), str(tmp_path / "b.pt"), str(tmp_path / "s.pt"),
                      config=PipelineConfig(batch_size=3, workers=1, torch_threads=1, skip_bad=False))
    actor = ScaleActor(spec, threads=1)
    read, calls, lock = actor.engine.scale_read, [], threading.Lock()

    def failing_first(it):
        with lock:
            calls.append(it.key)
        if len(calls) == 1:
            raise BadImageError(it.key, "corrupt")
        time.sleep(0.05)  # later reads are slow: the failure is seen while they are queued
        return read(it)

    actor.engine.scale_read = failing_first
    keys = list(store.keys)
    with pytest.raises(BadImageError, match=keys[0]):
        actor({"key": keys, "label": [0] * len(keys)})
    actor.pool.shutdown(wait=True)
    assert len(calls) <= 2 < len(keys)  # the failed read, and at most the one already running


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_an_unreadable_image_is_skipped_by_the_actors_as_by_the_local_engine(tmp_path, layout):
    """A stored file changed on disk: the actors write every other image's row, each the local engine's answer."""
    from dynres.runtime.engine import build_engine

    store = make_store(tmp_path, per_class=5)
    save_tiny_checkpoints(tmp_path)
    bad = store.keys[4]
    path = store.location(bad)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    spec = EngineSpec(str(tmp_path / "store"), str(tmp_path / "b.pt"), str(tmp_path / "s.pt"),
                      config=PipelineConfig(batch_size=3, workers=1, torch_threads=1))
    keys = list(store.keys)
    batch = {"key": np.array(keys), "label": np.array([store.label(k) for k in keys])}
    if layout == "fused":
        table = FusedActor(spec, threads=1)(batch)
    else:
        handed = ScaleActor(spec, threads=1)(batch)
        table = BackboneActor(spec, threads=1)({name: handed.column(name).to_numpy(zero_copy_only=False)
                                                for name in handed.column_names})
    local = build_engine(spec).run(progress=False)
    assert local.summary["failed"] == 1 and local.summary["failures"][0]["key"] == bad
    assert table.column("key").to_pylist() == [k for k in keys if k != bad] == [p.key for p in local.predictions]
    classes = local.classes
    assert table.column("top5_classes").to_pylist() == [[classes[i] for i in p.top5] for p in local.predictions]
