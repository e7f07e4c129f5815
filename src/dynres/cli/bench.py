"""``dynres bench io|decode|pipeline|serve|kernels|scale``: each benchmark writes its JSON + Markdown record and prints
a digest of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.bench.decode import DecodeBenchConfig
from dynres.bench.io import IOBenchConfig
from dynres.bench.pipeline import PipelineBenchConfig
from dynres.bench.ray import RayBenchConfig
from dynres.bench.scale import ScaleBenchConfig
from dynres.bench.serve import ServeBenchConfig
from dynres.cli.options import join, parse_list, parse_pairs, path_text
from dynres.cli.runtime import BIAS_HELP, RECAL_HELP, TUNE_OPTIONS, print_tuned, tune_config
from dynres.runtime.kernels import TuneConfig

app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON + Markdown records).")


@app.command("io")
def bench_io_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where bench_io.json/.md go."),
    resolutions: str = typer.Option(join(IOBenchConfig.resolutions), help="Comma-separated resolutions."),
    images: int = typer.Option(IOBenchConfig.images, help="Images sampled from the store."),
    repeats: int = typer.Option(IOBenchConfig.repeats, help="Repeats per cell (median reported)."),
    crop_side: float = typer.Option(IOBenchConfig.crop_side, "--crop", help="Center-crop side ratio."),
    workers: int = typer.Option(IOBenchConfig.workers, help="Processes for the all-cores run (0: every core)."),
    src: Optional[Path] = typer.Option(None, help="An ImageFolder tree: also measure ingest images/s on it."),
) -> None:
    """Read+decode speed: DCT-scaled decode vs full decode + torchvision resize; bytes per scan count."""
    from dynres.bench.io import run_bench_io

    cfg = IOBenchConfig(resolutions=parse_list(resolutions, int, "--resolutions"), images=images, repeats=repeats,
                        crop_side=crop_side, workers=workers)
    result = run_bench_io(store, out, cfg, src=src)
    from dynres.io.layout import describe_layout
    from dynres.io.store import open_store

    console.print(f"scan layout: {describe_layout(open_store(store).layout)}", markup=False)
    for row in result["decode"]:
        console.print(
            f"{row['resolution']:>4}px  1 core: {row['dct_scaled_one_core_images_per_s']:7.1f} vs "
            f"{row['baseline_one_core_images_per_s']:7.1f} img/s ({row['speedup_one_core']:.2f}x)   "
            f"all cores: {row['dct_scaled_all_cores_images_per_s']:7.1f} vs "
            f"{row['baseline_all_cores_images_per_s']:7.1f} img/s ({row['speedup_all_cores']:.2f}x)"
        )
    console.print(f"wrote {out / 'bench_io.json'} and {out / 'bench_io.md'}")


@app.command("decode")
def bench_decode_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where bench_decode.json/.md go."),
    images: int = typer.Option(DecodeBenchConfig.images, help="Images sampled from the store."),
    repeats: int = typer.Option(DecodeBenchConfig.repeats, help="Repeats per cell (median reported)."),
    scans: str = typer.Option(join(DecodeBenchConfig.scans), help="Scan counts to read (0: the whole file)."),
    scales: str = typer.Option(join(DecodeBenchConfig.scales), help="DCT scale denominators (1, 2, 4, 8)."),
    modes: str = typer.Option(join(DecodeBenchConfig.modes), help="RGB and/or L (luma, the quality index's)."),
) -> None:
    """ms per prefix decode of every libjpeg-turbo binding at every DCT scale, pixels vs Pillow's; dynres's decoder."""
    from dynres.bench.decode import run_bench_decode

    cfg = DecodeBenchConfig(images=images, repeats=repeats, scans=parse_list(scans, int, "--scans"),
                            scales=parse_list(scales, int, "--scales"), modes=parse_list(modes, str, "--modes"))
    result = run_bench_decode(store, out, cfg)
    for row in result["summary"]:
        console.print(f"{row['mode']:>3} scans {row['scans']!s:>3} 1/{row['scale']}: fastest equal "
                      f"{row['fastest']} {row['fastest_ms']:.3f} ms, pillow {row['pillow_ms']:.3f} ms, dynres "
                      f"{row['dynres_ms']:.3f} ms ({row['dynres_vs_fastest']:.2f}x)")
    missing = [f"{n} ({b['reason']})" for n, b in result["bindings"].items() if not b["available"]]
    if missing:
        console.print("not measured: " + "; ".join(missing))
    console.print(f"wrote {out / 'bench_decode.json'} and {out / 'bench_decode.md'}")


@app.command("pipeline")
def bench_pipeline_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Path = typer.Option(..., "--scale", help="Scale-model checkpoint."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where pipeline.json/.md go."),
    images: int = typer.Option(PipelineBenchConfig.images, help="Images sampled from the store (0: all)."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="Text file, one key a line: bench only these."),
    kernels: str = typer.Option(PipelineBenchConfig.kernels, help="Kernels for (b) and (c): tuned or eager."),
    static_resolution: Optional[int] = typer.Option(PipelineBenchConfig.static_resolution,
                                                    help="(b)'s resolution (default: best of a sweep)."),
    baseline_resolution: Optional[int] = typer.Option(PipelineBenchConfig.baseline_resolution,
                                                      help="(a)'s resolution (default: train resolution)."),
    lam: Optional[float] = typer.Option(
        PipelineBenchConfig.lam, "--lambda", help=f"Cost weight λ for (c) (default: the largest λ within "
        f"{PipelineBenchConfig.tolerance} points of (b), picked on the sweep images)."),
    batch_size: int = typer.Option(PipelineBenchConfig.batch_size, help="Batch size for every mode."),
    workers: int = typer.Option(PipelineBenchConfig.workers, help="Read/decode threads for every mode."),
    threads: int = typer.Option(PipelineBenchConfig.torch_threads,
                                help="torch threads for eager PyTorch (0: torch's default)."),
    kernel_threads: int = typer.Option(PipelineBenchConfig.kernel_threads,
                                       help="Threads of the tuned kernels (as tuned by `dynres tune`)."),
    repeats: int = typer.Option(PipelineBenchConfig.repeats,
                                help="Timed runs per mode (interleaved); each row is the median run."),
    max_repeats: int = typer.Option(PipelineBenchConfig.max_repeats, help="More runs, up to this many, while the "
                                    "dynamic and static rows are within --close of each other in images/s."),
    close: float = typer.Option(PipelineBenchConfig.close, help="With --max-repeats: the images/s ratio band."),
    crop_side: float = typer.Option(PipelineBenchConfig.crop_side, "--crop",
                                    help="Center crop side ratio of every mode (the study's: its guard's crop)."),
    bias: str = typer.Option("", "--bias", help=BIAS_HELP),
    recalibration: str = typer.Option("", "--recalibration", help=RECAL_HELP),
) -> None:
    """(a) common baseline vs (b) best static + tuned kernels + calibrated reads vs (c) the dynamic pipeline."""
    from dynres.bench.pipeline import run_bench_pipeline

    cfg = PipelineBenchConfig(images=images, batch_size=batch_size, workers=workers, torch_threads=threads,
                              kernel_threads=kernel_threads, baseline_resolution=baseline_resolution,
                              static_resolution=static_resolution, lam=lam, kernels=kernels, repeats=repeats,
                              max_repeats=max_repeats, close=close, crop_side=crop_side,
                              bias=parse_list(bias, float, "--bias"),
                              recalibration=parse_pairs(recalibration, "--recalibration"))
    only = [k.strip() for k in keys.read_text().splitlines() if k.strip()] if keys else None
    p = run_bench_pipeline(store, str(model), str(scale), out, path_text(policy), cfg, keys=only)
    for name, row in p["pipeline"].items():
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2f}%"
        console.print(f"{name:>13}: {row['images_per_s']:7.1f} img/s  top-1 {acc}  "
                      f"{row['bytes_per_image']:9.0f} B/img  p50 {row['p50_ms']:.0f} ms  p99 {row['p99_ms']:.0f} ms")
    r = p["ratios"]
    console.print(f"(c)/(a) {r['dynamic_vs_baseline_images_per_s']:.2f}x, (c)/(b) "
                  f"{r['dynamic_vs_static_images_per_s']:.2f}x, scale overhead {100 * r['scale_overhead']:.1f}%")
    console.print(f"wrote {out / 'pipeline.json'} and {out / 'pipeline.md'}")


@app.command("serve")
def bench_serve_cmd(
    store: str = typer.Argument(..., help="Store directory (requests are store keys)."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Path = typer.Option(..., "--scale", help="Scale-model checkpoint."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where serve_load.json/.md go."),
    latency_target_ms: float = typer.Option(ServeBenchConfig.latency_target_ms,
                                            help="Target for the load-adaptive scenario."),
    overload: float = typer.Option(ServeBenchConfig.overload, help="Burst rate as a multiple of the sustainable rate."),
    burst_s: float = typer.Option(ServeBenchConfig.burst_s, help="Burst length (seconds)."),
    calm_s: float = typer.Option(ServeBenchConfig.calm_s,
                                 help="Calm phase before and after (seconds, half the sustainable rate)."),
    max_queue: int = typer.Option(ServeBenchConfig.max_queue, help="Requests in flight before 503."),
    lam_max: float = typer.Option(ServeBenchConfig.lam_max, "--lambda-max", help="Ceiling of the load-adaptive λ."),
    kernels: str = typer.Option(ServeBenchConfig.kernels, help="eager or tuned."),
) -> None:
    """Loopback load test of `dynres serve`: a burst at 2x the sustainable rate, fixed λ vs load-adaptive λ."""
    from dynres.bench.serve import run_bench_serve

    cfg = ServeBenchConfig(latency_target_ms=latency_target_ms, overload=overload, burst_s=burst_s, calm_s=calm_s,
                           max_queue=max_queue, lam_max=lam_max, kernels=kernels)
    p = run_bench_serve(store, str(model), str(scale), out, path_text(policy), cfg)
    for name, row in p["scenarios"].items():
        console.print(f"{name:>16}: {row['ok']} ok, {row['rejected_503']} x 503, {row['other']} other; "
                      f"p99 {row['p99_ms']:.0f} ms; top-1 {row['accuracy']}; mean λ {row['mean_lambda']}; "
                      f"RSS {row['rss_start_mb']:.0f} → max {row['rss_max_mb']:.0f} MB")
    console.print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.md'}")


@app.command("ray")
def bench_ray_cmd(
    store: str = typer.Argument(..., help="Store directory."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Path = typer.Option(..., "--scale-model", "--scale", help="Scale-model checkpoint."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where bench_ray.json/.md go."),
    images: int = typer.Option(RayBenchConfig.images, help="The first N images of the store (0: all; more than "
                               "it holds: its images repeated under new keys)."),
    actors: str = typer.Option(join(RayBenchConfig.actors), help="Actors per pool, one Ray run each (and layout)."),
    layouts: str = typer.Option(join(RayBenchConfig.layouts), help="Ray layouts (fused, split), one set of runs each."),
    batch_size: int = typer.Option(RayBenchConfig.batch_size, help="The models' batch size (both engines)."),
    ray_batch: int = typer.Option(RayBenchConfig.ray_batch, help="Images per Ray actor call."),
    lam: float = typer.Option(RayBenchConfig.lam, "--lambda", help="Cost weight λ."),
    kernels: str = typer.Option(RayBenchConfig.kernels, help="eager or tuned."),
    memory_images: str = typer.Option(join(RayBenchConfig.memory_images),
                                      help="Store sizes for the driver-memory check (synthesized; '' for none)."),
    s3_images: int = typer.Option(RayBenchConfig.s3_images,
                                  help="Images on a loopback S3 server (moto) for the requests table (0: none)."),
) -> None:
    """The Ray engine (fused and split layouts, 1 and 2 actors per pool) vs the local engine: images/s, driver
    memory, requests per image."""
    from dynres.bench.ray import run_bench_ray

    cfg = RayBenchConfig(images=images, actors=parse_list(actors, int, "--actors"), batch_size=batch_size,
                         ray_batch=ray_batch, lam=lam, kernels=kernels, layouts=parse_list(layouts, str, "--layouts"),
                         memory_images=parse_list(memory_images, int, "--memory-images") or (),
                         s3_images=s3_images)
    p = run_bench_ray(store, str(model), str(scale), out, path_text(policy), cfg)
    for row in p["throughput"] + p.get("driver_memory", []) + p.get("requests", []):
        rpi = "n/a" if row["requests_per_image"] is None else f"{row['requests_per_image']:.2f}"
        console.print(f"{row['mode']:>28}: {row['images_per_s']:7.1f} img/s (steady {row['steady_images_per_s']:7.1f})"
                      f"  {rpi} req/img  {row['bytes_per_image']:8.0f} B/img  driver RSS peak "
                      f"{row['rss_peak_mb']:.0f} MB (+{row['rss_growth_mb']:.0f})")
    console.print(f"wrote {out / 'bench_ray.json'} and {out / 'bench_ray.md'}")


@app.command("kernels")
def bench_kernels_cmd(
    models: str = typer.Option("resnet18,resnet50,mobilenet_v2", help="Architectures (random weights)."),
    batches: str = typer.Option(join(TuneConfig.batch_sizes), help="Latency-mode batch sizes over every resolution."),
    throughput_batch: int = typer.Option(8, help="Throughput-mode batch size (0: none) ..."),
    throughput_resolutions: str = typer.Option("112,168", help="... at these resolutions."),
    out: Path = typer.Option(Path("runs/bench-kernels"), "--out", help="Where kernels.json/.md/-fig7.png go."),
    resolutions: str = TUNE_OPTIONS["resolutions"], threads: int = TUNE_OPTIONS["threads"],
    backends: str = TUNE_OPTIONS["backends"], runs: int = TUNE_OPTIONS["runs"], warmup: int = TUNE_OPTIONS["warmup"],
    tolerance: float = TUNE_OPTIONS["tolerance"], tvm_trials: int = TUNE_OPTIONS["tvm_trials"],
    cache_dir: Optional[Path] = TUNE_OPTIONS["cache_dir"],
) -> None:
    """Table II (latency per resolution per backend, tuned vs eager) + Figure 7 (GFLOP/s, fraction of peak)."""
    from dynres.bench.kernels import run_bench_kernels
    from dynres.model.nets import IMAGENET_CLASSES, random_backbone

    cfg = tune_config(resolutions, batches, threads, backends, runs, warmup, tolerance, tvm_trials,
                      cache_dir or out / "cache")
    extra = [dataclasses.replace(cfg, resolutions=parse_list(throughput_resolutions, int, "--throughput-resolutions"),
                                 batch_sizes=(throughput_batch,))] if throughput_batch > 0 else []
    # every model gets the same random weights on every run, whatever the model list: a rerun hits the tuning cache
    nets = {name: random_backbone(name, IMAGENET_CLASSES) for name in parse_list(models, str, "--models") or ()}
    rec = run_bench_kernels(nets, cfg, out, extra=extra)
    print_tuned(rec["rows"])
    lim = rec["limits"]
    console.print(f"GEMM peak {lim['gemm_gflops_per_s']:.0f} GFLOP/s, FMA ceiling "
                  f"{lim.get('fma_gflops_per_s') or float('nan'):.0f} GFLOP/s; wrote {rec['paths']['md']}")


@app.command("scale")
def bench_scale_cmd(
    run: Path = typer.Argument(..., help="A finished accuracy chain (RUN/accuracy: backbone/, scale/, eval/)."),
    train_store: str = typer.Argument(..., help="The store the chain's scale labels were made on (RUN/store/train)."),
    val_store: str = typer.Argument(..., help="Held-out store the candidates are judged on (RUN/store/val)."),
    out: Path = typer.Option(Path("runs/bench/scale"), "--out", help="Where bench_scale.json/.md and models go."),
    targets: str = typer.Option(join(ScaleBenchConfig.targets), help="ScaleConfig.target values to compare."),
    seeds: str = typer.Option(join(ScaleBenchConfig.seeds), help="Scale-model seeds (noise of the comparison)."),
    probes: str = typer.Option("", help="Backbone-probe candidates FEATURES-HEAD[@RES], e.g. softmax-linear,"
                                         "pooled-linear (docs/scale-candidates.md); none by default."),
    rules: str = typer.Option("", help="Biased choice rules on the run's scale model, fitted on its training "
                                       "labels: anchor,recentred (docs/scale-candidates.md); none by default."),
    taus: str = typer.Option(join(ScaleBenchConfig.taus), help="The anchor rule's bias sizes τ."),
) -> None:
    """Scale-model candidates (training targets) on one run's labels: AUC, argmax and iso-cost accuracy per crop."""
    from dynres.io.store import open_store
    from dynres.study.scale_compare import compare_scale_targets

    cfg = ScaleBenchConfig(targets=parse_list(targets, str, "--targets"), seeds=parse_list(seeds, int, "--seeds"),
                           probes=parse_list(probes, str, "--probes") or (),
                           rules=parse_list(rules, str, "--rules") or (), taus=parse_list(taus, float, "--taus") or ())
    payload = compare_scale_targets(open_store(train_store), open_store(val_store), run, out, cfg)
    def pts(value: float | None) -> str:
        return "none within budget" if value is None else f"{value:+.1f} pts"

    for row in payload["summary"]:
        if row["crop"] == "all":
            console.print(f"{row['target']:>8}: AUC min {row['auc_min']:.3f}, argmax vs best static "
                          f"{pts(row['argmax_vs_best_static'])}, iso-cost vs best static "
                          f"{pts(row['iso_cost_vs_best_static'])} (mean over crops)", markup=False)
    console.print(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.md'}")
