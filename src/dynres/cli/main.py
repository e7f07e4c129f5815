"""The `dynres` command line: maps flags to the library's dataclasses and functions, nothing more.

Every library error (``DynresError``) becomes one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.errors import DynresError
from dynres.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic-resolution CNN inference.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON + Markdown records).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder: train/, val/ (ImageFolder) and objects.parquet."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default 10, at most 16)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Training images per class (default 300)."),
    val_per_class: Optional[int] = typer.Option(None, help="Validation images per class (default 100)."),
    seed: Optional[int] = typer.Option(None, help="Seed; the same settings give byte-identical files (default 0)."),
    min_size: Optional[int] = typer.Option(None, help="Smallest long image side in px (default 300)."),
    max_size: Optional[int] = typer.Option(None, help="Largest long image side in px (default 800)."),
    quality: Optional[int] = typer.Option(None, help="Baseline JPEG quality (default 90)."),
    workers: Optional[int] = typer.Option(None, help="Processes (default 1, 0: every core); output does not change."),
) -> None:
    """Generate the built-in data set: objects at scales varying > 6x on photo backgrounds, fine-detail classes."""
    from dynres.io.synth import SynthConfig, synth

    given = {"classes": classes, "train_per_class": per_class, "val_per_class": val_per_class, "seed": seed,
             "min_size": min_size, "max_size": max_size, "jpeg_quality": quality, "workers": workers}
    report = synth(out, SynthConfig(**{k: v for k, v in given.items() if v is not None}), progress=True)
    console.print(f"wrote {report.images} images ({report.train} train, {report.val} val, {report.classes} classes) "
                  f"and {out / 'objects.parquet'} in {report.seconds:.1f} s ({report.images_per_s:.0f} images/s)",
                  soft_wrap=True, markup=False)


@bench_app.command("io")
def bench_io_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where bench_io.json/.md go."),
    resolutions: str = typer.Option("112,168,224,280,336,392,448", help="Comma-separated resolutions."),
    images: int = typer.Option(64, help="Images sampled from the store."),
    repeats: int = typer.Option(3, help="Repeats per cell (median reported)."),
    crop: float = typer.Option(0.875, help="Center-crop side ratio."),
    workers: int = typer.Option(0, help="Processes for the all-cores run (0: every core)."),
    src: Optional[Path] = typer.Option(None, help="An ImageFolder tree: also measure ingest images/s on it."),
) -> None:
    """Read+decode speed: DCT-scaled decode vs full decode + torchvision resize; bytes per scan count."""
    from dynres.bench.io import IOBenchConfig, run_bench_io

    cfg = IOBenchConfig(tuple(int(r) for r in resolutions.split(",")), images, repeats, crop, workers)
    result = run_bench_io(store, out, cfg, src=src)
    for row in result["decode"]:
        console.print(
            f"{row['resolution']:>4}px  1 core: {row['dct_scaled_one_core_images_per_s']:7.1f} vs "
            f"{row['baseline_one_core_images_per_s']:7.1f} img/s ({row['speedup_one_core']:.2f}x)   "
            f"all cores: {row['dct_scaled_all_cores_images_per_s']:7.1f} vs "
            f"{row['baseline_all_cores_images_per_s']:7.1f} img/s ({row['speedup_all_cores']:.2f}x)"
        )
    console.print(f"wrote {out / 'bench_io.json'} and {out / 'bench_io.md'}")


FORCE_HELP = ("Run every stage even if its record is up to date; each still reuses its own finished work (stored "
              "images, trained epochs, tuned kernels): delete the run directory to start from nothing.")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (cached stages, records, report)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and budgets: a few minutes."),
    workers: int = typer.Option(0, help="Processes for data generation, ingest and decoding (0: every core)."),
    seed: int = typer.Option(0, help="Seed for the built-in data set and training."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """The main job on the built-in data set: the whole study (data → … → report) in one cached run."""
    from dynres.study.demo import FULL, QUICK, StudyConfig, run_study

    cfg = StudyConfig(out=out, size=QUICK if quick else FULL, seed=seed, workers=workers, force=force,
                      io_images=32 if quick else 64, io_repeats=1 if quick else 3, quick=quick)
    summary = run_study(cfg)
    console.print(f"[green]demo finished in {summary['wall_s']:.0f} s[/green]; summary: {out / 'summary.json'}")


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="ImageFolder tree: SRC/<class>/<image> (JPEG, PNG, WebP, BMP, TIFF)."),
    store: Path = typer.Argument(..., help="Store directory to create or resume."),
    quality: int = typer.Option(90, help="JPEG quality (1-100)."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Cap the long side (pixels)."),
    workers: int = typer.Option(0, help="Processes (0: every core, 1: no subprocesses)."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Skip larger images as decompression bombs."),
    scans: Optional[Path] = typer.Option(None, "--scans", help="jpegtran scan-script file (needs `jpegtran`)."),
) -> None:
    """Re-encode an image tree as progressive JPEGs + manifest.parquet (resumable; skipped files listed)."""
    from rich.table import Table

    from dynres.io.ingest import IngestConfig
    from dynres.io.ingest import ingest as run_ingest

    cfg = IngestConfig(quality=quality, max_side=max_side, workers=workers, max_pixels=max_pixels,
                       scans=str(scans) if scans else None)
    rep = run_ingest(src, store, cfg, progress=True)
    if rep.skipped:
        table = Table("skipped file", "reason", title=f"{len(rep.skipped)} skipped")
        for name, reason in rep.skipped:
            table.add_row(name, reason)
        console.print(table)
    console.print(f"{rep.images} images in {store} ({rep.ingested} encoded, {rep.reused} reused, "
                  f"{len(rep.skipped)} skipped) in {rep.seconds:.1f} s = {rep.images_per_s:.1f} images/s")


@app.command()
def run(
    config: Path = typer.Argument(..., help="TOML or YAML run file (docs/run-config.md)."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
) -> None:
    """The demo's stages on your own ImageFolder data and architecture, from a config file."""
    from dataclasses import replace

    from dynres.study.demo import load_study_config, run_study

    cfg = replace(load_study_config(config), force=force)
    summary = run_study(cfg)
    console.print(f"[green]run finished in {summary['wall_s']:.0f} s[/green]; report: {cfg.out / 'report.html'}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory with summary.json.")) -> None:
    """Render RUN_DIR/report.html and report.md from the run's records."""
    from dynres.report.document import build_report

    html_path, md_path = build_report(run_dir)
    console.print(f"wrote {html_path} and {md_path}")


