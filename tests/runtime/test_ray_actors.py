"""The Ray engine's actors, called in this process (their code does not need Ray running)."""

from __future__ import annotations

import threading
import time

import pytest

from dynres.errors import BadImageError
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.ray_actors import ScaleActor
from pipeline_fixtures import make_store, save_tiny_checkpoints


def test_a_failed_call_cancels_the_reads_that_have_not_started(tmp_path):
    store = make_store(tmp_path, per_class=5)
    save_tiny_checkpoints(tmp_path)
    spec = EngineSpec(str(tmp_path / "store"), str(tmp_path / "b.pt"), str(tmp_path / "s.pt"),
                      config=PipelineConfig(batch_size=3, workers=1, torch_threads=1))
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
