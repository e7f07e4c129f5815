"""Resolution-specialized kernels: pick the fastest correct implementation per (model, resolution, batch, threads).

The paper's point (Table II, Figure 7): no single library is fastest at every resolution, so a dynamic-resolution
pipeline only saves time if each resolution runs on its own winner. :func:`tune` builds every backend of the
registry (:mod:`dynres.runtime.backends`), rejects any whose output differs from eager PyTorch, times the survivors
alternately (machine drift hits all alike), keeps the fastest, and caches the choice and its compiled artifact.
:func:`load` returns the tuned callable later without timing anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynres._ui import log, track
from dynres.errors import BackendError, ConfigError
from dynres.model.nets import gflops as model_gflops
from dynres.paper import PAPER_GRID
from dynres.records import cpu_model, machine_info
from dynres.runtime.backends import BACKENDS, Kernel, build_kernel, measure_limits

__all__ = ["TuneConfig", "Kernel", "tune", "load", "cache_key", "measure_limits", "rel_error",
           "default_backends"]

DEFAULT_RESOLUTIONS = PAPER_GRID
INDEX = "index.json"


def default_backends() -> tuple[str, ...]:
    """The backends that build quickly; the slow compilers (inductor, TVM) are opt-in."""
    return tuple(name for name, b in BACKENDS.items() if b.default)


def default_cache_dir() -> Path:
    root = os.environ.get("DYNRES_CACHE")
    return Path(root) / "kernels" if root else Path.home() / ".cache" / "dynres" / "kernels"


@dataclass(frozen=True)
class TuneConfig:
    """What to tune and how carefully to time it. ``max_seconds`` caps the timed rounds per setting so large
    resolutions of slow backends do not dominate; at least ``min_runs`` rounds always run."""

    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    batch_sizes: tuple[int, ...] = (1,)
    threads: int = 2
    warmup: int = 3
    runs: int = 20
    min_runs: int = 5
    max_seconds: float = 12.0
    backends: tuple[str, ...] = field(default_factory=default_backends)
    tolerance: float = 1e-4
    tvm_trials: int = 0
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError("backends", f"unknown {unknown}; known: {', '.join(BACKENDS)}")
        if not self.resolutions or min(self.resolutions) < 16 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("grid", "need resolutions >= 16 and batch sizes >= 1")
        if self.threads < 1 or self.runs < 1 or self.min_runs < 1 or self.tolerance <= 0:
            raise ConfigError("timing", "threads, runs, min_runs must be >= 1 and tolerance > 0")


# --- cache keys -------------------------------------------------------------------------------------------------

def weights_hash(model: nn.Module) -> str:
    """sha256 of architecture name and every parameter/buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_key(weights: str, resolution: int, batch: int, threads: int) -> str:
    """The tuning cache key: weights hash, shape, threads, CPU model and library versions."""
    blob = json.dumps({"weights": weights, "resolution": resolution, "batch": batch, "threads": threads,
                       "cpu": cpu_model(), "versions": machine_info()["versions"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _read_index(cache_dir: Path) -> dict:
    path = Path(cache_dir) / INDEX
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackendError(path, f"tuning cache index is unreadable ({err}); delete it to re-tune") from err


def _write_entry(cache_dir: Path, key: str, entry: dict) -> None:
    index = _read_index(cache_dir)  # re-read: another process may have added keys meanwhile
    index[key] = entry
    tmp = Path(cache_dir) / f"{INDEX}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, Path(cache_dir) / INDEX)


# --- measurement ------------------------------------------------------------------------------------------------

def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: scale-free, and a wrong shape counts as infinitely wrong."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def time_alternating(kernels: dict[str, Kernel], x: torch.Tensor, config: TuneConfig) -> dict[str, list[float]]:
    """Seconds per call for each kernel, interleaved round by round (rotating the order) so that load from
    other processes and frequency drift hit every candidate alike."""
    names = list(kernels)
    for name in names:  # builds already ran each kernel twice; slow ones stop warming after a tenth of the budget
        t0 = time.perf_counter()
        for _ in range(config.warmup):
            kernels[name](x)
            if time.perf_counter() - t0 > config.max_seconds / 10:
                break
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(config.runs):
        if r >= config.min_runs and time.perf_counter() - start > config.max_seconds:
            break
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            kernels[name](x)
            times[name].append(time.perf_counter() - t0)
    return times


def _row(model_name: str, resolution: int, batch: int, backend: str, gflops: float, gemm_peak: float,
         status: str, seconds: Sequence[float] = (), rel_err: float | None = None, reason: str = "",
         build_s: float | None = None, chosen: str | None = None) -> dict:
    latency = statistics.median(seconds) if seconds else None
    q = statistics.quantiles(seconds, n=4) if len(seconds) >= 2 else None
    rate = gflops / latency if latency else None
    return {"model": model_name, "resolution": resolution, "batch": batch, "backend": backend,
            "latency_ms": latency * 1e3 if latency else None,
            "latency_iqr_ms": (q[2] - q[0]) * 1e3 if q else None, "runs": len(seconds),
            "per_image_ms": latency * 1e3 / batch if latency else None,
            "gflops": gflops, "gflops_per_s": rate,
            "fraction_of_gemm_peak": rate / gemm_peak if rate and gemm_peak else None,
            "rel_err": rel_err, "status": status, "reason": reason, "build_s": build_s, "chosen": chosen}


# --- tuning -----------------------------------------------------------------------------------------------------

def tune_one(model: nn.Module, resolution: int, batch: int, config: TuneConfig, *, key: str,
             model_name: str = "model", gemm_peak: float = 0.0) -> dict:
    """Build, check, time and choose for one setting; returns the cache entry (rows + chosen backend)."""
    artifacts = Path(config.cache_dir) / "artifacts" / key
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(resolution))
    gflops = model_gflops(model, resolution) * batch  # conv/matmul FLOPs scale with the batch
    with torch.inference_mode():
        ref = model.eval()(x).float()
    rows, candidates, errors = [], {}, {}
    for name in dict.fromkeys(("eager",) + tuple(config.backends)):  # eager always runs: it is the baseline
        try:
            kernel = build_kernel(name, model, x, config.threads, artifacts / name, trials=config.tvm_trials)
            err = rel_error(kernel(x), ref)
        except BackendError as exc:
            status = "missing" if BACKENDS[name].missing() else "failed"
            rows.append(_row(model_name, resolution, batch, name, gflops, gemm_peak, status, reason=exc.reason))
            log(f"skip {name} @ {resolution}px b{batch}: {exc.reason}")
            continue
        errors[name] = (err, kernel.build_s)
        if err <= config.tolerance:
            candidates[name] = kernel
        else:
            reason = f"rel. error {err:.2e} > tolerance {config.tolerance:.0e}"
            rows.append(_row(model_name, resolution, batch, name, gflops, gemm_peak, "rejected", rel_err=err,
                             reason=reason, build_s=kernel.build_s))
            log(f"reject {name} @ {resolution}px b{batch}: {reason}")
    if not candidates:
        raise BackendError(model_name, f"no backend produced correct output at {resolution}px, batch {batch}")
    times = time_alternating(candidates, x, config)
    for name, secs in times.items():
        rows.append(_row(model_name, resolution, batch, name, gflops, gemm_peak, "ok", secs, errors[name][0],
                         build_s=errors[name][1]))
    best = min(times, key=lambda n: statistics.median(times[n]))
    rows.append(_row(model_name, resolution, batch, "tuned", gflops, gemm_peak, "ok", times[best], errors[best][0],
                     chosen=best))
    for name in BACKENDS:  # keep only the winner's artifact on disk (ONNX files are ~100 MB)
        if name != best:
            shutil.rmtree(artifacts / name, ignore_errors=True)
    return {"model": model_name, "resolution": resolution, "batch": batch, "threads": config.threads,
            "chosen": best, "artifact_dir": str(Path("artifacts") / key / best), "tvm_trials": config.tvm_trials,
            "backends": sorted(set(config.backends) | {"eager"}), "rows": rows, "created": time.time()}


def tune(model: nn.Module, config: TuneConfig = TuneConfig(), *, model_name: str = "model",
         gemm_peak: float | None = None, progress: bool = True) -> list[dict]:
    """Tune every (resolution, batch) of the grid; cached settings are returned without building anything.

    Returns JSON-ready rows, one per backend measured (incl. eager and rejected/missing ones) plus ``tuned``;
    rows read from the cache carry ``cached: True``. ``gemm_peak`` (GFLOP/s) is measured once if not given.
    """
    Path(config.cache_dir).mkdir(parents=True, exist_ok=True)
    model = model.eval()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        weights = weights_hash(model)
        settings = [(r, b) for b in config.batch_sizes for r in config.resolutions]
        index = _read_index(config.cache_dir)
        rows: list[dict] = []
        for resolution, batch in track(settings, len(settings), f"tune {model_name}", progress):
            key = cache_key(weights, resolution, batch, config.threads)
            entry = index.get(key)
            if entry and _entry_covers(entry, config):
                rows += [{**row, "cached": True} for row in entry["rows"]]
                continue
            if gemm_peak is None:
                gemm_peak = measure_limits(config.threads, fma=False)["gemm_gflops_per_s"]
            entry = tune_one(model, resolution, batch, config, key=key, model_name=model_name,
                             gemm_peak=gemm_peak)
            _write_entry(config.cache_dir, key, entry)
            rows += [{**row, "cached": False} for row in entry["rows"]]
        return rows
    finally:
        torch.set_num_threads(old_threads)


def _entry_covers(entry: dict, config: TuneConfig) -> bool:
    """A cached choice answers this request if it considered every backend asked for (same TVM budget), its
    winner is one of them (then it is also the winner among them) and its artifact is still on disk."""
    if not set(config.backends) <= set(entry.get("backends", ())):
        return False
    if entry.get("chosen") not in set(config.backends) | {"eager"}:
        return False
    if "tvm" in config.backends and entry.get("tvm_trials") != config.tvm_trials:
        return False
    return (Path(config.cache_dir) / entry["artifact_dir"]).exists()


def tuned_batches(model: nn.Module, resolution: int, threads: int, batches: Iterable[int],
                  cache_dir: Path | None = None) -> tuple[int, ...]:
    """Which of ``batches`` have a tuned kernel cached for this (weights, resolution, threads, CPU, versions)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    index = _read_index(cache_dir) if cache_dir.exists() else {}
    if not index:
        return ()
    weights = weights_hash(model)
    return tuple(b for b in batches if cache_key(weights, resolution, b, threads) in index)


def load(model: nn.Module, resolution: int, batch: int = 1, threads: int = 2,
         cache_dir: Path | None = None, spinning: bool = True) -> Kernel:
    """The tuned callable for one setting, rebuilt from its saved artifact without timing. Falls back to eager
    PyTorch with a warning when nothing is tuned for this exact (weights, shape, threads, CPU, versions).

    ``spinning=False`` runs an ONNX Runtime winner with sleeping worker threads (same model file): for callers whose
    own threads share the cores, as the engines' decode workers do (measurements: docs/bench-pipeline.md)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    example = torch.zeros(batch, 3, resolution, resolution)
    key = cache_key(weights_hash(model), resolution, batch, threads)
    entry = _read_index(cache_dir).get(key) if cache_dir.exists() else None
    if entry is not None:
        name = "ort_nospin" if entry["chosen"] == "ort" and not spinning else entry["chosen"]
        try:
            return build_kernel(name, model, example, threads, cache_dir / entry["artifact_dir"],
                                trials=entry.get("tvm_trials", 0))
        except BackendError as err:
            warnings.warn(f"tuned kernel for {resolution}px batch {batch} failed to load ({err}); using eager",
                          stacklevel=2)
    else:
        warnings.warn(f"no tuned kernel for {resolution}px batch {batch} threads {threads} in {cache_dir}; "
                      "using eager PyTorch (run `dynres tune`)", stacklevel=2)
    return build_kernel("eager", model, example, threads, cache_dir / "eager")
