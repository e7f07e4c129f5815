"""`dynres infer --engine ray`: the same pipeline on Ray Data, in autoscaling actor pools.

Two layouts (:class:`RayConfig` ``layout``, the actors in :mod:`dynres.runtime.ray_actors`). **Fused** (the
default on CPUs): one pool whose actors run the local engine's whole pipelined loop on each call's keys, decode
threads overlapping the scale model and the backbone, nothing handed between actors. **Split** (the default where
the backbone gets GPUs): a scale pool (read the scale prefix, decode, scale model, choose the resolution) feeding a
backbone pool (fetch only the missing bytes: the prefix travels with the row and seeds the actor's store; decode at
the chosen resolution; backbone per resolution in batches of the pipeline's batch size). Every actor rebuilds its
engine from the :class:`~dynres.runtime.engine.EngineSpec` (paths or fsspec URLs, S3 included) and calls the very
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

from dynres.errors import ConfigError, StoreError
from dynres.runtime.engine import EngineSpec, InferenceResult
from dynres.runtime.ray_actors import BackboneActor, FusedActor, ScaleActor
from dynres.runtime.ray_output import prepare_output, summarize_output

# The manifest read and the Parquet writes are light I/O tasks: they ask for a small CPU share, and the actor
# pools leave IO_RESERVE_CPUS of the cluster unreserved for them (pools holding every CPU stall the job: the
# writes never get scheduled).
IO_TASK_CPUS = 0.1
IO_RESERVE_CPUS = 0.5
ACTOR_START_TIMEOUT_S = 600  # how long a pool may take to start its min_size actors before the job fails
LAYOUTS = ("auto", "fused", "split")


@dataclass(frozen=True)
class RayConfig:
    """How the Ray engine sizes its pools. ``scale_actors`` / ``backbone_actors``: a fixed pool size, or None to
    autoscale between 1 and the cluster's CPUs (the backbone: its GPUs / ``num_gpus`` where ``num_gpus`` > 0).
    ``cpus_per_actor`` None: the cluster's CPUs, less a reserve for the I/O tasks, shared by the largest pools (at
    most 1 each), so both stages at their largest fit the cluster at once (fused: shared by its one pool's largest
    size, not capped at 1); never more than the largest node has. Each actor runs torch on as many threads as the
    CPUs it holds, rounded (at least one). ``batch_size`` rows go to an actor per call: the backbone runs them per
    resolution in batches of the pipeline's ``batch_size``; larger calls amortize Ray's per-call cost, the fused
    pipeline's fill and drain and the partial per-resolution batches each call ends with (docs/bench-ray.md).
    ``address``: a cluster (None: a local Ray on ``num_cpus`` CPUs, None: every core).

    ``layout``: ``fused``, one pool whose actors run the local engine's whole pipelined loop on each call (its
    decode threads overlapping both models, nothing handed between actors; its size is ``backbone_actors``, its
    ceiling the cluster's CPUs, or GPUs / ``num_gpus``), or ``split``, a pool per stage (for backbone actors that
    need other resources than the scale model's); ``auto``: fused (faster: docs/bench-ray.md). ``num_gpus``
    reserves GPUs for the backbone actors; the runners themselves run on the CPU today.

    ``worker_niceness``: how much Ray lowers its worker processes' CPU priority below the driver's (None: Ray's
    default, 15, which keeps its daemons responsive but lets every other process on the machine, and Ray's own
    driver loop, preempt the actors that do the work; 0: the actors run at the priority the local engine runs at).
    Set for every worker of a local Ray started here, and for the pools' actors on any cluster."""

    layout: str = "auto"
    scale_actors: int | None = None
    backbone_actors: int | None = None
    num_gpus: float = 0.0  # per backbone actor
    cpus_per_actor: float | None = None
    batch_size: int = 256
    address: str | None = None
    num_cpus: int | None = None
    worker_niceness: int | None = 0

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError("ray", f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.scale_actors is not None and self.layout != "split":  # a setting that would silently do nothing
            raise ConfigError("ray", f"scale_actors sizes the split layout's scale pool; the {self.layout} layout "
                                     "has one pool, sized by backbone_actors (--actors): use layout split or drop it")
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
        if self.worker_niceness is not None and not 0 <= self.worker_niceness <= 19:
            raise ConfigError("ray", f"worker_niceness must be in 0..19 (None: Ray's), got {self.worker_niceness}")


def plan_pools(cfg: RayConfig, resources: dict[str, float], torch_threads: int = 0,
               node_cpus: float | None = None) -> dict:
    """The effective pool sizes (min, max), CPUs and GPUs per actor and torch threads per actor on a cluster with
    ``resources`` (``ray.cluster_resources()``) whose largest node has ``node_cpus`` (None: one node); an actor
    never asks for more than that node has, or it could never be placed.
    ``torch_threads`` > 0 (the pipeline's setting) wins."""
    cpus = max(1.0, float(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    per_node = node_cpus or cpus  # the cluster-wide I/O reserve is left by the shares below

    def pool(fixed: int | None, ceiling: float) -> tuple[int, int]:
        return (fixed, fixed) if fixed else (1, max(1, int(ceiling)))

    on_gpu = cfg.num_gpus > 0 and gpus > 0
    # auto: fused. The runners run on CPU (a GPU is reserved, not yet used), where one fused pool is faster
    layout = "fused" if cfg.layout == "auto" else cfg.layout
    backbone = pool(cfg.backbone_actors, gpus / cfg.num_gpus if on_gpu else cpus)
    if layout == "fused":  # a fused actor's decode threads and models want more than one core: no cap at 1
        scale, share = None, cfg.cpus_per_actor or min(per_node, (cpus - IO_RESERVE_CPUS) / backbone[1])
    else:  # both pools at their largest fit the cluster at once (GPU backbone actors hold CPUs too)
        scale = pool(cfg.scale_actors, cpus)
        share = cfg.cpus_per_actor or min(1.0, per_node, (cpus - IO_RESERVE_CPUS) / (scale[1] + backbone[1]))
    return {"layout": layout, "scale_actors": scale and list(scale), "backbone_actors": list(backbone),
            "cpus_per_actor": share, "gpus_per_backbone_actor": cfg.num_gpus if on_gpu else 0.0,
            "torch_threads": torch_threads or max(1, int(share + 0.5)), "worker_niceness": cfg.worker_niceness,
            "cluster_cpus": cpus, "cluster_gpus": gpus}


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
        # RAY_ADDRESS (e.g. under `ray job submit`) names a cluster as --address does: no local Ray's settings
        address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        kwargs = {} if address else {"num_cpus": cfg.num_cpus, "object_store_memory": 256 << 20}
        if not address and cfg.worker_niceness is not None:  # every worker process of a local Ray
            kwargs["_system_config"] = {"worker_niceness": cfg.worker_niceness}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 **kwargs)
    return ray


def _map_stages(ds, spec: EngineSpec, plan: dict, batch_size: int, dynamic: bool):
    """The actor pools of ``plan``'s layout over ``ds``: one fused pool, or a scale pool then a backbone pool."""
    from ray.data import ActorPoolStrategy

    def pool(sizes: list[int]) -> ActorPoolStrategy:
        return ActorPoolStrategy(min_size=sizes[0], max_size=sizes[1])

    stage = {"fn_constructor_args": (spec, plan["torch_threads"]), "batch_size": batch_size,
             "batch_format": "numpy", "num_cpus": plan["cpus_per_actor"]}
    if plan["worker_niceness"] is not None:  # the actors' process priority, on a cluster Ray did not start here too
        stage["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(plan["worker_niceness"])}}
    backbone = {**stage, "num_gpus": plan["gpus_per_backbone_actor"]} if plan["gpus_per_backbone_actor"] else stage
    if plan["layout"] == "fused":
        return ds.map_batches(FusedActor, compute=pool(plan["backbone_actors"]), **backbone)
    if dynamic:
        ds = ds.map_batches(ScaleActor, compute=pool(plan["scale_actors"]), **stage)
    return ds.map_batches(BackboneActor, compute=pool(plan["backbone_actors"]), **backbone)


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
    nodes = [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    plan = plan_pools(cfg, ray.cluster_resources(), spec.config.torch_threads, max(nodes, default=None))
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
    expected = ds.count()
    ds = _map_stages(ds, spec, plan, cfg.batch_size, dynamic)
    ds.write_parquet(out_path, filesystem=out_fs, ray_remote_args={"num_cpus": IO_TASK_CPUS})
    wall = time.perf_counter() - start
    summary = summarize_output(str(output), wall, spec.config.lam if dynamic else None)
    summary.update(mode="dynamic" if dynamic else "static", engine="ray", output=str(output),
                   ray={**asdict(cfg), **plan})
    # images the actors could not read or decode were skipped; their keys are in the actors' log lines
    summary["failed"] = expected - summary["images"]
    return InferenceResult([], summary, meta.classes)
