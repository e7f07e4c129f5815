"""The fixed ``summary.json`` schema (docs/summary-schema.md), assembled from each stage's own records."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynres.io.store import Store
from dynres.model.train import OPTIMIZER_TIED
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
                     samples: list[dict], verdict: dict | None = None, run_config: dict | None = None) -> dict:
    """The summary from the records of the dynamic evaluation, calibration, kernels (backbone and scale model),
    pipeline and I/O benchmarks, plus the scale model's ``samples`` (:func:`scale_choices`), the guard's
    ``verdict`` (:mod:`dynres.study.verdict`) and the effective settings (:func:`study_settings`)."""
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
        "verdict": verdict,
        "run_config": run_config,
    }


# --- the effective settings -------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _rows(section: str, obj: Any, chosen: frozenset[str], skip: tuple[str, ...] = ()) -> list[dict]:
    """One row per field of the settings dataclass ``obj``: its value and where it came from."""
    rows = []
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        name = f"{section}.{f.name}" if section else f.name
        source = "file" if name in chosen else ("default" if _plain(value) == _plain(default) else "preset")
        rows.append({"setting": name, "value": _plain(value), "source": source})
    return rows


def settings_warnings(chain: Any) -> list[str]:
    """Settings the rest of the run does not honour as the evaluation does, each named (a setting the chain would
    override outright is refused when the run file is read, :mod:`dynres.study.runfile`)."""
    warnings = []
    if chain.scale.cheap and chain.scale.labels is None:
        warnings.append(f"scale.cheap = true: one shard backbone labels one shard, 1/{chain.scale.folds} of the "
                        f"training images, although scale.folds = {chain.scale.folds} (the paper's single split)")
    if chain.dynamic.scans is not None and chain.dynamic.scans != chain.scale.scans:
        warnings.append(f"dynamic.scans = {chain.dynamic.scans} applies to the dynamic evaluation only: the pipeline "
                        f"stage and `dynres infer` / `serve` read the scale checkpoint's prefix (scale.scans = "
                        f"{chain.scale.scans})")
    if chain.dynamic.cost_table is not None:
        warnings.append("dynamic.cost_table weighs the evaluation's λ sweep only: the guard, the pipeline stage and "
                        "`dynres infer` / `serve` weigh GFLOPs")
    return warnings


def study_settings(config: Any) -> dict:
    """Every effective setting of a study (:class:`~dynres.study.demo.StudyConfig`): ``rows`` of ``{setting,
    value, source}`` with source ``file`` (the run file set it), ``preset`` (the preset of `dynres run` / `dynres
    demo` differs from the dataclass's default there) or ``default``; and the ``warnings`` of
    :func:`settings_warnings`."""
    from dynres.study.chain import demo_config

    chain = config.chain or demo_config(quick=config.quick, seed=config.seed, pretrained=config.data is None)
    chosen = frozenset(config.file_settings)
    if "seed" in chosen:  # the file's top-level seed is the preset's backbone and scale seeds (demo_config)
        chosen |= {"backbone.seed", "scale.seed"}
    demo_only = ("size",) if config.data is not None else ()  # the built-in data's size
    top = _rows("", config, chosen, skip=("chain", "calibration", "file_settings", *demo_only))
    rows = (top + _rows("backbone", chain.backbone, chosen) + _rows("scale", chain.scale, chosen, skip=("backbone",))
            + _rows("eval", chain.eval, chosen) + _rows("dynamic", chain.dynamic, chosen)
            + _rows("calibration", config.calibration or CalibrationConfig(), chosen))
    return {"rows": rows, "warnings": settings_warnings(chain) + _optimizer_notes(chain.backbone, chosen, config)}


def _optimizer_notes(backbone: Any, chosen: frozenset, config: Any) -> list[str]:
    """The backbone's optimizer-tied settings the file left out while switching the optimizer: they take that
    optimizer's defaults (:func:`dynres.study.runfile.retie_optimizer`), said by name and value."""
    from dynres.study.chain import demo_config

    preset = demo_config(quick=config.quick, seed=config.seed, pretrained=config.data is None).backbone
    if "backbone.optimizer" not in chosen or backbone.optimizer == preset.optimizer:
        return []
    left = [k for k in OPTIMIZER_TIED if f"backbone.{k}" not in chosen]
    if not left:
        return []
    values = " and ".join(f"backbone.{k} = {getattr(backbone, k):g}" for k in left)
    note = (f"backbone.optimizer = {backbone.optimizer!r}: {values} {'are' if len(left) > 1 else 'is'} dynres's "
            f"default for {backbone.optimizer}, not the preset's value for {preset.optimizer}; set "
            f"{'them' if len(left) > 1 else 'it'} in [backbone] to choose")
    return [note]


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
