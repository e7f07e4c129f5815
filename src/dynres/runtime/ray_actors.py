"""The Ray engine's actors: each rebuilds the engine from its :class:`~dynres.runtime.engine.EngineSpec` and calls
the very functions the local engine calls, so predictions are identical.

Two layouts (:class:`dynres.runtime.ray.RayConfig` ``layout``):

- **fused** (:class:`FusedActor`): one pool whose actors run the local engine's whole pipelined loop
  (:meth:`Engine.run <dynres.runtime.engine.Engine.run>`) on each call's keys: its read/decode threads overlap
  the scale model and the backbone inside the actor (the JPEG decoders and torch release the GIL), and nothing
  crosses between actors. On CPUs this is the faster layout (docs/bench-ray.md).
- **split** (:class:`ScaleActor` then :class:`BackboneActor`): a pool per stage, the scale stage handing the
  backbone stage the prefix bytes it read, so each stage scales on its own (a GPU backbone pool fed by CPU scale
  actors). Each actor reads and decodes a call's images on ``config.workers`` threads, then runs its model.

Every output row carries its storage requests and bytes. Where one image's reads run on one thread (none in
flight beside them) they are that image's own; where a call's reads overlap on threads the store's counters
cannot tell images apart, so each row carries an even share of the call's total (the sums, which the summary
reports, are exact either way).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import pyarrow as pa
import torch

from dynres._ui import log
from dynres.runtime.engine import EngineSpec, WorkItem, build_engine, cut_prefix, top5
from dynres.runtime.ray_output import SCHEMA


def _actor_id() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"


def spread(total: int, n: int) -> np.ndarray:
    """``total`` split over ``n`` rows as evenly as integers allow (the first rows get the remainder)."""
    share = np.full(n, total // max(n, 1), np.int64)
    share[: total - int(share.sum())] += 1
    return share


@contextlib.contextmanager
def cancelled_on_error(futures: Sequence[Future]) -> Iterator[None]:
    """A call that fails (a corrupt image, a lost object) cancels its reads that have not started: they would
    hold the actor's read threads and the store, and delay its next call, for answers no one takes."""
    try:
        yield
    except BaseException:
        for f in futures:
            f.cancel()
        raise


class _EngineActor:
    """An actor that rebuilds the engine from its spec, running torch on ``threads`` threads."""

    def __init__(self, spec: EngineSpec, threads: int):
        torch.set_num_threads(threads)
        self.engine = build_engine(spec)
        self.store = self.engine.store
        self.actor = _actor_id()

    def counters(self) -> tuple[int, int]:
        return self.store.requests, self.store.bytes_read

    def log_skipped(self) -> None:
        """Name each image the engine skipped since the last call (:meth:`Engine.readable`) in the actor's log,
        which Ray forwards to the driver."""
        for key, why in self.engine.failures:
            log(f"skipped {key}: {why}")
        self.engine.failures = []

    def read_all(self, fn, items: list[WorkItem]):
        """``fn`` over ``items`` on the pipeline's read/decode threads: their futures (a caller runs a model on the
        first images while the rest decode) and a function that waits for all of them and returns each item's
        storage requests and bytes (one thread: each image's own; several: the call's total spread evenly, see
        the module's docstring)."""
        n, per_image = len(items), self.engine.config.workers <= 1
        requests, fetched = np.zeros(n, np.int64), np.zeros(n, np.int64)
        r0, b0 = self.counters()

        def counted(j: int, it: WorkItem):
            r, b = self.counters()
            out = fn(it)
            requests[j], fetched[j] = self.store.requests - r, self.store.bytes_read - b
            return out

        futures = [self.pool.submit(counted, j, it) for j, it in enumerate(items)]

        def costs() -> tuple[np.ndarray, np.ndarray]:
            wait(futures)  # failed reads included: their costs were paid too
            if per_image:
                return requests, fetched
            return spread(self.store.requests - r0, n), spread(self.store.bytes_read - b0, n)

        return futures, costs

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The actor's read/decode threads (``config.workers``), started on first use (fused actors use the
        engine's own)."""
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(self.engine.config.workers, thread_name_prefix="dynres-ray-read")
        return self._pool

    def label(self, label: int | None) -> str | None:
        """A backbone class index (a store label mapped through the engine's ``label_map``) as the class name, as
        the local engine writes it (None: unlabelled)."""
        if label is None or label < 0:
            return None
        e = self.engine
        return e.classes[label] if e.classes and label < len(e.classes) else str(label)

    def names(self, indices) -> list[str]:
        classes = self.engine.classes
        return [classes[c] if classes else str(c) for c in indices]


