"""`dynres bench pipeline`: the end-to-end engine against the baselines, in one run and as ratios.

(a) ``baseline``: the common baseline — full read, full Pillow decode + torchvision resize, eager PyTorch at the
backbone's train resolution (the paper's 224); (b) ``static_tuned``: the best static resolution with tuned kernels
and calibrated reads; (c) ``dynamic``: scale model → per-image resolution, tuned kernels, calibrated reads, the
backbone fetching only the range it misses, each prefix decoded once and its views resized from it; (c')
``dynamic_read_ahead``: the same, but each image's longest policy prefix is read up front, so it is read and decoded
once (more bytes, less CPU); (c'') ``dynamic_exact``: every view decoded at its own DCT scale, pixel-identical to
what ``dynres eval`` and calibration measured (the paper's pipeline: two decodes per image). All of them
run the same images through the same pipelined engine (same workers, batch size, threads), after a warm-up run
that builds every kernel, so the numbers differ only by what the modes do.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dynres._ui import status_bar
from dynres.errors import ConfigError
from dynres.io.store import Store, StoreLike
from dynres.model.checkpoint import ModelMeta
from dynres.model.nets import gflops
from dynres.paper import DEFAULT_CROP_SIDE
from dynres.policy.scans import Scans
from dynres.records import markdown_table, write_records
from dynres.runtime.engine import Engine, PipelineConfig
from dynres.runtime.runners import EagerRunner, Runner, ScaleStage, load_scale, make_runner

MODES = ("baseline", "static_tuned", "dynamic", "dynamic_read_ahead", "dynamic_exact")
DYNAMIC = {  # the dynamic variants: how each reads and decodes
    "dynamic": {"read_ahead": False, "decode_once": True},
    "dynamic_read_ahead": {"read_ahead": True, "decode_once": True},
    "dynamic_exact": {"read_ahead": False, "decode_once": False},
}
COLUMNS = ("images_per_s", "accuracy", "bytes_per_image", "p50_ms", "p99_ms")


@dataclass(frozen=True)
class PipelineBenchConfig:
    images: int = 0  # 0: every image of the store
    batch_size: int = 16
    workers: int = 2
    torch_threads: int = 0  # eager PyTorch (0: torch's default)
    kernel_threads: int = 2  # the tuned kernels' setting (part of their cache key; `dynres tune` defaults to 2)
    crop_side: float = DEFAULT_CROP_SIDE
    baseline_resolution: int | None = None  # None: the backbone's train resolution
    static_resolution: int | None = None  # None: the most accurate grid resolution on ``sweep_images``
    sweep_images: int = 0  # 0: every bench image, so (b)'s resolution and (c)'s λ are chosen on the same data
    lam: float | None = None  # None: per dynamic variant, the largest of ``lambdas`` within ``tolerance`` of (b)
    lambdas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
    tolerance: float = 0.5  # points below (b)'s sweep accuracy a picked λ may lose
    bias: tuple[float, ...] | None = None  # the dynamic rule's term per grid resolution (the guard's; None: 0)
    # the scale model's p(r) recalibrated, (a, c) per grid resolution (the guard's; runners.recalibrated_probs)
    recalibration: tuple[tuple[float, float], ...] | None = None
    kernels: str = "tuned"
    warmup: int = 32
    repeats: int = 3  # timed runs per mode, interleaved across modes; each row is its median run by images/s
    # more rounds, up to this many (0: exactly ``repeats``), while the reported dynamic variant and the static row
    # are within ``close`` of each other in images/s: a few sub-second runs cannot tell 3% apart
    max_repeats: int = 0
    close: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.images, self.sweep_images, self.warmup, self.tolerance) < 0:
            raise ConfigError("bench pipeline", "images, sweep_images, warmup and tolerance must be >= 0")
        if self.lam is None and not self.lambdas:
            raise ConfigError("bench pipeline", "no λ to sweep: give lambdas or a fixed lam")
        if not 0 < self.crop_side <= 1:
            raise ConfigError("bench pipeline", f"crop_side must be in (0, 1], got {self.crop_side}")
        if self.max_repeats < 0 or self.close < 0:
            raise ConfigError("bench pipeline", "max_repeats and close must be >= 0")


@dataclass(frozen=True)
class _Setup:
    """What every mode shares: the store, the backbone (eager and as ``tuned``), the scale stage, the policy and
    the engine settings all modes run with."""

    store: StoreLike
    model: torch.nn.Module
    meta: ModelMeta
    tuned: Runner
    stage: ScaleStage
    policy: Scans
    base: dict
    scale_gflops: float  # the scale model's GFLOPs at its resolution (every dynamic image pays them)

    def gflops(self, name: str, histogram: dict) -> float:
        """Mean GFLOPs per image of a mode's run, from its resolution histogram: the backbone at each image's
        resolution, plus the scale model for a dynamic variant (FlopCounterMode counts, as the guard's)."""
        costs = dict(zip(self.stage.grid, self.stage.costs))
        n = sum(histogram.values())
        backbone = sum(k * (costs[int(r)] if int(r) in costs else gflops(self.model, int(r)))
                       for r, k in histogram.items()) / n if n else 0.0
        return backbone + (self.scale_gflops if name in DYNAMIC else 0.0)

    def engine(self, **mode) -> Engine:
        """(b) or a dynamic variant (``lam`` in ``mode``: the scale stage chooses) on the tuned kernels."""
        return Engine(self.store, self.tuned, scale=self.stage if "lam" in mode else None, policy=self.policy,
                      classes=self.meta.classes, config=PipelineConfig(**mode, **self.base))

    def baseline(self, resolution: int) -> Engine:
        """(a): eager PyTorch, full reads and the full decode."""
        return Engine(self.store, EagerRunner(self.model), classes=self.meta.classes,
                      config=PipelineConfig(resolution=resolution, baseline=True, **self.base))


def _setup(store_path: str, backbone: str, scale: str, policy: str | None, cfg: PipelineBenchConfig) -> _Setup:
    """Open the store, load the models and the policy, and build every kernel a timed run may need."""
    from dynres.io.store import open_store
    from dynres.model.checkpoint import load_checkpoint

    store = open_store(store_path)
    model, meta = load_checkpoint(backbone)
    threads = cfg.kernel_threads if cfg.kernels == "tuned" else cfg.torch_threads or torch.get_num_threads()
    tuned = make_runner(model, cfg.kernels, cfg.batch_size, threads)
    stage = load_scale(scale, model, cfg.kernels, cfg.batch_size, threads, bias=cfg.bias,
                       recalibration=cfg.recalibration)
    scale_gflops = gflops(load_checkpoint(scale)[0], stage.resolution)
    calibrated = None
    if policy is not None:
        from dynres.policy.calibration import load_policy

        calibrated = load_policy(policy)
    tuned.warm(stage.grid)
    stage.runner.warm([stage.resolution])
    base = dict(batch_size=cfg.batch_size, workers=cfg.workers, torch_threads=cfg.torch_threads,
                crop_side=cfg.crop_side)
    return _Setup(store, model, meta, tuned, stage, calibrated, base, scale_gflops)


def _sample(keys: list[str], n: int, seed: int) -> list[str]:
    if not n or n >= len(keys):
        return list(keys)
    return sorted(random.Random(seed).sample(keys, n))


def _row(summary: dict) -> dict:
    return {k: summary[k] for k in (*COLUMNS, "images", "seconds", "read_fraction", "resolution_histogram",
                                    "scale_overhead", "work_s", "top5_accuracy")}


def _operating_points(setup: _Setup, sweep_keys: list[str], cfg: PipelineBenchConfig,
                      progress: bool) -> tuple[int, list[dict], dict, list[dict]]:
    """(b)'s resolution and each dynamic variant's λ, chosen on ``sweep_keys`` unless the config fixes them:
    the most accurate grid resolution, then per variant (what it reads changes its inputs a little) the largest λ
    whose accuracy is within the tolerance of (b)'s. Returns the resolution, its sweep, the λs and their sweep."""
    lams, lam_sweep, sweep = dict.fromkeys(DYNAMIC, cfg.lam), [], []
    static_r, grid = cfg.static_resolution, setup.stage.grid
    runs = (len(grid) if static_r is None else int(cfg.lam is None)) \
        + (len(DYNAMIC) * len(cfg.lambdas) if cfg.lam is None else 0)
    if not runs:  # the config fixes both (the study's guard chose them): nothing to sweep, no empty bar
        return static_r, sweep, lams, lam_sweep
    with status_bar(runs, f"sweep {len(sweep_keys)} images", progress) as done:
        def on_sweep(label: str, **mode) -> dict:  # one run over the sweep sample
            summary = setup.engine(**mode).run(sweep_keys, progress=False).summary
            done(label)
            return summary

        if static_r is None:
            for r in grid:
                s = on_sweep(f"(b) @{r}", resolution=r)
                sweep.append({"resolution": r, "accuracy": s["accuracy"], "images_per_s": s["images_per_s"]})
            static_r = max(sweep, key=lambda row: (row["accuracy"] or 0.0, -row["resolution"]))["resolution"]
        if cfg.lam is None:
            target = next((row["accuracy"] for row in sweep if row["resolution"] == static_r), None)
            if target is None:
                target = on_sweep(f"(b) @{static_r}", resolution=static_r)["accuracy"]
            for name, variant in DYNAMIC.items():
                rows = []
                for value in cfg.lambdas:
                    s = on_sweep(f"{name} λ={value}", lam=value, **variant)
                    rows.append({"mode": name, "lam": value, "accuracy": s["accuracy"],
                                 "images_per_s": s["images_per_s"],
                                 "mean_resolution": _mean_resolution(s["resolution_histogram"])})
                ok = [row for row in rows if (row["accuracy"] or 0.0) >= (target or 0.0) - cfg.tolerance]
                lams[name] = max(ok, key=lambda row: row["lam"])["lam"] if ok else 0.0
                lam_sweep += rows
    return static_r, sweep, lams, lam_sweep


def _time_modes(store: Store, engines: dict[str, Engine], keys: list[str], cfg: PipelineBenchConfig,
                progress: bool) -> dict[str, dict]:
    """Each mode's median timed run over ``keys``, after a warm-up run of every mode: ``cfg.repeats`` rounds, then
    more (up to ``cfg.max_repeats``) while :func:`_undecided`. The rule that stops is blind to which side leads,
    so it sharpens the comparison without favouring either mode."""
    for engine in engines.values():
        engine.run(keys[: cfg.warmup], progress=False)  # page cache, allocator, lazily built kernels
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    repeats = max(1, cfg.repeats)
    most = max(repeats, cfg.max_repeats)
    label = f"time {len(engines)} modes x {repeats}" + (f" (up to {most} while close)" if most > repeats else "")
    with status_bar(repeats * len(engines), label, progress) as done:
        for round_ in range(most):  # round robin: machine drift hits every mode alike
            if round_ >= repeats and not _undecided({n: _median_run(r) for n, r in runs.items()}, cfg):
                break
            for i, (name, engine) in enumerate(engines.items()):
                store.reset_stats()
                runs[name].append(_row(engine.run(keys, progress=False).summary))
                done(name, total=(round_ + 1) * len(engines) if round_ >= repeats and i == 0 else None)
    return {name: _median_run(r) for name, r in runs.items()}


def _undecided(rows: dict[str, dict], cfg: PipelineBenchConfig) -> bool:
    """Whether the dynamic variant the record will report (:func:`dynamic_mode`) and the static row are within
    ``cfg.close`` of each other in images/s so far."""
    if "static_tuned" not in rows or not set(DYNAMIC) <= set(rows):
        return False
    ratio = rows[dynamic_mode(rows, cfg.tolerance)]["images_per_s"] / rows["static_tuned"]["images_per_s"]
    return abs(ratio - 1.0) < cfg.close


def dynamic_mode(rows: dict[str, dict], tolerance: float) -> str:
    """The dynamic variant the ratios use: the fastest that keeps the static row's accuracy within ``tolerance``
    (if none does, the most accurate one)."""
    static = rows["static_tuned"]["accuracy"] or 0.0
    ok = [m for m in DYNAMIC if (rows[m]["accuracy"] or 0.0) >= static - tolerance]
    return (max(ok, key=lambda m: rows[m]["images_per_s"]) if ok
            else max(DYNAMIC, key=lambda m: (rows[m]["accuracy"] or 0.0, rows[m]["images_per_s"])))


def measure_pipeline(store_path: str, backbone: str, scale: str, policy: str | None = None,
                     cfg: PipelineBenchConfig = PipelineBenchConfig(), progress: bool = True,
                     keys: list[str] | None = None) -> dict:
    """Choose (b)'s resolution and (c)'s λs, then time every mode on the same images (``keys``, default the whole
    store). Returns the measurements; :func:`pipeline_record` adds the ratios and targets."""
    setup = _setup(store_path, backbone, scale, policy, cfg)
    keys = _sample(list(setup.store.keys if keys is None else keys), cfg.images, cfg.seed)
    sweep_keys = _sample(keys, cfg.sweep_images, cfg.seed + 1)
    static_r, sweep, lams, lam_sweep = _operating_points(setup, sweep_keys, cfg, progress)
    baseline_r = cfg.baseline_resolution or setup.meta.train_resolution
    engines = {"baseline": setup.baseline(baseline_r), "static_tuned": setup.engine(resolution=static_r),
               **{name: setup.engine(lam=lams[name], **variant) for name, variant in DYNAMIC.items()}}
    rows = _time_modes(setup.store, engines, keys, cfg, progress)
    for name, row in rows.items():
        row["gflops"] = setup.gflops(name, row["resolution_histogram"])
    return {
        "store": str(store_path), "backbone": str(backbone), "scale_model": str(scale), "policy": policy,
        "images": len(keys), "config": asdict(cfg), "baseline_resolution": baseline_r,
        "static_resolution": static_r, "scale_resolution": setup.stage.resolution, "grid": list(setup.stage.grid),
        "static_sweep": sweep, "lams": lams, "bias": None if cfg.bias is None else list(cfg.bias),
        "recalibration": None if cfg.recalibration is None else [list(p) for p in cfg.recalibration],
        "lam_sweep": lam_sweep, "pipeline": rows,
    }


def pipeline_record(measured: dict, tolerance: float) -> dict:
    """The measurements with the ratios between modes and the issue's targets. The ratios use the fastest dynamic
    variant that keeps (b)'s accuracy within ``tolerance`` (if none does, the most accurate one); every variant's
    row is reported."""
    rows = measured["pipeline"]
    a, b = rows["baseline"], rows["static_tuned"]
    best = dynamic_mode(rows, tolerance)
    c = rows[best]
    ahead, fetch = rows["dynamic_read_ahead"], rows["dynamic"]
    ratios = {
        "dynamic_mode": best,
        "read_ahead_vs_dynamic_images_per_s": ahead["images_per_s"] / fetch["images_per_s"],
        "read_ahead_vs_dynamic_bytes": ahead["bytes_per_image"] / fetch["bytes_per_image"],
        "decode_once_vs_exact_images_per_s": fetch["images_per_s"] / rows["dynamic_exact"]["images_per_s"],
        "decode_once_minus_exact_accuracy": _diff(fetch["accuracy"], rows["dynamic_exact"]["accuracy"]),
        "dynamic_vs_baseline_images_per_s": c["images_per_s"] / a["images_per_s"],
        "dynamic_vs_static_images_per_s": c["images_per_s"] / b["images_per_s"],
        "dynamic_minus_baseline_accuracy": _diff(c["accuracy"], a["accuracy"]),
        "dynamic_minus_static_accuracy": _diff(c["accuracy"], b["accuracy"]),
        "dynamic_vs_baseline_bytes": c["bytes_per_image"] / a["bytes_per_image"],
        "scale_overhead": c["scale_overhead"],
    }
    targets = {
        "dynamic_3x_baseline_at_no_lower_accuracy": ratios["dynamic_vs_baseline_images_per_s"] >= 3
        and (ratios["dynamic_minus_baseline_accuracy"] or 0) >= 0,
        "dynamic_1.3x_static_within_0.5_points": ratios["dynamic_vs_static_images_per_s"] >= 1.3
        and (ratios["dynamic_minus_static_accuracy"] or 0) >= -0.5,
        "scale_overhead_at_most_10pct": ratios["scale_overhead"] <= 0.10,
    }
    return {**measured, "ratios": ratios, "targets": targets}


def run_bench_pipeline(store_path: str, backbone: str, scale: str, out: str | Path, policy: str | None = None,
                       cfg: PipelineBenchConfig = PipelineBenchConfig(), progress: bool = True,
                       keys: list[str] | None = None) -> dict:
    """(a), (b), (c) on the same images (``keys``, e.g. a split the scale model never saw; default the whole
    store): measure, record, and write ``pipeline.json`` / ``pipeline.md`` under ``out``."""
    payload = pipeline_record(measure_pipeline(store_path, backbone, scale, policy, cfg, progress, keys),
                              cfg.tolerance)
    write_records(out, "pipeline", payload, render_markdown(payload))
    return payload


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (its latencies and work with it), plus every run's images/s."""
    ordered = sorted(runs, key=lambda row: row["images_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "images_per_s_runs": [row["images_per_s"] for row in runs]}


def _mean_resolution(histogram: dict) -> float:
    n = sum(histogram.values())
    return sum(int(r) * k for r, k in histogram.items()) / n if n else 0.0


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else x - y


def render_markdown(p: dict) -> str:
    names = {"baseline": f"(a) baseline: full read + Pillow decode, eager @{p['baseline_resolution']}",
             "static_tuned": f"(b) best static @{p['static_resolution']}, tuned kernels, calibrated reads",
             "dynamic": f"(c) dynamic (scale model @{p['scale_resolution']}, λ={p['lams']['dynamic']})",
             "dynamic_read_ahead": f"(c') dynamic, read ahead (one read + one decode per image, "
                                   f"λ={p['lams']['dynamic_read_ahead']})",
             "dynamic_exact": f"(c'') dynamic, exact views (each decoded at its own scale, "
                              f"λ={p['lams']['dynamic_exact']})"}
    rows = [{"mode": names[m], **p["pipeline"][m]} for m in MODES if m in p["pipeline"]]
    columns = ["mode", *COLUMNS[:2], "gflops", *COLUMNS[2:], "read_fraction", "scale_overhead"]
    table = markdown_table(rows, columns, ["Mode", "Images/s", "Top-1 %", "GFLOPs/image", "Bytes/image", "p50 ms",
                                           "p99 ms", "Read fraction", "Scale overhead"])
    r = p["ratios"]
    best = r.get("dynamic_mode", "dynamic")
    hist = ", ".join(f"{k}: {v}" for k, v in p["pipeline"][best]["resolution_histogram"].items())
    lines = [
        f"# Pipeline benchmark ({p['images']} images, batch {p['config']['batch_size']}, "
        f"{p['config']['workers']} decode workers, kernels: {p['config']['kernels']})", "",
        f"Each row is the median of {p['config'].get('repeats', 1)} timed runs by images/s (modes interleaved).", "",
        table, "",
        f"- ratios below use {names[best].split(' (')[0]}: the fastest dynamic variant within "
        f"{p['config']['tolerance']} points of (b) (or the most accurate); read-ahead vs fetching the missing range: "
        f"{r['read_ahead_vs_dynamic_images_per_s']:.2f}x images/s, {r['read_ahead_vs_dynamic_bytes']:.2f}x bytes; "
        f"decode once vs exact views: {r['decode_once_vs_exact_images_per_s']:.2f}x images/s, "
        f"{_fmt(r['decode_once_minus_exact_accuracy'])} points",
        f"- (c)/(a) images/s: **{r['dynamic_vs_baseline_images_per_s']:.2f}x**, accuracy "
        f"{_fmt(r['dynamic_minus_baseline_accuracy'])} points, bytes {r['dynamic_vs_baseline_bytes']:.2f}x",
        f"- (c)/(b) images/s: **{r['dynamic_vs_static_images_per_s']:.2f}x**, accuracy "
        f"{_fmt(r['dynamic_minus_static_accuracy'])} points",
        f"- scale-model overhead (its read + decode + inference, share of the pipeline's work): "
        f"{100 * r['scale_overhead']:.1f}%",
        f"- dynamic resolutions: {hist}",
        "", "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in p["targets"].items()),
    ]
    if p["static_sweep"]:
        lines += ["", "## Static sweep (choosing (b))", "",
                  markdown_table(p["static_sweep"], ["resolution", "accuracy", "images_per_s"],
                                 ["Resolution", "Top-1 %", "Images/s"])]
    if p.get("lam_sweep"):
        lines += ["", f"## λ sweep (choosing (c): the largest λ within {p['config']['tolerance']} points of (b))", "",
                  markdown_table(p["lam_sweep"], ["mode", "lam", "accuracy", "images_per_s", "mean_resolution"],
                                 ["Variant", "λ", "Top-1 %", "Images/s", "Mean resolution"])]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"
