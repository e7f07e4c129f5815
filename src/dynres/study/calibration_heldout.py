"""What a calibrated policy does on the images calibration never saw (Tables III/IV): the held-out accuracy with
full and calibrated reads per resolution and crop, the dynamic pipeline's row, Figure 6's sweep beside them, and
the record's headline numbers."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dynres._ui import log
from dynres.io.store import Store, StoreLike
from dynres.policy.calibration import CalibrationPolicy
from dynres.study.certify import predict_lanes


def _scans(policy: CalibrationPolicy, store: StoreLike, key: str, resolution: int) -> int:
    """The policy's scans for ``key``; every scan for an image it does not list."""
    scans = policy.scans(key, resolution)
    return store.num_scans(key) if scans is None else scans


def _prefix_bytes(store: StoreLike, keys: Sequence[str], scans: Sequence[int | None]
                  ) -> tuple[np.ndarray, np.ndarray]:
    read = np.array([store.prefix_size(k, s) for k, s in zip(keys, scans)], dtype=np.float64)
    size = np.array([store.size(k) for k in keys], dtype=np.float64)
    return read, size


@dataclass(frozen=True)
class FullReads:
    """Predictions of full reads the same model already made on the same kind of views (the accuracy stage's
    static evaluation, :func:`static_full_reads`): ``table`` rows (key, crop, resolution, correct) at
    ``resolutions`` x ``crops``, every view of an image decoded for ``crops`` together and for a grid whose largest
    resolution is ``top`` (a view depends on both: :func:`dynres.study.static.image_views`)."""

    table: pa.Table
    crops: tuple[float, ...]
    resolutions: tuple[int, ...]
    top: int