class ScaleActor(_EngineActor):
    """Split layout, stage 1: prefix read + decode at the scale resolution + scale model, for one batch of keys."""

    def __call__(self, batch: dict) -> pa.Table:
        e, t0, start = self.engine, time.time(), time.perf_counter()
        items = [WorkItem(0, str(k), t0) for k in batch["key"]]
        images, costs = self.read_all(e.scale_read, items)
        chosen = [0] * len(items)
        ok: list[int] = []
        with cancelled_on_error(images):
            for first in range(0, len(items), e.config.batch_size):  # the local engine's batches: same logits
                span = range(first, min(first + e.config.batch_size, len(items)))
                part = [span[q] for q in e.readable([items[j].key for j in span], [images[j] for j in span])]
                ok += part
                if part:
                    picks = e.scale.choose(torch.stack([images[j].result() for j in part]), e.config.lam)[0]
                    for j, r in zip(part, picks):
                        chosen[j] = r
            requests, fetched = costs()
        self.log_skipped()
        return pa.table({
            "key": batch["key"], "label": batch["label"],
            "resolution": pa.array(chosen, pa.int32()),
            "scans": pa.array([it.scans for it in items], pa.int32()),
            "prefix": pa.array([it.ahead or it.data for it in items], pa.binary()),  # the longest bytes in hand
            "ahead_scans": pa.array([it.ahead_scans for it in items], pa.int32()),
            "t0": pa.array([t0] * len(items), pa.float64()),
            "requests": pa.array(requests, pa.int32()),
            "bytes_fetched": pa.array(fetched, pa.int64()),
            "scale_actor": pa.array([self.actor] * len(items), pa.string()),
            "scale_ms": pa.array([(time.perf_counter() - start) * 1e3 / len(items)] * len(items), pa.float64()),
        }).take(ok)  # an image that could not be read goes no further