@app.command()
def infer(
    store: str = typer.Argument(..., help="Store directory or fsspec URL (s3://, http://, ...)."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint (model.pt + model.json, or its dir)."),
    scale: Optional[Path] = typer.Option(None, "--scale", help="Scale-model checkpoint (dynamic mode)."),
    out: Path = typer.Option(Path("preds.parquet"), "--out", help="Predictions Parquet; summary beside it."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Static mode at this resolution."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy (`dynres calibrate`)."),
    kernels: str = typer.Option("eager", help="eager, or tuned (the cached winners of `dynres tune`)."),
    lam: float = typer.Option(0.0, "--lambda", help="Cost weight λ of the cost-aware choice (0: argmax p)."),
    baseline: bool = typer.Option(False, help="The common baseline: full read + full decode (needs --resolution)."),
    read_ahead: bool = typer.Option(False, help="Dynamic: read up front the longest prefix any resolution needs "
                                    "(one read + one decode per image; more bytes, less CPU)."),
    decode_once: bool = typer.Option(True, "--decode-once/--exact-views",
                                     help="Dynamic: resize every view from one decode per prefix, or decode each "
                                     "view at its own DCT scale (pixel-identical to `dynres eval`; two decodes)."),
    batch_size: int = typer.Option(16, help="Images per scale-model batch and per backbone batch."),
    workers: int = typer.Option(2, help="Read/decode threads."),
    threads: int = typer.Option(0, help="torch threads for the models (0: torch's default)."),
    crop: float = typer.Option(0.875, help="Center-crop side ratio."),
    limit: int = typer.Option(0, help="Only the first N images (0: all)."),
    engine: str = typer.Option("local", help="local, or ray (Ray Data, one actor pool per stage)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: a local Ray)."),
) -> None:
    """Batch inference over a store: scale model → resolution → missing bytes → backbone, pipelined."""
    from dynres.records import write_records
    from dynres.runtime.engine import EngineSpec, PipelineConfig

    cfg = PipelineConfig(batch_size=batch_size, workers=workers, torch_threads=threads, crop=crop,
                         resolution=resolution, lam=lam, baseline=baseline, read_ahead=read_ahead,
                         decode_once=decode_once)
    spec = EngineSpec(store, str(model), str(scale) if scale else None, str(policy) if policy else None, kernels, cfg)
    if engine == "ray":
        from dynres.runtime.ray import run_ray

        result = run_ray(spec, limit=limit or None, address=address)
    elif engine == "local":
        from dynres.runtime.engine import build_engine

        eng = build_engine(spec)
        result = eng.run(eng.store.keys[:limit] if limit else None)
    else:
        raise typer.BadParameter(f"unknown engine {engine!r} (local, ray)")
    result.write_parquet(out)
    s = result.summary
    write_records(out.parent, out.stem, {"spec": str(spec), "summary": s},
                  "\n".join(f"- {k}: {v}" for k, v in s.items()))
    acc = f", top-1 {s['accuracy']:.2f}%" if s.get("accuracy") is not None else ""
    console.print(f"{s['images']} images in {s['seconds']:.1f} s = {s['images_per_s']:.1f} images/s{acc}; "
                  f"read {s['read_fraction']:.1%} of the bytes; p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms; "
                  f"resolutions {s['resolution_histogram']}")
    console.print(f"wrote {out} and {out.with_suffix('.json')}")


@app.command()
def serve(
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Optional[Path] = typer.Option(None, "--scale", help="Scale-model checkpoint (dynamic mode)."),
    store: Optional[str] = typer.Option(None, "--store", help="Store for POST /predict/key requests."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy for store keys."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Static mode at this resolution."),
    kernels: str = typer.Option("eager", help="eager or tuned."),
    host: str = typer.Option("127.0.0.1", help="Bind address."),
    port: int = typer.Option(8000, help="Port."),
    max_batch: int = typer.Option(8, help="Largest batch per model call."),
    max_wait_ms: float = typer.Option(5.0, help="Longest wait to fill a batch."),
    max_queue: int = typer.Option(32, help="Requests in flight before answering 503."),
    lam: float = typer.Option(0.0, "--lambda", help="Cost weight λ (the floor, when load-adaptive)."),
    latency_target_ms: Optional[float] = typer.Option(None, help="Shed (503) requests predicted to miss this."),
    adaptive: bool = typer.Option(False, help="Load-adaptive λ: raise it while queueing delay grows."),
    lam_max: float = typer.Option(1.0, "--lambda-max", help="The load-adaptive λ's ceiling (the most accuracy it "
                                  "may trade; `dynres eval dynamic` shows what each λ costs)."),
    decode_once: bool = typer.Option(True, "--decode-once/--exact-views",
                                     help="Resize every view from one decode per prefix, or decode each view."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    workers: int = typer.Option(2, help="Read + decode threads."),
) -> None:
    """The pipeline as an HTTP service: POST /predict (upload) or /predict/key; /healthz, /metrics, /docs."""
    import uvicorn

    from dynres.runtime.engine import EngineSpec, PipelineConfig
    from dynres.runtime.serve import ServeConfig, build_service, create_app

    if store is None and scale is None and resolution is None:
        raise typer.BadParameter("give --scale (dynamic) or --resolution (static)")
    spec = EngineSpec(store or "", str(model), str(scale) if scale else None, str(policy) if policy else None,
                      kernels, PipelineConfig(batch_size=max_batch, torch_threads=threads, resolution=resolution))
    cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, resolution=resolution,
                      lam=lam, latency_target_ms=latency_target_ms, adaptive=adaptive, lam_max=lam_max,
                      decode_once=decode_once, workers=workers)
    uvicorn.run(create_app(build_service(spec, cfg)), host=host, port=port, log_level="warning")


@bench_app.command("pipeline")
def bench_pipeline_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Path = typer.Option(..., "--scale", help="Scale-model checkpoint."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where pipeline.json/.md go."),
    images: int = typer.Option(0, help="Images sampled from the store (0: all)."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="Text file, one key a line: bench only these."),
    kernels: str = typer.Option("tuned", help="Kernels for (b) and (c): tuned or eager."),
    static_resolution: Optional[int] = typer.Option(None, help="(b)'s resolution (default: best of a sweep)."),
    baseline_resolution: Optional[int] = typer.Option(None, help="(a)'s resolution (default: train resolution)."),
    lam: Optional[float] = typer.Option(None, "--lambda", help="Cost weight λ for (c) (default: the largest λ "
                                        "within 0.5 points of (b), picked on the sweep images)."),
    batch_size: int = typer.Option(16, help="Batch size for every mode."),
    workers: int = typer.Option(2, help="Read/decode threads for every mode."),
    threads: int = typer.Option(0, help="torch threads for eager PyTorch (0: torch's default)."),
    kernel_threads: int = typer.Option(2, help="Threads of the tuned kernels (as tuned by `dynres tune`)."),
    repeats: int = typer.Option(3, help="Timed runs per mode (interleaved); each row is the median run."),
) -> None:
    """(a) common baseline vs (b) best static + tuned kernels + calibrated reads vs (c) the dynamic pipeline."""
    from dynres.bench.pipeline import PipelineBenchConfig, run_bench_pipeline

    cfg = PipelineBenchConfig(images=images, batch_size=batch_size, workers=workers, torch_threads=threads,
                              kernel_threads=kernel_threads, baseline_resolution=baseline_resolution,
                              static_resolution=static_resolution, lam=lam, kernels=kernels, repeats=repeats)
    only = [k.strip() for k in keys.read_text().splitlines() if k.strip()] if keys else None
    p = run_bench_pipeline(store, str(model), str(scale), out, str(policy) if policy else None, cfg, keys=only)
    for name, row in p["pipeline"].items():
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2f}%"
        console.print(f"{name:>13}: {row['images_per_s']:7.1f} img/s  top-1 {acc}  "
                      f"{row['bytes_per_image']:9.0f} B/img  p50 {row['p50_ms']:.0f} ms  p99 {row['p99_ms']:.0f} ms")
    r = p["ratios"]
    console.print(f"(c)/(a) {r['dynamic_vs_baseline_images_per_s']:.2f}x, (c)/(b) "
                  f"{r['dynamic_vs_static_images_per_s']:.2f}x, scale overhead {100 * r['scale_overhead']:.1f}%")
    console.print(f"wrote {out / 'pipeline.json'} and {out / 'pipeline.md'}")


