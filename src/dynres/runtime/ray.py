"""`dynres infer --engine ray`: the same pipeline on Ray Data, one actor pool per stage.

Stage 1 (scale actors): read the scale prefix, decode at the scale resolution, run the scale model, choose the
resolution. Stage 2 (backbone actors): fetch only the missing bytes (the prefix travels with the row), decode at the
chosen resolution, run the backbone per resolution. Every actor rebuilds its engine from the
:class:`~dynres.runtime.engine.EngineSpec` (paths or fsspec URLs, S3 included), and calls the very functions the local
engine calls, so results are identical. On one machine Ray starts locally; give ``address`` for a cluster.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch

from dynres.errors import ConfigError
from dynres.runtime.engine import TOPK, EngineSpec, InferenceResult, Prediction, WorkItem, build_engine, summarize, top5


class _EngineActor:
    """An actor that rebuilds the engine from its spec, with the thread count the spec asks for."""

    def __init__(self, spec: EngineSpec):
        torch.set_num_threads(max(1, spec.config.torch_threads or 1))
        self.engine = build_engine(spec)


class ScaleActor(_EngineActor):
    """Stage 1: prefix read + decode at the scale resolution + scale model, for one batch of keys."""

    def __call__(self, batch: dict) -> dict:
        e = self.engine
        items = [WorkItem(int(i), str(k), float(t)) for i, k, t in zip(batch["index"], batch["key"], batch["t0"])]
        images = torch.stack([e.scale_read(it) for it in items])
        chosen, _ = e.scale.choose(images, e.config.lam)
        return {**batch, "resolution": np.array(chosen, np.int64), "scans": np.array([it.scans for it in items]),
                "prefix": np.array([it.data for it in items], dtype=object)}


class BackboneActor(_EngineActor):
    """Stage 2: the missing byte range + decode at the chosen resolution + backbone, batched per resolution."""

    def __call__(self, batch: dict) -> dict:
        e = self.engine
        n = len(batch["key"])
        static = "resolution" not in batch
        groups: dict[int, list[int]] = defaultdict(list)
        items = []
        for j in range(n):
            it = WorkItem(int(batch["index"][j]), str(batch["key"][j]), float(batch["t0"][j]))
            if static:
                it.resolution = e.config.resolution
            else:
                it.resolution, it.scans, it.data = int(batch["resolution"][j]), int(batch["scans"][j]), batch["prefix"][j]
            items.append(it)
            groups[it.resolution].append(j)
        k = min(TOPK, len(e.classes)) if e.classes else TOPK
        idx, probs, bytes_read = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), np.zeros(n, np.int64)
        for r, rows in groups.items():
            images = torch.stack([e.backbone_read(items[j]) for j in rows])
            i, p = top5(e.backbone(images, r))
            idx[rows], probs[rows] = np.array(i)[:, :k], np.array(p)[:, :k]
            bytes_read[rows] = [items[j].bytes_read for j in rows]
        done = time.time()
        return {"index": batch["index"], "key": batch["key"], "top5": idx, "top5_probs": probs,
                "resolution": np.array([it.resolution for it in items], np.int64), "bytes_read": bytes_read,
                "latency_ms": (done - batch["t0"]) * 1e3}


def run_ray(spec: EngineSpec, keys: list[str] | None = None, *, limit: int | None = None, address: str | None = None,
            actors: int = 1, num_cpus: int | None = None, progress: bool = True) -> InferenceResult:
    """Run the pipeline on Ray Data and return the same :class:`InferenceResult` the local engine returns."""
    try:
        import ray
        from ray.data import ActorPoolStrategy
    except ImportError:
        raise ConfigError("ray", "Ray is not installed (pip install 'dynres[ray]')") from None

    driver = build_engine(spec)  # keys, labels, sizes and classes; also checks the spec before Ray starts
    if driver.store is None:
        raise ConfigError("ray", "the Ray engine needs a store")
    keys = list(driver.store.keys if keys is None else keys)[:limit]
    if not ray.is_initialized():
        kwargs = {} if address else {"num_cpus": num_cpus, "object_store_memory": 256 << 20}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    B = spec.config.batch_size
    start = time.perf_counter()
    t0 = time.time()
    ds = ray.data.from_items([{"index": i, "key": k, "t0": t0} for i, k in enumerate(keys)])
    if driver.scale is not None:
        ds = ds.map_batches(ScaleActor, fn_constructor_args=(spec,), batch_size=B, batch_format="numpy",
                            compute=ActorPoolStrategy(min_size=1, max_size=actors))
    ds = ds.map_batches(BackboneActor, fn_constructor_args=(spec,), batch_size=B, batch_format="numpy",
                        compute=ActorPoolStrategy(min_size=1, max_size=actors))
    rows = sorted(ds.take_all(), key=lambda r: int(r["index"]))
    wall = time.perf_counter() - start
    store = driver.store
    preds = []
    for r in rows:
        key = str(r["key"])
        label = store.label(key)
        label = driver.label_map.get(label, label) if label is not None and label >= 0 else None
        preds.append(Prediction(key, label, [int(x) for x in r["top5"]], [float(x) for x in r["top5_probs"]],
                                int(r["resolution"]), int(r["bytes_read"]), store.size(key), float(r["latency_ms"]),
                                spec.config.lam if driver.scale is not None else None))
    summary = summarize(preds, wall, sum(p.bytes_read for p in preds), {})
    summary["mode"] = "dynamic" if driver.scale is not None else "static"
    summary["engine"] = "ray"
    return InferenceResult(preds, summary, driver.classes)