def static_full_reads(static_json: str | Path, store: StoreLike, checkpoint: str | Path, backend: str, exact: bool,
                      grid: Sequence[int], keys: Sequence[str]) -> FullReads | None:
    """The static evaluation beside ``static_json`` as :class:`FullReads` for ``keys`` of ``store`` at the
    resolutions of ``grid`` it has, or None (and one line saying why) where its predictions would not be this
    calibration's: other bytes (the manifest hash it recorded) or not every scan read, another checkpoint, another
    kind of view, a backend other than ONNX Runtime on both sides (only its predictions are the same whatever the
    batch and threads, checked bitwise in tests/study/test_certify.py), no resolution of ``grid``, a resolution of
    ``grid`` above its largest (its views were decoded too small for it), or images it lacks."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from dynres.model.checkpoint import checkpoint_digest
    from dynres.policy.quality import manifest_hash
    from dynres.study.stages import read_json

    rec = read_json(static_json)
    path = Path(static_json).parent / "static_images.parquet"
    evaluated = [int(r) for r in rec.get("grid", ())]
    shared = tuple(r for r in grid if r in evaluated)
    why = None
    if rec.get("store_manifest_hash") != manifest_hash(store) or rec.get("full_reads") is not True:
        why = "it did not record reading every scan of this store's bytes"
    elif rec.get("checkpoint_sha256") != checkpoint_digest(checkpoint):
        why = "it evaluated another checkpoint"
    elif bool(rec.get("exact_views")) != bool(exact):
        why = "its views are of another kind"
    elif not (backend == rec.get("backend") == "ort"):
        why = f"it ran on {rec.get('backend')}, this calibration on {backend} (reused only on ONNX Runtime)"
    elif not shared or max(grid) > max(evaluated):
        why = f"its grid {evaluated} does not cover the largest of {sorted(grid)} or has none of it"
    elif not path.is_file():
        why = f"{path} is missing"
    if why is None:
        table = pq.read_table(path, columns=["key", "crop", "resolution", "correct"])
        table = table.filter(pc.and_(pc.is_in(table.column("key"), value_set=pa.array(list(keys))),
                                     pc.is_in(table.column("resolution"), value_set=pa.array(list(shared)))))
        crops = tuple(float(c) for c in rec["crops"])
        if table.num_rows != len(keys) * len(shared) * len(crops):
            why = "it lacks some of the held-out images"
    if why is not None:
        log(f"held-out full reads evaluated again, not taken from {static_json}: {why}")
        return None
    return FullReads(table, crops, shared, max(evaluated))


def heldout_table(model, store: StoreLike, policy: CalibrationPolicy, keys: Sequence[str], crops: Sequence[float],
                  target: float, batch_size: int = 16, progress: bool = True, exact: bool = False,
                  known: FullReads | None = None) -> list[dict]:
    """Table III/IV rows on ``keys``: accuracy with full vs calibrated reads per (resolution, crop), read savings.

    ``known``: full reads already predicted (the static evaluation's). At its crops, the resolutions it holds are
    not predicted again, and everything else there (the full reads of the other resolutions, the calibrated reads)
    is decoded as its views were, so both sides of every cell see views made the same way."""
    import pyarrow.compute as pc

    from dynres.study.static import accuracy_table

    grid = policy.resolutions
    reused = known is not None and bool(set(crops) & set(known.crops))
    rest = tuple(c for c in crops if not reused or c not in known.crops)
    partial = [k for k in keys if any(_scans(policy, store, k, r) < store.num_scans(k) for r in grid)]
    columns = ["key", "crop", "resolution", "correct"]

    def predict(part: Sequence[str], resolutions: Sequence[int], group: Sequence[float], scans, top: int | None):
        what = "full" if scans is None else "calibrated"
        return predict_lanes(model, store, part, resolutions, group, scans=scans, exact=exact, batch_size=batch_size,
                             progress=progress, description=f"held-out, {what} reads",
                             decode_for=top).select(columns)

    full_parts, cal_parts = [], []
    if reused:
        full_parts.append(known.table)
        missing = [r for r in grid if r not in known.resolutions]
        if missing:
            full_parts.append(predict(keys, missing, known.crops, None, known.top))
        if partial:
            cal_parts.append(predict(partial, grid, known.crops, policy, known.top))
    if rest:
        full_parts.append(predict(keys, grid, rest, None, None))
        if partial:
            cal_parts.append(predict(partial, grid, rest, policy, None))
    wanted = pa.array([float(c) for c in crops])
    full = pa.concat_tables(full_parts)
    full = full.filter(pc.is_in(full.column("crop"), value_set=wanted))
    acc_full = accuracy_table(full)
    if partial:
        same = full.filter(pc.invert(pc.is_in(full.column("key"), value_set=pa.array(partial))))
        cal = pa.concat_tables(cal_parts)
        acc_cal = accuracy_table(pa.concat_tables([same, cal.filter(pc.is_in(cal.column("crop"), value_set=wanted))]))
    else:
        acc_cal = acc_full
    rows = []
    for r in grid:
        read, size = _prefix_bytes(store, keys, [policy.scans(k, r) for k in keys])
        savings, mean_savings = 1.0 - float(read.sum() / size.sum()), 1.0 - float(np.mean(read / size))
        for c in crops:
            loss = acc_full[(c, r)] - acc_cal[(c, r)]
            rows.append({"resolution": r, "crop": c, "acc_full": acc_full[(c, r)], "acc_calibrated": acc_cal[(c, r)],
                         "read_savings": savings, "read_savings_mean_image": mean_savings,
                         "flag": bool(loss > target + 1e-9)})
    return rows


def worst_case_dynamic_savings(store: StoreLike, policy: CalibrationPolicy, keys: Sequence[str]) -> float:
    """Read savings of the dynamic pipeline whatever resolutions the scale model picks: per image, the largest
    prefix the policy gives any resolution (the scale model's own included, as it is one of them)."""
    read = sum(store.prefix_size(k, max(_scans(policy, store, k, r) for r in policy.resolutions)) for k in keys)
    return 1.0 - read / sum(store.size(k) for k in keys)


def dynamic_rows(store_url: str, backbone: str | Path, scale: str | Path, policy_path: str | Path,
                 keys: Sequence[str], crop_areas: Sequence[float], target: float,
                 stop: threading.Event | None = None) -> list[dict]:
    """The dynamic row of Tables III/IV: the pipeline (scale model → resolution → backbone) with every scan vs the
    policy, per crop area. The scale model reads the policy's prefix at its own resolution and the backbone then
    fetches only the missing bytes, so the savings include the scale model's read.

    The models are loaded once, by the first engine (:func:`dynres.runtime.engine.build_engine`), and shared by
    every other (the scale stage's costs alone take a second per load), each engine on a freshly opened store. A
    policy that reads every scan of every image here gives the engine exactly the full read's bytes, so its run is
    the full run and is not repeated (the demo's default certifies nothing). ``stop``: once set, no further
    pipeline run starts (the caller failed; the rows are not wanted)."""
    from dynres.io.store import open_store
    from dynres.paper import crop_side
    from dynres.runtime.engine import Engine, EngineSpec, PipelineConfig, build_engine

    base = build_engine(EngineSpec(str(store_url), str(backbone), str(scale), str(policy_path), "eager",
                                   PipelineConfig()))
    policy, store = base.policy, base.store
    reads_all = all(_scans(policy, store, k, r) >= store.num_scans(k) for k in keys for r in policy.resolutions)

    def run(pol, cfg: PipelineConfig) -> dict:
        return Engine(open_store(str(store_url)), base.backbone, scale=base.scale, policy=pol, config=cfg,
                      classes=base.classes).run(list(keys), progress=False).summary

    rows = []
    for c in crop_areas:
        if stop is not None and stop.is_set():
            break
        cfg = PipelineConfig(crop_side=crop_side(c))
        runs = {"full": run(None, cfg)}
        runs["calibrated"] = runs["full"] if reads_all else run(policy, cfg)
        loss = runs["full"]["accuracy"] - runs["calibrated"]["accuracy"]
        rows.append({"resolution": "dynamic", "crop": c, "acc_full": runs["full"]["accuracy"],
                     "acc_calibrated": runs["calibrated"]["accuracy"],
                     "read_savings": 1.0 - runs["calibrated"]["read_fraction"],
                     "read_savings_full": 1.0 - runs["full"]["read_fraction"],
                     "resolution_histogram": runs["calibrated"]["resolution_histogram"],
                     "flag": bool(loss > target + 1e-9)})
    return rows


def heldout_reports(run, store: Store, checkpoint: str | Path, scale_model: str | Path | None,
                    policy: CalibrationPolicy, policy_file: str | Path, held: Sequence[str], crops: Sequence[float],
                    cfg, sweep: Callable[[], list[dict]], progress: bool = True, known: FullReads | None = None
                    ) -> tuple[list[dict], list[dict], list[dict] | None]:
    """The held-out table, Figure 6's sweep (``sweep()``) and, with a scale model, the dynamic rows (``cfg``: the
    calibration's settings). The dynamic rows run in the background (the pipeline keeps about one core busy, the
    table's lanes take what is left; all only read the saved policy and the stores) and start no further
    pipeline run once the table or the sweep has failed. ``known``: full reads already predicted
    (:func:`heldout_table`)."""
    with ThreadPoolExecutor(1, thread_name_prefix="dynres-dynamic") as background:
        stop = threading.Event()
        dynamic = None if scale_model is None else background.submit(
            dynamic_rows, store.root, checkpoint, scale_model, policy_file, held, crops, cfg.target, stop)
        try:
            rows = heldout_table(run, store, policy, held, crops, cfg.target, cfg.batch_size, progress, cfg.exact,
                                 known)
            points = sweep()
        except BaseException:
            stop.set()
            raise
        return rows, points, None if dynamic is None else dynamic.result()


def calibration_summary(record: dict, store: StoreLike, policy: CalibrationPolicy, held: Sequence[str]) -> dict:
    """The record's headline numbers: the best resolution at the index's crop and its savings, the worst losses,
    the cells over the target, and the dynamic pipeline's savings and loss at the index's crop."""
    crop_area = record["crop_side"] ** 2
    rows = record["calibration"]
    main = [r for r in rows if math.isclose(r["crop"], crop_area, abs_tol=1e-6)]
    best = max(main, key=lambda r: (r["acc_full"], -r["resolution"]))
    summary = {
        "best_resolution": best["resolution"], "best_read_savings": best["read_savings"],
        "max_loss": max(r["acc_full"] - r["acc_calibrated"] for r in rows),
        "max_loss_at_calibration_crop": max(r["acc_full"] - r["acc_calibrated"] for r in main),
        "cells_over_target": sum(bool(r["flag"]) for r in rows), "cells": len(rows),
        "dynamic_read_savings_worst_case": worst_case_dynamic_savings(store, policy, held),
    }
    for r in record.get("dynamic", []):
        if math.isclose(r["crop"], crop_area, abs_tol=1e-6):
            summary |= {"dynamic_read_savings": r["read_savings"], "dynamic_loss": r["acc_full"] - r["acc_calibrated"]}
    return summary