# --- train / eval (backbones, scale model, static and dynamic evaluation) -----------------------------------

train_app = typer.Typer(no_args_is_help=True, help="Train backbones and the scale model.")
eval_app = typer.Typer(no_args_is_help=True, help="Static and dynamic accuracy vs GFLOPs.")
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")


def _ints(text: Optional[str]) -> Optional[tuple[int, ...]]:
    return tuple(int(x) for x in text.split(",") if x.strip()) if text else None


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _train_config(arch: str, resolution: int, epochs: int, batch_size: int, optimizer: str, lr: Optional[float],
                  label_smoothing: float, seed: int, init: Optional[Path], no_cache: bool):
    from dynres.model.train import TrainConfig

    lr = lr if lr is not None else (TrainConfig.lr if optimizer == TrainConfig.optimizer else 0.1)
    return TrainConfig(arch=arch, resolution=resolution, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                       lr=lr, label_smoothing=label_smoothing, seed=seed, init=str(init) if init else None,
                       cache=not no_cache)


@train_app.command("backbone")
def train_backbone_cmd(
    store: str = typer.Argument(..., help="Train store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/backbone"), "--out", help="Checkpoint folder (model.pt + model.json)."),
    arch: str = typer.Option("resnet_tiny", help="resnet_tiny, resnet_small or any torchvision classifier name."),
    resolution: int = typer.Option(112, help="Train resolution (RandomResizedCrop size)."),
    epochs: int = typer.Option(20),
    batch_size: int = typer.Option(32),
    optimizer: str = typer.Option("adamw", help="adamw or sgd (momentum, nesterov)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 0.003 adamw, 0.1 sgd)."),
    label_smoothing: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    init: Optional[Path] = typer.Option(None, help="Local state_dict to fine-tune from."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Decode every view (no in-memory decoded images)."),
) -> None:
    """Train a classifier; re-running resumes from the last finished epoch."""
    from dynres.io.store import open_store
    from dynres.model.train import train_backbone

    cfg = _train_config(arch, resolution, epochs, batch_size, optimizer, lr, label_smoothing, seed, init, no_cache)
    path = train_backbone(open_store(store), out, cfg)
    console.print(f"wrote {path} (+ model.json, train_log.json)")