class BackboneActor(_EngineActor):
    """Split layout, stage 2: the missing byte range + decode at the chosen resolution + backbone, batched per
    resolution in the pipeline's batch size (as the local engine does)."""

    def __call__(self, batch: dict) -> pa.Table:
        e, n, start = self.engine, len(batch["key"]), time.perf_counter()
        items = [self._item(batch, j) for j in range(n)]
        groups: dict[int, list[int]] = {}
        for j, it in enumerate(items):
            groups.setdefault(it.resolution, []).append(j)
        order = [j for r in sorted(groups) for j in groups[r]]  # decoded in the order the batches run
        # a longer read fetches only the range the handed-over prefix lacks (the engine holds it first)
        futures, costs = self.read_all(e.backbone_read, [items[j] for j in order])
        images = dict(zip(order, futures))
        good: set[int] = set()
        top_names, top_probs = [None] * n, [None] * n
        done = np.zeros(n)
        requests, fetched = np.zeros(n, np.int64), np.zeros(n, np.int64)
        with cancelled_on_error(futures):
            for r, rows in sorted(groups.items()):
                for first in range(0, len(rows), e.config.batch_size):  # the local engine's per-resolution batches
                    batch_rows = rows[first : first + e.config.batch_size]
                    part = [batch_rows[q] for q in e.readable([items[j].key for j in batch_rows],
                                                              [images[j] for j in batch_rows])]
                    good.update(part)
                    if not part:
                        continue
                    idx, probs = top5(e.backbone(torch.stack([images[j].result() for j in part]), r))
                    done[part] = time.time()
                    for j, i, p in zip(part, idx, probs):
                        top_names[j], top_probs[j] = self.names(i), p
            requests[order], fetched[order] = costs()
        requests += np.asarray(batch.get("requests", np.zeros(n)), np.int64)
        fetched += np.asarray(batch.get("bytes_fetched", np.zeros(n)), np.int64)
        t0 = batch["t0"] if "t0" in batch else np.full(n, items[0].t0 if items else 0.0)
        dynamic = e.scale is not None
        self.log_skipped()
        return pa.table({
            "key": batch["key"],
            "label": [self.label(e.backbone_label(int(y))) for y in batch["label"]],
            "top5_classes": top_names, "top5_probs": top_probs,
            "resolution": [it.resolution for it in items],
            "lam": [e.config.lam if dynamic else None] * n,
            "bytes_read": [it.bytes_read for it in items],
            "file_bytes": [self.store.size(it.key) for it in items],
            "latency_ms": (done - t0) * 1e3, "started_at": t0, "finished_at": done,
            "requests": requests, "bytes_fetched": fetched,
            "scale_actor": batch["scale_actor"] if dynamic else [""] * n,
            "backbone_actor": [self.actor] * n,
            "scale_ms": batch["scale_ms"] if dynamic else np.zeros(n),
            "backbone_ms": np.full(n, (time.perf_counter() - start) * 1e3 / max(n, 1)),
        }, schema=SCHEMA).take(sorted(good))

    def _item(self, batch: dict, j: int) -> WorkItem:
        e, key = self.engine, str(batch["key"][j])
        it = WorkItem(j, key, float(batch["t0"][j]) if "t0" in batch else time.time())
        if e.scale is None:
            it.resolution = e.config.resolution
            return it
        it.resolution, it.scans = int(batch["resolution"][j]), int(batch["scans"][j])
        prefix, ahead = bytes(batch["prefix"][j]), int(batch["ahead_scans"][j])
        it.data = cut_prefix(self.store, key, prefix, it.scans)
        if ahead > it.scans:
            it.ahead, it.ahead_scans = prefix, ahead
        return it


class FusedActor(_EngineActor):
    """Fused layout: the local engine's pipelined loop over one call's keys (scale model, resolution, missing
    bytes, backbone per resolution), its decode threads overlapping the models inside the actor."""

    def __call__(self, batch: dict) -> pa.Table:
        e, start, t0 = self.engine, time.perf_counter(), time.time()
        keys = [str(k) for k in batch["key"]]
        r0, b0 = self.counters()
        result = e.run(keys, progress=False)
        preds, s = result.predictions, result.summary
        done, n = time.time(), len(preds)  # the engine skipped (and named) any image it could not read
        self.log_skipped()
        call_ms = (time.perf_counter() - start) * 1e3 / max(n, 1)
        dynamic = e.scale is not None
        scale_ms = call_ms * s["scale_overhead"] if dynamic else 0.0  # the engine's split of the call's work
        return pa.table({
            "key": [p.key for p in preds], "label": [self.label(p.label) for p in preds],
            "top5_classes": [self.names(p.top5) for p in preds], "top5_probs": [p.top5_probs for p in preds],
            "resolution": [p.resolution for p in preds], "lam": [p.lam for p in preds],
            "bytes_read": [p.bytes_read for p in preds], "file_bytes": [p.file_bytes for p in preds],
            "latency_ms": [p.latency_ms for p in preds], "started_at": np.full(n, t0),
            "finished_at": np.full(n, done),
            "requests": spread(self.store.requests - r0, n), "bytes_fetched": spread(self.store.bytes_read - b0, n),
            "scale_actor": [self.actor if dynamic else ""] * n, "backbone_actor": [self.actor] * n,
            "scale_ms": np.full(n, scale_ms), "backbone_ms": np.full(n, call_ms - scale_ms),
        }, schema=SCHEMA)
