"""The fixed ``summary.json`` schema (docs/summary-schema.md), assembled from each stage's own records."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from dynres.io.store import Store
from dynres.records import machine_info
from dynres.study.calibrate import CalibrationConfig
from dynres.study.stages import Study


def kernel_rows(record: dict, model: str) -> list[dict]:
    """The batch-1 latency rows of a kernels record, named by ``model``."""
    rows = [r for r in record["rows"] if r.get("batch", 1) == 1 and r.get("latency_ms") is not None]
    return [{"model": model, "resolution": r["resolution"], "backend": r["backend"],
             "latency_ms": r["latency_ms"], "gflops_per_s": r.get("gflops_per_s")} for r in rows]


def _dynamic_rows(dyn: dict, cal: dict) -> list[dict]:
    savings = {r["crop"]: r["read_savings"] for r in cal.get("dynamic", [])}
    return [{"crop": r["crop"], "accuracy": r["accuracy"], "gflops": r["gflops"],
             "read_savings": savings.get(r["crop"]), "lambda": r.get("lambda")}
            for r in dyn["dynamic"] + dyn.get("cost_aware", [])]


def _pipeline_rows(pipe: dict) -> dict:
    return {m: {k: pipe["pipeline"][m].get(k) for k in ("images_per_s", "accuracy", "bytes_per_image", "p50_ms",
                                                         "p99_ms")}
            for m in pipe["pipeline"]}


def assemble_summary(study: Study, dyn: dict, cal: dict, kern: dict, kern_scale: dict, pipe: dict, io: dict,
                     samples: list[dict]) -> dict:
    """The summary from the records of the dynamic evaluation, calibration, kernels (backbone and scale model),
    pipeline and I/O benchmarks, plus the scale model's ``samples`` (:func:`scale_choices`)."""
    calibration = [{k: r[k] for k in ("resolution", "crop", "acc_full", "acc_calibrated", "read_savings")}
                   for r in cal["calibration"]]
    return {
        "wall_s": time.perf_counter() - study.t0,
        "machine": machine_info(),
        "stages": {name: {"seconds": rec["seconds"], "outputs": rec["outputs"]} for name, rec in study.records.items()},
        "static": [{k: r[k] for k in ("crop", "resolution", "accuracy", "gflops")} for r in dyn["static"]],
        "dynamic": _dynamic_rows(dyn, cal),
        "oracle": [{"crop": r["crop"], "accuracy": r["accuracy"]} for r in dyn["oracle"]],
        "dynamic_summary": dyn.get("summary", []),
        "dynamic_tolerance": dyn.get("tolerance"),
        "calibration": calibration,
        "calibration_target": cal.get("target", CalibrationConfig.target),
        "calibration_sweep": cal.get("calibration_sweep", []),
        "kernels": kernel_rows(kern, "backbone") + kernel_rows(kern_scale, "scale"),
        "gemm_gflops_per_s": kern.get("limits", {}).get("gemm_gflops_per_s"),
        "pipeline": _pipeline_rows(pipe),
        "pipeline_ratios": pipe.get("ratios", {}),
        "io": {"decode": io["decode"], "bytes_per_scan": io["bytes_per_scan"], "ingest": io.get("ingest")},
        "samples": samples,
    }


def scale_choices(store: Store, scale_model: str | Path, policy_path: str | Path, keys: Sequence[str],
                  crop_area: float = 0.75) -> list[dict]:
    """The scale model's pick for a few images (the report's thumbnails), from exactly the prefix the policy lets
    it read; ``crop_area`` is the center crop's area fraction."""
    from dynres.model.checkpoint import load_checkpoint
    from dynres.policy.calibration import load_policy
    from dynres.study.dynamic import decide

    scale = load_checkpoint(scale_model)
    policy = load_policy(policy_path)
    rows = []
    for key in keys:
        prefix = store.read(key, scans=policy.scans(key, scale[1].train_resolution))
        resolution, _ = decide(scale, prefix, crop_area)
        rows.append({"key": key, "path": store.location(key), "resolution": int(resolution),
                     "class_name": store.classes[store.label(key)]})
    return rows
