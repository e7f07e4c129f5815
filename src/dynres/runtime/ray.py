"""`dynres infer --engine ray`: the same pipeline on Ray Data, one autoscaling actor pool per stage.

Stage 1 (scale actors): read the scale prefix, decode at the scale resolution, run the scale model, choose the
resolution. Stage 2 (backbone actors): fetch only the missing bytes (the prefix travels with the row and seeds the
actor's store, so only the range it lacks is requested), decode at the chosen resolution, run the backbone batched
per resolution in batches of the pipeline's batch size, as the local engine does. Every actor rebuilds its engine
from the :class:`~dynres.runtime.engine.EngineSpec` (paths or fsspec URLs, S3 included) and calls the very
functions the local engine calls, so predictions are identical.

Nothing scales with the number of images on the driver: the keys are read from the store's manifest by Ray Data's
Parquet reader, the predictions are written by Ray Data's Parquet writer to any fsspec URI, and the summary is
computed from the written files (:mod:`dynres.runtime.ray_output`). Each row records the storage requests and bytes
it cost and the actor (node id : pid) of each stage.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from dynres.errors import ConfigError, StoreError
from dynres.runtime.engine import EngineSpec, InferenceResult, WorkItem, build_engine, cut_prefix, top5
from dynres.runtime.ray_output import SCHEMA, prepare_output, summarize_output

# The manifest read and the Parquet writes are light I/O tasks: they ask for a small CPU share, and the actor
# pools leave IO_RESERVE_CPUS of the cluster unreserved for them (pools holding every CPU stall the job: the
# writes never get scheduled).
IO_TASK_CPUS = 0.1
IO_RESERVE_CPUS = 0.5
ACTOR_START_TIMEOUT_S = 600  # how long a pool may take to start its min_size actors before the job fails


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine sizes its pools. ``scale_actors`` / ``backbone_actors``: a fixed pool size, or None to
    autoscale between 1 and the cluster's CPUs (the backbone: its GPUs / ``num_gpus`` where ``num_gpus`` > 0).
    ``cpus_per_actor`` None: the cluster's CPUs, less a reserve for the I/O tasks, shared by the largest pools (at
    most 1 each), so both stages at their largest fit the cluster at once. Each actor runs torch on as many threads
    as the CPUs it holds (at least one). ``batch_size`` rows go to an actor per call: the backbone runs them per
    resolution in batches of the pipeline's ``batch_size``; larger calls amortize Ray's per-call cost.
    ``address``: a cluster (None: a local Ray on ``num_cpus`` CPUs, None: every core)."""

    scale_actors: int | None = None
    backbone_actors: int | None = None
    num_gpus: float = 0.0  # per backbone actor
    cpus_per_actor: float | None = None
    batch_size: int = 64
    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("scale_actors", "backbone_actors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError("ray", f"{name} must be >= 1 (or None to autoscale), got {value}")
        if self.num_gpus < 0:
            raise ConfigError("ray", f"num_gpus must be >= 0, got {self.num_gpus}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ConfigError("ray", f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.batch_size < 1:
            raise ConfigError("ray", f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("ray", f"num_cpus must be >= 1, got {self.num_cpus}")


def plan_pools(cfg: RayConfig, resources: dict[str, float], torch_threads: int = 0) -> dict:
    """The effective pool sizes (min, max), CPUs and GPUs per actor and torch threads per actor on a cluster with
    ``resources`` (``ray.cluster_resources()``); ``torch_threads`` > 0 (the pipeline's setting) wins."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))

    def pool(fixed: int | None, ceiling: float) -> tuple[int, int]:
        return (fixed, fixed) if fixed else (1, max(1, int(ceiling)))

    scale = pool(cfg.scale_actors, cpus)
    on_gpu = cfg.num_gpus > 0 and gpus > 0
    backbone = pool(cfg.backbone_actors, gpus / cfg.num_gpus if on_gpu else cpus)
    share = cfg.cpus_per_actor or min(1.0, (cpus - IO_RESERVE_CPUS) / (scale[1] + (0 if on_gpu else backbone[1])))
    return {"scale_actors": list(scale), "backbone_actors": list(backbone), "cpus_per_actor": share,
            "gpus_per_backbone_actor": cfg.num_gpus if on_gpu else 0.0,
            "torch_threads": torch_threads or max(1, int(share)), "cluster_cpus": cpus, "cluster_gpus": gpus}


def _actor_id() -> str:
    import ray

    return f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"


class _EngineActor:
    """An actor that rebuilds the engine from its spec, running torch on ``threads`` threads."""

    def __init__(self, spec: EngineSpec, threads: int):
        torch.set_num_threads(threads)
        self.engine = build_engine(spec)
        self.store = self.engine.store
        self.actor = _actor_id()

    def counted(self, fn, item: WorkItem) -> tuple[torch.Tensor, int, int]:
        """``fn(item)`` and the storage requests and bytes it cost (an actor reads one image at a time)."""
        r0, b0 = self.store.requests, self.store.bytes_read
        out = fn(item)
        return out, self.store.requests - r0, self.store.bytes_read - b0


class ScaleActor(_EngineActor):
    """Stage 1: prefix read + decode at the scale resolution + scale model, for one batch of keys."""

    def __call__(self, batch: dict) -> pa.Table:
        e, t0, start = self.engine, time.time(), time.perf_counter()
        items = [WorkItem(0, str(k), t0) for k in batch["key"]]
        counted = [self.counted(e.scale_read, it) for it in items]
        chosen, _ = e.scale.choose(torch.stack([c[0] for c in counted]), e.config.lam)
        return pa.table({
            "key": batch["key"], "label": batch["label"],
            "resolution": pa.array(chosen, pa.int32()),
            "scans": pa.array([it.scans for it in items], pa.int32()),
            "prefix": pa.array([it.ahead or it.data for it in items], pa.binary()),  # the longest bytes in hand
            "ahead_scans": pa.array([it.ahead_scans for it in items], pa.int32()),
            "t0": pa.array([t0] * len(items), pa.float64()),
            "requests": pa.array([c[1] for c in counted], pa.int32()),
            "bytes_fetched": pa.array([c[2] for c in counted], pa.int64()),
            "scale_actor": pa.array([self.actor] * len(items), pa.string()),
            "scale_ms": pa.array([(time.perf_counter() - start) * 1e3 / len(items)] * len(items), pa.float64()),
        })


class BackboneActor(_EngineActor):
    """Stage 2: the missing byte range + decode at the chosen resolution + backbone, batched per resolution."""

    def __call__(self, batch: dict) -> pa.Table:
        e, n, start = self.engine, len(batch["key"]), time.perf_counter()
        items = [self._item(batch, j) for j in range(n)]
        requests = np.asarray(batch.get("requests", np.zeros(n)), np.int64).copy()
        fetched = np.asarray(batch.get("bytes_fetched", np.zeros(n)), np.int64).copy()
        groups: dict[int, list[int]] = {}
        for j, it in enumerate(items):
            groups.setdefault(it.resolution, []).append(j)
        names = e.classes
        top_names, top_probs = [None] * n, [None] * n
        done = np.zeros(n)
        for r, rows in sorted(groups.items()):
            for first in range(0, len(rows), e.config.batch_size):  # the local engine's per-resolution batches
                part = rows[first : first + e.config.batch_size]
                images = []
                for j in part:
                    image, requests_j, bytes_j = self.counted(e.backbone_read, items[j])
                    images.append(image)
                    requests[j] += requests_j
                    fetched[j] += bytes_j
                idx, probs = top5(e.backbone(torch.stack(images), r))
                done[part] = time.time()
                for j, i, p in zip(part, idx, probs):
                    top_names[j] = [names[c] if names else str(c) for c in i]
                    top_probs[j] = p
        t0 = batch["t0"] if "t0" in batch else np.full(n, items[0].t0 if items else 0.0)
        dynamic = e.scale is not None
        return pa.table({
            "key": batch["key"], "label": [self._label(int(y)) for y in batch["label"]],
            "top5_classes": top_names, "top5_probs": top_probs,
            "resolution": [it.resolution for it in items],
            "lam": [e.config.lam if dynamic else None] * n,
            "bytes_read": [it.bytes_read for it in items],
            "file_bytes": [self.store.size(it.key) for it in items],
            "latency_ms": (done - t0) * 1e3, "finished_at": done, "requests": requests, "bytes_fetched": fetched,
            "scale_actor": batch["scale_actor"] if dynamic else [""] * n,
            "backbone_actor": [self.actor] * n,
            "scale_ms": batch["scale_ms"] if dynamic else np.zeros(n),
            "backbone_ms": np.full(n, (time.perf_counter() - start) * 1e3 / max(n, 1)),
        }, schema=SCHEMA)

    def _item(self, batch: dict, j: int) -> WorkItem:
        e, key = self.engine, str(batch["key"][j])
        it = WorkItem(j, key, float(batch["t0"][j]) if "t0" in batch else time.time())
        if e.scale is None:
            it.resolution = e.config.resolution
            return it
        it.resolution, it.scans = int(batch["resolution"][j]), int(batch["scans"][j])
        prefix, ahead = bytes(batch["prefix"][j]), int(batch["ahead_scans"][j])
        self.store.hold(key, prefix)  # so a longer read fetches only the range this prefix lacks
        it.data = cut_prefix(self.store, key, prefix, it.scans)
        if ahead > it.scans:
            it.ahead, it.ahead_scans = prefix, ahead
        return it

    def _label(self, label: int) -> str | None:
        """The store's label as the backbone's class name (as the local engine's Parquet writes it)."""
        if label < 0:
            return None
        e = self.engine
        mapped = e.label_map.get(label, label)
        return e.classes[mapped] if e.classes and mapped < len(e.classes) else str(mapped)


def manifest_source(store: str) -> tuple[str, object | None]:
    """The manifest of the store at ``store`` as a (path, pyarrow filesystem) for Ray Data's Parquet reader."""
    from dynres.io.format import MANIFEST
    from dynres.runtime.ray_output import output_target

    fs, root = output_target(store)
    path = f"{root.rstrip('/')}/{MANIFEST}"
    from pyarrow.fs import FileType

    if fs.get_file_info(path).type != FileType.File:
        raise StoreError(f"{store}/{MANIFEST}", "no manifest: not a store, or its ingest did not finish")
    return path, fs


def _start_ray(cfg: RayConfig):
    try:
        import ray
    except ImportError:
        raise ConfigError("ray", "Ray is not installed (pip install 'dynres[ray]')") from None
    if not ray.is_initialized():
        kwargs = {} if cfg.address else {"num_cpus": cfg.num_cpus, "object_store_memory": 256 << 20}
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 **kwargs)
    return ray


def run_ray(spec: EngineSpec, output: str | Path, cfg: RayConfig = RayConfig(), *, limit: int | None = None,
            progress: bool = True) -> InferenceResult:
    """Run the pipeline on Ray Data, write one Parquet row per image under ``output`` (a directory: local path or
    fsspec URI) and return the summary computed from those files (``predictions`` stays empty: read the output)."""
    from dynres.model.checkpoint import read_meta

    meta = read_meta(spec.backbone)  # checks the checkpoints and the store before Ray starts
    dynamic = spec.config.resolution is None
    if dynamic and spec.scale is None:
        raise ConfigError("pipeline", "give a scale model (dynamic mode) or a static resolution")
    if dynamic:
        read_meta(spec.scale)
    manifest, manifest_fs = manifest_source(spec.store)
    out_fs, out_path = prepare_output(str(output))
    ray = _start_ray(cfg)
    from ray.data import ActorPoolStrategy

    plan = plan_pools(cfg, ray.cluster_resources(), spec.config.torch_threads)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # a pool's first batch waits for its min_size actors: on a short job the first actor to load its models would
    # otherwise take every batch (and a fixed pool's rate would be one actor's)
    ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    start = time.perf_counter()
    ds = ray.data.read_parquet(manifest, filesystem=manifest_fs, num_cpus=IO_TASK_CPUS).select_columns(["key", "label"])
    if limit:
        ds = ds.limit(limit)
    # one block per actor call, so every actor of a pool gets work (a manifest is one file: one block); into the
    # object store before the pools start: Ray Data's file listing asks for a whole CPU, which pools sized to the
    # cluster would hold (the blocks live in the cluster; the driver keeps their references)
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size).materialize()
    stage = dict(fn_constructor_args=(spec, plan["torch_threads"]), batch_size=cfg.batch_size,
                 batch_format="numpy", num_cpus=plan["cpus_per_actor"])
    if dynamic:
        ds = ds.map_batches(ScaleActor, compute=ActorPoolStrategy(min_size=plan["scale_actors"][0],
                                                                  max_size=plan["scale_actors"][1]), **stage)
    ds = ds.map_batches(BackboneActor, compute=ActorPoolStrategy(min_size=plan["backbone_actors"][0],
                                                                 max_size=plan["backbone_actors"][1]),
                        **({**stage, "num_gpus": plan["gpus_per_backbone_actor"]} if plan["gpus_per_backbone_actor"]
                           else stage))
    ds.write_parquet(out_path, filesystem=out_fs, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    wall = time.perf_counter() - start
    summary = summarize_output(str(output), wall, spec.config.lam if dynamic else None)
    summary.update(mode="dynamic" if dynamic else "static", engine="ray", output=str(output),
                   ray={**asdict(cfg), **plan})
    return InferenceResult([], summary, meta.classes)