@train_app.command("scale")
def train_scale_cmd(
    store: str = typer.Argument(..., help="Train store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/scale"), "--out", help="Shard backbones, labels, scale model, scale.json."),
    folds: int = typer.Option(4, help="K disjoint shards (K backbones on K-1 shards each)."),
    cheap: bool = typer.Option(False, "--cheap", help="One split only (the paper's footnote 2)."),
    splits: int = typer.Option(1, help="Repeat the K-fold split with N shard seeds; the scale model learns the mean "
                                       "of the N labels per image (N x K backbones)."),
    crops: str = typer.Option("0.25,0.56,0.75,1.0", help="Crop areas the labels cover."),
    grid: Optional[str] = typer.Option(None, help="Resolutions (default: 0.5x..2x of --resolution, step 0.25x)."),
    arch: str = typer.Option("mobilenet_v2_tiny", help="Scale model architecture."),
    init: Optional[Path] = typer.Option(None, help="Local state_dict for the scale model's trunk."),
    backbone_init: Optional[Path] = typer.Option(None, help="Local state_dict the shard backbones fine-tune from."),
    scale_resolution: Optional[int] = typer.Option(None, help="Scale model input (default the grid minimum)."),
    scans: Optional[int] = typer.Option(None, help="Scans the scale model reads (default all)."),
    labels: Optional[Path] = typer.Option(None, help="Reuse this scale_labels.parquet: retrain only the scale model."),
    epochs: int = typer.Option(12, help="Scale model epochs."),
    backbone_arch: str = typer.Option("resnet_tiny"),
    resolution: int = typer.Option(112, help="Shard backbones' train resolution."),
    backbone_epochs: int = typer.Option(20),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
) -> None:
    """Cross-validated scale labels and the scale model, with label statistics and per-resolution AUC."""
    from dynres.io.store import open_store
    from dynres.study.scale import ScaleConfig, train_scale

    bb = _train_config(backbone_arch, resolution, backbone_epochs, batch_size, "adamw", None, 0.1, seed,
                       backbone_init, False)
    cfg = ScaleConfig(folds=folds, cheap=cheap, splits=splits, crops=_floats(crops), grid=_ints(grid), backbone=bb, arch=arch,
                      init=str(init) if init else None,
                      resolution=scale_resolution, scans=scans, epochs=epochs, batch_size=batch_size, seed=seed,
                      labels=str(labels) if labels else None)
    result = train_scale(open_store(store), out, cfg)
    for row in result["auc"]:
        console.print(f"AUC @{row['resolution']}: {row['auc'] if row['auc'] is None else round(row['auc'], 3)}")
    console.print(f"wrote {result['scale_model']} and {out / 'scale.md'}")


