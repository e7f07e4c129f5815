"""``dynres infer`` (batch inference), ``dynres serve`` (the HTTP service) and ``dynres tune`` (kernels per
resolution); the tuning flags are shared with ``dynres bench kernels``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.cli.options import join, parse_list, parse_pairs, path_text, span
from dynres.model.nets import IMAGENET_CLASSES
from dynres.runtime.backends import BACKENDS
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.kernels import TuneConfig, default_backends
from dynres.runtime.ray import RayConfig
from dynres.runtime.serve import ServeConfig

DECODE_ONCE_FLAGS = ("--decode-once/--exact-views",)
BIAS_HELP = ("Dynamic: the choice rule's bias, one value per scale-model grid resolution, added to p(r) "
             "(argmax p + b - λ·cost; the study's serving.json gives it). Default: none.")
RECAL_HELP = ("Dynamic: p(r) = σ(a·logit + c) per grid resolution, as 'a,c;a,c;...' (the study's serving.json "
              "gives it: the scale model recalibrated to the backbone). Default: the scale model's own p(r).")


def infer(
    store: str = typer.Argument(..., help="Store directory or fsspec URL (s3://, http://, ...)."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint (model.pt + model.json, or its dir)."),
    scale: Optional[Path] = typer.Option(None, "--scale", help="Scale-model checkpoint (dynamic mode)."),
    out: Path = typer.Option(Path("preds.parquet"), "--out", help="Predictions Parquet; summary beside it."),
    resolution: Optional[int] = typer.Option(PipelineConfig.resolution, "--resolution",
                                             help="Static mode at this resolution."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy (`dynres calibrate`)."),
    kernels: str = typer.Option(EngineSpec.kernels, help="eager, or tuned (the cached winners of `dynres tune`)."),
    lam: float = typer.Option(PipelineConfig.lam, "--lambda",
                              help="Cost weight λ of the cost-aware choice (0: argmax p)."),
    bias: str = typer.Option("", "--bias", help=BIAS_HELP),
    recalibration: str = typer.Option("", "--recalibration", help=RECAL_HELP),
    baseline: bool = typer.Option(PipelineConfig.baseline,
                                  help="The common baseline: full read + full decode (needs --resolution)."),
    read_ahead: bool = typer.Option(PipelineConfig.read_ahead,
                                    help="Dynamic: read up front the longest prefix any resolution needs "
                                    "(one read + one decode per image; more bytes, less CPU)."),
    decode_once: bool = typer.Option(PipelineConfig.decode_once, *DECODE_ONCE_FLAGS,
                                     help="Dynamic: resize every view from one decode per prefix, or decode each "
                                     "view at its own DCT scale (pixel-identical to `dynres eval`; two decodes)."),
    fetch_ahead: bool = typer.Option(PipelineConfig.fetch_ahead,
                                     help="Dynamic: fetch the backbone's likely bytes in the scale prefix's request "
                                     "(one request per image on object stores; same predictions)."),
    fetch_ahead_resolution: Optional[int] = typer.Option(
        PipelineConfig.fetch_ahead_resolution, help="Fetch ahead the prefix this resolution needs (default: the "
        "longest the policy gives any grid resolution, so no second request)."),
    batch_size: int = typer.Option(PipelineConfig.batch_size,
                                   help="Images per scale-model batch and per backbone batch."),
    workers: int = typer.Option(PipelineConfig.workers, help="Read/decode threads."),
    threads: int = typer.Option(PipelineConfig.torch_threads,
                                help="torch threads for the models (0: torch's default)."),
    crop_side: float = typer.Option(PipelineConfig.crop_side, "--crop", help="Center-crop side ratio."),
    limit: int = typer.Option(0, min=0, help="Only the first N images (0: all)."),
    engine: str = typer.Option("local", help="local, or ray (Ray Data actor pools: see --ray-layout)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
    actors: Optional[int] = typer.Option(None, "--actors", help="Ray: actors per pool, fused or each stage's "
                                         "(default: autoscale from 1 to the cluster's CPUs, GPUs with --num-gpus)."),
    scale_actors: Optional[int] = typer.Option(None, "--scale-actors", help="Ray, split layout: scale-model "
                                               "actors (default: --actors)."),
    num_gpus: float = typer.Option(RayConfig.num_gpus, "--num-gpus", help="Ray: GPUs per backbone actor."),
    ray_batch: int = typer.Option(RayConfig.batch_size, "--ray-batch", help="Ray: images per actor call."),
    ray_layout: str = typer.Option(RayConfig.layout, "--ray-layout", help="Ray: fused (one pool running both models, "
                                   "decode threads overlapping them), split (a pool per stage) or auto (fused)."),
    ray_niceness: Optional[int] = typer.Option(RayConfig.worker_niceness, "--ray-niceness", help="Ray: how far "
                                               "below the driver's the actors' CPU priority is (Ray's own is 15)."),
    output: Optional[str] = typer.Option(None, "--output", help="Ray: the predictions' Parquet directory, a path "
                                         "or fsspec URI (default: --out, as a directory)."),
) -> None:
    """Batch inference over a store: scale model → resolution → missing bytes → backbone, pipelined."""
    from dynres.runtime.infer import run_inference, write_inference

    cfg = PipelineConfig(batch_size=batch_size, workers=workers, torch_threads=threads, crop_side=crop_side,
                         resolution=resolution, lam=lam, baseline=baseline, read_ahead=read_ahead,
                         decode_once=decode_once, fetch_ahead=fetch_ahead,
                         fetch_ahead_resolution=fetch_ahead_resolution, bias=parse_list(bias, float, "--bias"),
                         recalibration=parse_pairs(recalibration, "--recalibration"))
    spec = EngineSpec(store, str(model), path_text(scale), path_text(policy), kernels, cfg)
    split = ray_layout == "split"  # --scale-actors on another layout: RayConfig refuses it by name
    ray_cfg = None if engine != "ray" else RayConfig(
        scale_actors=(scale_actors or actors) if split else scale_actors, backbone_actors=actors, num_gpus=num_gpus,
        batch_size=ray_batch, address=address, layout=ray_layout, worker_niceness=ray_niceness)
    result = run_inference(spec, engine, limit=limit or None, ray=ray_cfg, output=output or str(out))
    write_inference(result, spec, out)
    s = result.summary
    acc = f", top-1 {s['accuracy']:.2f}%" if s.get("accuracy") is not None else ""
    console.print(f"{s['images']} images in {s['seconds']:.1f} s = {s['images_per_s']:.1f} images/s{acc}; "
                  f"read {s['read_fraction']:.1%} of the bytes; p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; "
                  f"resolutions {s['resolution_histogram']}")
    if s.get("requests_per_image") is not None:
        console.print(f"{s['requests_per_image']:.2f} storage requests and {s['bytes_per_image']:.0f} bytes per image")
    if s.get("failed"):
        where = (f"the first: {s['failures'][0]['key']}: {s['failures'][0]['error']}; the first 1,000 are listed "
                 f"under \"failures\" in {out.with_suffix('.json')}" if s.get("failures")
                 else "each is named in the Ray workers' log")
        console.print(f"{s['failed']} images could not be read or decoded and were skipped ({where})")
    console.print(f"wrote {s.get('output', out)} and {out.with_suffix('.json')}")


def serve(
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Optional[Path] = typer.Option(None, "--scale", help="Scale-model checkpoint (dynamic mode)."),
    store: Optional[str] = typer.Option(None, "--store", help="Store for POST /predict/key requests."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy for store keys."),
    resolution: Optional[int] = typer.Option(ServeConfig.resolution, "--resolution",
                                             help="Static mode at this resolution."),
    kernels: str = typer.Option(EngineSpec.kernels, help="eager or tuned."),
    crop_side: float = typer.Option(ServeConfig.crop_side, "--crop", help="Center-crop side ratio."),
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="Port."),
    max_batch: int = typer.Option(ServeConfig.max_batch, help="Largest batch per model call."),
    max_wait_ms: float = typer.Option(ServeConfig.max_wait_ms, help="Longest wait to fill a batch."),
    max_queue: int = typer.Option(ServeConfig.max_queue, help="Requests in flight before answering 503."),
    lam: float = typer.Option(ServeConfig.lam, "--lambda", help="Cost weight λ (the floor, when load-adaptive)."),
    bias: str = typer.Option("", "--bias", help=BIAS_HELP),
    recalibration: str = typer.Option("", "--recalibration", help=RECAL_HELP),
    latency_target_ms: Optional[float] = typer.Option(ServeConfig.latency_target_ms,
                                                      help="Shed (503) requests predicted to miss this."),
    adaptive: bool = typer.Option(ServeConfig.adaptive, help="Load-adaptive λ: raise it while queueing delay grows."),
    lam_max: float = typer.Option(ServeConfig.lam_max, "--lambda-max",
                                  help="The load-adaptive λ's ceiling (the most accuracy it may trade; "
                                  "`dynres eval dynamic` shows what each λ costs)."),
    decode_once: bool = typer.Option(ServeConfig.decode_once, *DECODE_ONCE_FLAGS,
                                     help="Resize every view from one decode per prefix, or decode each view."),
    threads: int = typer.Option(PipelineConfig.torch_threads, help="torch threads (0: torch's default)."),
    workers: int = typer.Option(ServeConfig.workers, help="Read + decode threads."),
) -> None:
    """The pipeline as an HTTP service: POST /predict (upload) or /predict/key; /healthz, /metrics, /docs."""
    from dynres.runtime.serve import run_server

    if store is None and scale is None and resolution is None:
        raise typer.BadParameter("give --scale (dynamic) or --resolution (static)")
    spec = EngineSpec(store or "", str(model), path_text(scale), path_text(policy), kernels,
                      PipelineConfig(batch_size=max_batch, torch_threads=threads, resolution=resolution,
                                     crop_side=crop_side, bias=parse_list(bias, float, "--bias"),
                                     recalibration=parse_pairs(recalibration, "--recalibration")))
    cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, resolution=resolution,
                      lam=lam, latency_target_ms=latency_target_ms, adaptive=adaptive, lam_max=lam_max,
                      decode_once=decode_once, workers=workers, crop_side=crop_side)
    run_server(spec, cfg, host, port)


# --- kernels: resolution-specialized implementations (Table II, Figure 7) -------------------------------------

TUNE_OPTIONS = dict(
    resolutions=typer.Option(span(TuneConfig.resolutions), help="'112,168,224' or '112..448:56' (inclusive, step)."),
    threads=typer.Option(TuneConfig.threads, help="Threads every backend gets (part of the cache key)."),
    backends=typer.Option("default", help=f"'default' ({', '.join(default_backends())}), 'all' "
                          f"(+ {', '.join(b for b in BACKENDS if b not in default_backends())}) or a comma-separated "
                          "list."),
    runs=typer.Option(TuneConfig.runs, help="Timed rounds per setting (alternating candidates; median)."),
    warmup=typer.Option(TuneConfig.warmup, help="Untimed calls per candidate first."),
    tolerance=typer.Option(TuneConfig.tolerance, help="Max relative error vs eager; worse candidates are rejected."),
    tvm_trials=typer.Option(TuneConfig.tvm_trials, help="MetaSchedule trials for the tvm backend (0: untuned)."),
    cache_dir=typer.Option(None, help="Tuning cache (default $DYNRES_CACHE/kernels or ~/.cache/dynres/kernels)."),
)


def tune_config(resolutions: str, batches: str, threads: int, backends: str, runs: int, warmup: int,
                tolerance: float, tvm_trials: int, cache_dir: Optional[Path]) -> TuneConfig:
    """The tuning flags (:data:`TUNE_OPTIONS` plus ``--batches``) as a :class:`TuneConfig`."""
    names = parse_list(backends, str, "--backends")
    named = {None: default_backends(), ("default",): default_backends(), ("all",): tuple(BACKENDS)}
    extra = {"cache_dir": cache_dir} if cache_dir else {}
    return TuneConfig(resolutions=parse_list(resolutions, int, "--resolutions"),
                      batch_sizes=parse_list(batches, int, "--batches"), threads=threads,
                      backends=named.get(names, names), runs=runs, warmup=warmup, tolerance=tolerance,
                      tvm_trials=tvm_trials, **extra)


def print_tuned(rows: list) -> None:
    """One line per tuned setting: the winner, its latency and speed, and its speed-up over eager."""
    eager = {(r["model"], r["resolution"], r["batch"]): r for r in rows if r["backend"] == "eager"}
    for r in (r for r in rows if r["backend"] == "tuned"):
        e = eager.get((r["model"], r["resolution"], r["batch"]))
        speed = f"{e['latency_ms'] / r['latency_ms']:.2f}x vs eager" if e and e.get("latency_ms") else ""
        cached = "  cached" if r.get("cached") else ""
        console.print(f"{r['model']:>14} {r['resolution']:>4}px b{r['batch']:<3} {r['chosen']:>14} "
                      f"{r['latency_ms']:8.2f} ms  {r['gflops_per_s']:6.1f} GFLOP/s "
                      f"({100 * (r['fraction_of_gemm_peak'] or 0):.0f}% GEMM)  {speed}{cached}", soft_wrap=True)


def tune(
    model_ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint (model.pt + model.json); or give --arch."),
    arch: Optional[str] = typer.Option(None, help="Architecture with random weights instead (same speed)."),
    num_classes: int = typer.Option(IMAGENET_CLASSES, help="Classes for --arch."),
    batches: str = typer.Option(join(TuneConfig.batch_sizes), help="Batch sizes, comma-separated."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="Where kernels.json/.md/-fig7.png go."),
    resolutions: str = TUNE_OPTIONS["resolutions"], threads: int = TUNE_OPTIONS["threads"],
    backends: str = TUNE_OPTIONS["backends"], runs: int = TUNE_OPTIONS["runs"], warmup: int = TUNE_OPTIONS["warmup"],
    tolerance: float = TUNE_OPTIONS["tolerance"], tvm_trials: int = TUNE_OPTIONS["tvm_trials"],
    cache_dir: Optional[Path] = TUNE_OPTIONS["cache_dir"],
) -> None:
    """Pick the fastest correct backend per resolution and batch size; cache it and its compiled artifact."""
    from dynres.bench.kernels import run_bench_kernels
    from dynres.errors import ConfigError
    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.nets import random_backbone

    if (model_ckpt is None) == (arch is None):
        raise ConfigError("tune", "give either MODEL_CKPT or --arch")
    if model_ckpt:
        model, meta = load_checkpoint(model_ckpt)
        name = meta.arch
    else:
        model, name = random_backbone(arch, num_classes), arch
    cfg = tune_config(resolutions, batches, threads, backends, runs, warmup, tolerance, tvm_trials, cache_dir)
    rec = run_bench_kernels({name: model}, cfg, out)
    print_tuned(rec["rows"])
    console.print(f"GEMM peak {rec['limits']['gemm_gflops_per_s']:.0f} GFLOP/s; wrote {rec['paths']['md']}")