@eval_app.command("static")
def eval_static_cmd(
    checkpoint: Path = typer.Argument(..., help="Backbone checkpoint (model.pt or its folder)."),
    store: str = typer.Argument(..., help="Evaluation store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="static.json/.md + static_images.parquet."),
    grid: Optional[str] = typer.Option(None, help="Resolutions (default: the paper's ratios around train res)."),
    crops: str = typer.Option("0.25,0.56,0.75,1.0", help="Center-crop areas."),
    exact: bool = typer.Option(False, "--exact", help="Decode every view (default: one decode per image)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Read calibrated prefixes (`dynres calibrate`)."),
    backend: str = typer.Option("auto", help="Run the model on 'ort' (ONNX Runtime), 'eager' PyTorch, or 'auto'."),
) -> None:
    """Top-1 accuracy and GFLOPs for every resolution x crop (Table I layout)."""
    from dynres.io.store import open_store
    from dynres.study.static import EvalConfig, run_static

    scans = None
    if policy:
        from dynres.policy.calibration import load_policy

        scans = load_policy(policy)
    result = run_static(checkpoint, open_store(store), out, EvalConfig(_ints(grid), _floats(crops), exact=exact,
                                                                       limit=limit, backend=backend), scans=scans)
    for row in result["best"]:
        console.print(f"crop {row['crop']:.2f}: best static {row['resolution']} px, {row['accuracy']:.1f}%")
    console.print(f"wrote {out / 'static.md'}")


@eval_app.command("dynamic")
def eval_dynamic_cmd(
    backbone: Path = typer.Argument(..., help="Backbone trained on the full train set."),
    scale_model: Path = typer.Argument(..., help="Scale model checkpoint (from `dynres train scale`)."),
    store: str = typer.Argument(..., help="Evaluation store."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="dynamic.json/.md/.png (reuses static results here)."),
    crops: str = typer.Option("0.25,0.56,0.75,1.0", help="Center-crop areas."),
    scans: Optional[int] = typer.Option(None, help="Scans the scale model reads (default: its checkpoint's)."),
    cost_json: Optional[Path] = typer.Option(None, help="JSON {resolution: latency} for the cost-aware rule."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images."),
) -> None:
    """Scale model + backbone vs every static resolution and the oracle; cost-aware λ sweep."""
    from dynres.io.store import open_store
    from dynres.study.dynamic import DynamicConfig, load_cost_table, run_dynamic
    from dynres.study.static import EvalConfig

    cfg = DynamicConfig(scans=scans, cost_table=load_cost_table(cost_json) if cost_json else None)
    result = run_dynamic(backbone, scale_model, open_store(store), out, cfg,
                         EvalConfig(crops=_floats(crops), limit=limit))
    for s in result["summary"]:
        console.print(f"crop {s['crop']:.2f}: best static {s['best_static_resolution']} px {s['best_static_accuracy']:.1f}% "
                      f"{s['best_static_gflops']:.3f} GF | dynamic {s['dynamic_accuracy']:.1f}% "
                      f"{s['dynamic_gflops']:.3f} GF | cost-aware λ={s['lambda']} "
                      f"{s['cost_aware_savings_pct'] if s['cost_aware_savings_pct'] is None else round(s['cost_aware_savings_pct'])}% fewer GF")
    console.print(f"wrote {out / 'dynamic.md'} and {out / 'dynamic.png'}")


@bench_app.command("serve")
def bench_serve_cmd(
    store: str = typer.Argument(..., help="Store directory (requests are store keys)."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    scale: Path = typer.Option(..., "--scale", help="Scale-model checkpoint."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Calibrated scans policy."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where serve_load.json/.md go."),
    latency_target_ms: float = typer.Option(1000.0, help="Target for the load-adaptive scenario."),
    overload: float = typer.Option(2.0, help="Burst rate as a multiple of the sustainable rate."),
    burst_s: float = typer.Option(30.0, help="Burst length (seconds)."),
    calm_s: float = typer.Option(8.0, help="Calm phase before and after (seconds, half the sustainable rate)."),
    max_queue: int = typer.Option(32, help="Requests in flight before 503."),
    lam_max: float = typer.Option(1.0, "--lambda-max", help="Ceiling of the load-adaptive λ."),
    kernels: str = typer.Option("tuned", help="eager or tuned."),
) -> None:
    """Loopback load test of `dynres serve`: a burst at 2x the sustainable rate, fixed λ vs load-adaptive λ."""
    from dynres.bench.serve import LoadTestConfig, run_load_test

    cfg = LoadTestConfig(latency_target_ms=latency_target_ms, overload=overload, burst_s=burst_s, calm_s=calm_s,
                         max_queue=max_queue, lam_max=lam_max, kernels=kernels)
    p = run_load_test(store, str(model), str(scale), out, str(policy) if policy else None, cfg)
    for name, row in p["scenarios"].items():
        console.print(f"{name:>16}: {row['ok']} ok, {row['rejected_503']} x 503, {row['other']} other; "
                      f"p99 {row['p99_ms']:.0f} ms; top-1 {row['accuracy']}; mean λ {row['mean_lambda']}; "
                      f"RSS {row['rss_start_mb']:.0f} → max {row['rss_max_mb']:.0f} MB")
    console.print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.md'}")


index_app = typer.Typer(no_args_is_help=True, help="Per-image indexes stored beside a store's manifest.")
app.add_typer(index_app, name="index")


@index_app.command("quality")
def index_quality_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    resolutions: str = typer.Option("112,168,224,280,336,392,448",
                                    help="Comma-separated resolutions (the backbone grid and the scale model's)."),
    crop: float = typer.Option(0.875, help="Center-crop side ratio of the compared views."),
    workers: int = typer.Option(0, help="Processes (0: every core)."),
    out: Path = typer.Option(Path("runs/index"), "--out", help="Where quality_index.json/.md go."),
) -> None:
    """SSIM of every scan prefix vs the full file, per image and resolution → STORE/quality.parquet (resumable)."""
    from dynres.policy.quality import QualityConfig, build_quality_index, quality_markdown
    from dynres.records import write_records

    cfg = QualityConfig(tuple(int(r) for r in resolutions.split(",")), crop, workers)
    rep = build_quality_index(store, cfg)
    write_records(out, "quality_index", rep, quality_markdown(rep))
    cost = rep["ms_per_image_per_resolution"]
    console.print(f"indexed {rep['computed']} images ({rep['reused']} reused) in {rep['seconds']:.1f} s; per image "
                  f"per resolution: decode {cost['decode']:.1f} ms, SSIM {cost['ssim']:.1f} ms (one core)")
    console.print(f"wrote {rep['index']} and {out / 'quality_index.json'}")


@app.command()
def calibrate(
    store: str = typer.Argument(..., help="Store (with a quality index) the policy is for."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    out: Path = typer.Option(Path("runs/calibrate"), "--out", help="Records: calibration.json/.md + Figure 6 PNG."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Policy file (default OUT/policy.json)."),
    calib_store: Optional[str] = typer.Option(None, "--calib-store",
                                              help="Calibrate on this store (e.g. train); all of STORE is held out."),
    target: float = typer.Option(0.05, help="Max accuracy loss (points) vs reading every scan."),
    max_images: int = typer.Option(10_000, help="Calibration images at most."),
    holdout: float = typer.Option(0.5, help="Share of STORE held out for the report (without --calib-store)."),
    resolutions: Optional[str] = typer.Option(None, help="Comma-separated (default: every indexed resolution)."),
    crops: str = typer.Option("0.25,0.56,0.75,1.0", help="Crop areas of the held-out table (index crop added)."),
    search_crops: Optional[str] = typer.Option(
        None, help="Crop areas whose lost answers the search also holds to the target (default: the index's only)."),
    batch_size: int = typer.Option(64, help="Inference batch size."),
    seed: int = typer.Option(0, help="Seed of the hashed split and of the calibration sample."),
    scale_model: Optional[Path] = typer.Option(None, "--scale-model",
                                               help="Also measure the dynamic pipeline (Table III/IV dynamic row)."),
    backend: str = typer.Option("auto", help="Run the model on 'ort' (ONNX Runtime), 'eager' PyTorch, or 'auto'."),
) -> None:
    """Binary-search SSIM thresholds per resolution; save the read policy; Table III/IV + Figure 6 records."""
    from dynres.io.store import open_store
    from dynres.study.calibrate import CalibrationConfig
    from dynres.study.calibrate import calibrate as run_calibration

    cfg = CalibrationConfig(target=target, max_images=max_images, holdout_fraction=holdout, seed=seed,
                            resolutions=_ints(resolutions),
                            crops=_floats(crops), search_crops=_floats(search_crops) if search_crops else (),
                            batch_size=batch_size, backend=backend)
    rec = run_calibration(open_store(store), model, out, cfg, open_store(calib_store) if calib_store else None,
                          policy, scale_model)
    for s in rec["search"]:
        console.print(f"{s['resolution']:>4}px  threshold {s['threshold']:.4f}")
    sm = rec["summary"]
    console.print(f"held-out: best resolution {sm['best_resolution']} saves {sm['best_read_savings']:.1%} of bytes; "
                  f"max loss {sm['max_loss']:.3f} points; {sm['cells_over_target']}/{sm['cells']} cells over target")
    if "dynamic_read_savings" in sm:
        console.print(f"dynamic pipeline: read savings {sm['dynamic_read_savings']:.1%} (scale model's read included), "
                      f"loss {sm['dynamic_loss']:.3f} points")
    console.print(f"wrote {rec['policy']} and {out / 'calibration.md'}")


# --- kernels: resolution-specialized implementations (Table II, Figure 7) -------------------------------------


def _kernel_config(resolutions: str, batches: str, threads: int, backends: str, runs: int, warmup: int,
                   tolerance: float, tvm_trials: int, cache_dir: Optional[Path]):
    from dynres.runtime.kernels import TuneConfig, parse_backends, parse_ints

    extra = {"cache_dir": cache_dir} if cache_dir else {}
    return TuneConfig(resolutions=parse_ints(resolutions, "--resolutions"), batch_sizes=parse_ints(batches, "--batches"),
                      threads=threads, backends=parse_backends(backends), runs=runs, warmup=warmup,
                      tolerance=tolerance, tvm_trials=tvm_trials, **extra)


def _print_tuned(rows: list) -> None:
    eager = {(r["model"], r["resolution"], r["batch"]): r for r in rows if r["backend"] == "eager"}
    for r in (r for r in rows if r["backend"] == "tuned"):
        e = eager.get((r["model"], r["resolution"], r["batch"]))
        speed = f"{e['latency_ms'] / r['latency_ms']:.2f}x vs eager" if e and e.get("latency_ms") else ""
        console.print(f"{r['model']:>14} {r['resolution']:>4}px b{r['batch']:<3} {r['chosen']:>14} "
                      f"{r['latency_ms']:8.2f} ms  {r['gflops_per_s']:6.1f} GFLOP/s "
                      f"({100 * (r['fraction_of_gemm_peak'] or 0):.0f}% GEMM)  {speed}{'  cached' if r.get('cached') else ''}",
                      soft_wrap=True)


_TUNE_OPTS = dict(
    resolutions=typer.Option("112..448:56", help="'112,168,224' or '112..448:56' (inclusive, step)."),
    threads=typer.Option(2, help="Threads every backend gets (part of the cache key)."),
    backends=typer.Option("default", help="'default' (eager, channels_last, ort, ort_nospin, openvino), 'all' "
                          "(+ inductor, inductor_max, tvm) or a comma-separated list."),
    runs=typer.Option(20, help="Timed rounds per setting (alternating candidates; median)."),
    warmup=typer.Option(3, help="Untimed calls per candidate first."),
    tolerance=typer.Option(1e-4, help="Max relative error vs eager; worse candidates are rejected."),
    tvm_trials=typer.Option(0, help="MetaSchedule trials for the tvm backend (0: untuned)."),
    cache_dir=typer.Option(None, help="Tuning cache (default $DYNRES_CACHE/kernels or ~/.cache/dynres/kernels)."),
)


@app.command("tune")
def tune_cmd(
    model_ckpt: Optional[Path] = typer.Argument(None, help="Checkpoint (model.pt + model.json); or give --arch."),
    arch: Optional[str] = typer.Option(None, help="Architecture with random weights instead (same speed)."),
    num_classes: int = typer.Option(1000, help="Classes for --arch."),
    batches: str = typer.Option("1", help="Batch sizes, comma-separated."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="Where kernels.json/.md/-fig7.png go."),
    resolutions: str = _TUNE_OPTS["resolutions"], threads: int = _TUNE_OPTS["threads"],
    backends: str = _TUNE_OPTS["backends"], runs: int = _TUNE_OPTS["runs"], warmup: int = _TUNE_OPTS["warmup"],
    tolerance: float = _TUNE_OPTS["tolerance"], tvm_trials: int = _TUNE_OPTS["tvm_trials"],
    cache_dir: Optional[Path] = _TUNE_OPTS["cache_dir"],
) -> None:
    """Pick the fastest correct backend per resolution and batch size; cache it and its compiled artifact."""
    import torch

    from dynres.bench.kernels import run_and_report
    from dynres.errors import ConfigError
    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.nets import build_backbone

    if (model_ckpt is None) == (arch is None):
        raise ConfigError("tune", "give either MODEL_CKPT or --arch")
    torch.manual_seed(0)  # --arch: the same random weights every run, so the tuning cache (keyed by them) hits
    if model_ckpt:
        model, meta = load_checkpoint(model_ckpt)
        name = meta.arch
    else:
        model, name = build_backbone(arch, num_classes).eval(), arch
    cfg = _kernel_config(resolutions, batches, threads, backends, runs, warmup, tolerance, tvm_trials, cache_dir)
    rec = run_and_report({name: model}, cfg, out)
    _print_tuned(rec["rows"])
    console.print(f"GEMM peak {rec['limits']['gemm_gflops_per_s']:.0f} GFLOP/s; wrote {rec['paths']['md']}")


@bench_app.command("kernels")
def bench_kernels_cmd(
    models: str = typer.Option("resnet18,resnet50,mobilenet_v2", help="Architectures (random weights)."),
    batches: str = typer.Option("1", help="Latency-mode batch sizes over every resolution."),
    throughput_batch: int = typer.Option(8, help="Throughput-mode batch size (0: none) ..."),
    throughput_resolutions: str = typer.Option("112,168", help="... at these resolutions."),
    out: Path = typer.Option(Path("runs/bench-kernels"), "--out", help="Where kernels.json/.md/-fig7.png go."),
    resolutions: str = _TUNE_OPTS["resolutions"], threads: int = _TUNE_OPTS["threads"],
    backends: str = _TUNE_OPTS["backends"], runs: int = _TUNE_OPTS["runs"], warmup: int = _TUNE_OPTS["warmup"],
    tolerance: float = _TUNE_OPTS["tolerance"], tvm_trials: int = _TUNE_OPTS["tvm_trials"],
    cache_dir: Optional[Path] = _TUNE_OPTS["cache_dir"],
) -> None:
    """Table II (latency per resolution per backend, tuned vs eager) + Figure 7 (GFLOP/s, fraction of peak)."""
    import dataclasses

    import torch

    from dynres.bench.kernels import run_and_report
    from dynres.model.nets import build_backbone
    from dynres.runtime.kernels import parse_ints

    cfg = _kernel_config(resolutions, batches, threads, backends, runs, warmup, tolerance, tvm_trials,
                         cache_dir or out / "cache")
    extra = [dataclasses.replace(cfg, resolutions=parse_ints(throughput_resolutions, "--throughput-resolutions"),
                                 batch_sizes=(throughput_batch,))] if throughput_batch > 0 else []
    def seeded(name: str) -> torch.nn.Module:  # same random weights every run, whatever the model list
        torch.manual_seed(0)  # (the tuning cache is keyed by them, so a rerun hits it)
        return build_backbone(name, 1000).eval()

    nets = {name: seeded(name) for name in models.split(",") if name.strip()}
    rec = run_and_report(nets, cfg, out, extra=extra)
    _print_tuned(rec["rows"])
    lim = rec["limits"]
    console.print(f"GEMM peak {lim['gemm_gflops_per_s']:.0f} GFLOP/s, FMA ceiling "
                  f"{lim.get('fma_gflops_per_s') or float('nan'):.0f} GFLOP/s; wrote {rec['paths']['md']}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except DynresError as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(2)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
