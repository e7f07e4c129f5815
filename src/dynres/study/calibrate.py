"""Storage calibration (paper section V, Figure 6, Tables III/IV): how many scans each image needs per resolution.

For each resolution r, binary search an SSIM threshold t(r) over [0.94, 1.0] (until the step is below 1e-4) for the
largest read saving whose top-1 accuracy loss, versus reading every scan, stays within the target (default 0.05
points) on a calibration split. The loss searched on counts only images a full read gets right and the calibrated
read gets wrong (an upper bound of the accuracy drop: images a shorter read happens to fix do not buy losses). The
policy for an image at r is then the fewest scans whose SSIM (quality index) reaches t(r); :class:`CalibrationPolicy`
implements the ``ScanPolicy`` protocol, so the dataset, the evaluation and the pipeline read calibrated prefixes by
being handed it.

Calibration data never includes the images the result is reported on: either a deterministic hashed split of the
store (``holdout_fraction`` of it is held out for the report), or a separate calibration store (the paper used
training images, which with a small backbone that fits its training set is optimistic).

Predictions are cached per (image, scans): the search evaluates each distinct prefix once (each decoded exactly, as
``decode`` does), and a prefix whose decode equals the full decode (SSIM exactly 1.0 in the index) reuses the
full-read prediction. The held-out table (every resolution x crop, full vs calibrated reads) uses the static
evaluation's views by default, one decode per image and prefix: the same numbers as Table I for full reads, at a
fraction of the cost of decoding each view on its own (``exact=True``; docs/demo-config.md).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynres._ui import log, track
from dynres.errors import ConfigError, StoreError
from dynres.io.store import Store, StoreLike
from dynres.paper import DEFAULT_CROP_SIDE, PAPER_CROPS
from dynres.policy.calibration import CalibrationPolicy
from dynres.policy.quality import QualityIndex, load_quality, manifest_hash
from dynres.records import markdown_table, write_records
from dynres.report.figures import calibration_sweep
from dynres.version import __version__


@dataclass(frozen=True)
class CalibrationConfig:
    """The threshold search and the held-out report; ``crops`` and ``search_crops`` are area fractions."""

    target: float = 0.05  # accuracy points a calibrated read may lose vs reading every scan
    low: float = 0.94
    high: float = 1.0
    step: float = 1e-4
    max_images: int = 10_000  # calibration images (the paper's budget)
    holdout_fraction: float = 0.5  # share of STORE held out for the report when no calibration store is given
    seed: int = 0
    resolutions: tuple[int, ...] | None = None  # None: every resolution of the quality index
    crops: tuple[float, ...] = PAPER_CROPS  # area fractions of the held-out table (the index's crop is added)
    # area fractions whose lost answers the search also counts, each held to the target (the index's crop always
    # is): for a service that sees objects at several scales; stricter thresholds, fewer bytes saved
    search_crops: tuple[float, ...] = ()
    sweep: tuple[float, ...] = (0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999, 1.0)
    batch_size: int = 64
    # how the model runs (dynres.study.static.GridModel): predictions, not thresholds, depend on it
    backend: str = "auto"
    # held-out table views: False, one decode per image and prefix with every view resized from it (the static
    # evaluation's views; 35 views for one decode); True, each view decoded on its own (35x the decodes)
    exact: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 1 or self.step <= 0:
            raise ConfigError("calibration", f"need 0 <= low < high <= 1 and step > 0, got {self.low}, {self.high}")
        if self.target < 0 or self.max_images < 1 or not 0 < self.holdout_fraction < 1:
            raise ConfigError("calibration", "need target >= 0, max_images >= 1, 0 < holdout_fraction < 1")
        if not all(0 < c <= 1 for c in self.search_crops):
            raise ConfigError("search_crops", f"crop areas must be in (0, 1], got {self.search_crops}")
        if not self.crops or not all(0 < c <= 1 for c in self.crops):
            raise ConfigError("crops", f"need at least one crop area, each in (0, 1], got {self.crops}")


# --- the search -----------------------------------------------------------------------------------------------


def search_threshold(loss: Callable[[float], float], target: float, low: float = 0.94, high: float = 1.0,
                     step: float = 1e-4) -> tuple[float, list[dict]]:
    """The lowest threshold in [low, high] whose ``loss(t) <= target``, assuming loss falls as t rises.

    Returns it with every evaluation made. ``high`` is the fallback (at 1.0 a policy reads every scan that changes
    the pixels, so it loses nothing by construction).
    """
    trail = []

    def ok(t: float) -> bool:
        value = loss(t)
        trail.append({"threshold": t, "loss": value})
        return value <= target + 1e-12

    if ok(low):
        return low, trail
    lo, hi = low, high
    while hi - lo >= step:
        mid = (lo + hi) / 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, trail


def split_keys(keys: Sequence[str], holdout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (calibration, held-out) split by a hash of each key: stable as the store grows."""
    calib, held = [], []
    for key in keys:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
        (held if h < holdout_fraction else calib).append(key)
    return calib, held


# --- predictions ---------------------------------------------------------------------------------------------


class PrefixPredictions:
    """Top-1 predictions per (key, scans) at one resolution and one or more crops, computed in batches on demand
    and cached: each prefix is read once for all its crops."""

    def __init__(self, model, store: StoreLike, index: QualityIndex, resolution: int, crop_areas: Sequence[float],
                 batch_size: int):
        self.model, self.store, self.index = model, store, index
        self.resolution, self.crop_areas, self.batch_size = resolution, tuple(crop_areas), batch_size
        self.col = index.column(resolution)
        self.cache: dict[tuple[str, int], tuple[int, ...]] = {}
        self.evaluated = 0

    def _canonical(self, key: str, k: int) -> int:
        """A prefix whose decode is the full decode (SSIM exactly 1) shares the full read's prediction."""
        i = self.index.rows[key]
        n = int(self.index.num_scans[i])
        return n if k >= n or self.index.ssim[i, self.col, k - 1] == 1.0 else k

    def predict(self, keys: Sequence[str], scans: Sequence[int]) -> np.ndarray:
        """Predicted classes (number of crops, number of keys)."""
        from dynres.study.static import predict_grid

        want = [(key, self._canonical(key, int(k))) for key, k in zip(keys, scans)]
        pending = sorted({p for p in want if p not in self.cache})
        self.evaluated += len(pending)
        column = {c: j for j, c in enumerate(self.crop_areas)}
        while pending:  # one prefix per key per pass (a search step asks for one per key anyway)
            group: dict[str, int] = {}
            rest = []
            for key, k in pending:
                if key in group:
                    rest.append((key, k))
                else:
                    group[key] = k
            table = predict_grid(self.model, self.store, list(group), (self.resolution,), self.crop_areas,
                                 scans=group, exact=True, batch_size=self.batch_size, progress=False)
            found: dict[str, list[int]] = {key: [0] * len(self.crop_areas) for key in group}
            for key, crop, pred in zip(*(table.column(n).to_pylist() for n in ("key", "crop", "pred"))):
                found[key][column[crop]] = int(pred)
            self.cache.update({(key, k): tuple(found[key]) for key, k in group.items()})
            pending = rest
        return np.array([self.cache[p] for p in want], dtype=np.int64).T


def _prefix_bytes(store: StoreLike, keys: Sequence[str], scans: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    read = np.array([store.prefix_size(k, int(s)) for k, s in zip(keys, scans)], dtype=np.float64)
    size = np.array([store.size(k) for k in keys], dtype=np.float64)
    return read, size


def search_areas(cfg: CalibrationConfig, crop_side: float) -> list[float]:
    """The crop areas the search holds to the target: the quality index's (``crop_side``) first, then every
    ``cfg.search_crops`` that is not it."""
    return [crop_side**2] + [c for c in dict.fromkeys(cfg.search_crops)
                             if not math.isclose(c, crop_side**2, abs_tol=1e-6)]


def calibrate_resolution(model, store: StoreLike, index: QualityIndex, keys: Sequence[str], resolution: int,
                         cfg: CalibrationConfig, crop_side: float) -> dict:
    """Binary-search t(resolution) on ``keys``; returns the threshold, the search trail and the Figure 6 sweep.

    The search holds the lost answers at ``crop_side`` (the quality index's) and at every ``cfg.search_crops`` to
    the target; accuracies and the sweep are reported at ``crop_side``."""
    preds = PrefixPredictions(model, store, index, resolution, search_areas(cfg, crop_side), cfg.batch_size)
    return search_resolution(preds, store, index, keys, resolution, cfg)


def search_resolution(preds: PrefixPredictions, store: StoreLike, index: QualityIndex, keys: Sequence[str],
                      resolution: int, cfg: CalibrationConfig) -> dict:
    """:func:`calibrate_resolution` on given predictions: anything with ``crop_areas`` (the index's first),
    ``evaluated`` and ``predict(keys, scans)`` like :class:`PrefixPredictions`."""
    areas = preds.crop_areas
    rows = np.array([index.rows[k] for k in keys])
    labels = np.array([store.label(k) for k in keys])
    right = preds.predict(keys, index.num_scans[rows]) == labels  # (crops, keys)
    acc_full = 100.0 * float(np.mean(right[0]))

    def accuracy(t: float) -> tuple[float, np.ndarray]:
        ks = index.fewest_scans(t, resolution, rows)
        return 100.0 * float(np.mean(preds.predict(keys, ks)[0] == labels)), ks

    def lost(t: float) -> float:
        """Points of images right on a full read and wrong on the calibrated one (the worst crop's). The accuracy
        drop is this minus the images the shorter read happens to fix; searching on the net drop would let such
        lucky gains cancel real losses (docs/demo-config.md)."""
        wrong = preds.predict(keys, index.fewest_scans(t, resolution, rows)) != labels
        return 100.0 * float(np.mean(right & wrong, axis=1).max())

    threshold, trail = search_threshold(lost, cfg.target, cfg.low, cfg.high, cfg.step)
    acc_cal, ks = accuracy(threshold)
    read, size = _prefix_bytes(store, keys, ks)
    sweep = []
    for t in sorted(set(cfg.sweep) | {threshold}):
        acc_t, ks_t = accuracy(t)
        r_t, s_t = _prefix_bytes(store, keys, ks_t)
        sweep.append({"resolution": resolution, "threshold": t, "relative_bytes": float(np.mean(r_t / s_t)),
                      "acc_change": acc_t - acc_full})
    return {"resolution": resolution, "threshold": threshold, "images": len(keys), "acc_full": acc_full,
            "acc_calibrated": acc_cal, "read_savings": 1.0 - float(read.sum() / size.sum()),
            "evaluations": len(trail), "prefixes_evaluated": preds.evaluated, "trail": trail,
            "sweep": sweep, "search_crops": [round(c, 6) for c in areas]}


# --- held-out report -------------------------------------------------------------------------------------------


def heldout_table(model, store: StoreLike, policy: CalibrationPolicy, keys: Sequence[str], crops: Sequence[float],
                  target: float, batch_size: int = 64, progress: bool = True, exact: bool = False) -> list[dict]:
    """Table III/IV rows on ``keys``: accuracy with full vs calibrated reads per (resolution, crop), read savings."""
    from dynres.study.static import accuracy_table, predict_grid

    grid = policy.resolutions
    full = predict_grid(model, store, keys, grid, crops, scans=None, exact=exact, batch_size=batch_size,
                        progress=progress, description="held-out, full reads")
    partial = [k for k in keys if any(policy.scans(k, r) < store.num_scans(k) for r in grid)]
    acc_full = accuracy_table(full)
    if partial:
        import pyarrow as pa
        import pyarrow.compute as pc

        cal = predict_grid(model, store, partial, grid, crops, scans=policy, exact=exact, batch_size=batch_size,
                           progress=progress, description="held-out, calibrated reads")
        same = full.filter(pc.invert(pc.is_in(full.column("key"), value_set=pa.array(partial))))
        acc_cal = accuracy_table(pa.concat_tables([same, cal]))
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
    read = sum(store.prefix_size(k, max(policy.scans(k, r) for r in policy.resolutions)) for k in keys)
    return 1.0 - read / sum(store.size(k) for k in keys)


def dynamic_rows(store_url: str, backbone: str | Path, scale: str | Path, policy_path: str | Path,
                 keys: Sequence[str], crop_areas: Sequence[float], target: float) -> list[dict]:
    """The dynamic row of Tables III/IV: the pipeline (scale model → resolution → backbone) with every scan vs the
    policy, per crop area. The scale model reads the policy's prefix at its own resolution and the backbone then
    fetches only the missing bytes, so the savings include the scale model's read."""
    from dynres.paper import crop_side
    from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine

    rows = []
    for c in crop_areas:
        cfg = PipelineConfig(crop_side=crop_side(c))
        runs = {name: build_engine(EngineSpec(str(store_url), str(backbone), str(scale), pol, "eager", cfg))
                .run(list(keys), progress=False).summary
                for name, pol in (("full", None), ("calibrated", str(policy_path)))}
        loss = runs["full"]["accuracy"] - runs["calibrated"]["accuracy"]
        rows.append({"resolution": "dynamic", "crop": c, "acc_full": runs["full"]["accuracy"],
                     "acc_calibrated": runs["calibrated"]["accuracy"],
                     "read_savings": 1.0 - runs["calibrated"]["read_fraction"],
                     "read_savings_full": 1.0 - runs["full"]["read_fraction"],
                     "resolution_histogram": runs["calibrated"]["resolution_histogram"],
                     "flag": bool(loss > target + 1e-9)})
    return rows


def calibrate(store: Store, checkpoint: str | Path, out: str | Path, cfg: CalibrationConfig = CalibrationConfig(),
              calib_store: StoreLike | None = None, policy_path: str | Path | None = None,
              scale_model: str | Path | None = None, progress: bool = True) -> dict:
    """Calibrate thresholds, save the policy for ``store`` and write ``calibration.json/.md`` + Figure 6 PNG.

    Calibration images: up to ``max_images`` of ``calib_store`` if given (then all of ``store`` is held out), else
    the hashed calibration part of ``store``. Returns the record.
    """
    from dynres.model.checkpoint import load_checkpoint
    from dynres.study.static import GridModel

    t0 = time.perf_counter()
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    index = load_quality(store)
    crop_side = float(index.meta.get("config", {}).get("crop_side", DEFAULT_CROP_SIDE))
    resolutions = tuple(cfg.resolutions or index.resolutions)
    for r in resolutions:
        index.column(r)  # fails early, naming a resolution the index lacks
    split = calibration_split(store, index, checkpoint, meta.classes, cfg, calib_store)
    run = GridModel(model, cfg.backend)  # one model (ORT session) for every search step and the held-out table
    searches = []
    for r in track(resolutions, len(resolutions), f"calibrate ({len(split.calib_keys)} images)", progress):
        searches.append(calibrate_resolution(run, split.calib_src, split.calib_index, split.calib_keys, r, cfg,
                                             crop_side))
        s = searches[-1]
        log(f"{r}px: threshold {s['threshold']:.4f}, calibration-split loss {s['acc_full'] - s['acc_calibrated']:.3f}"
            f" points, read savings {s['read_savings']:.1%}")
    thresholds = {s["resolution"]: s["threshold"] for s in searches}
    provenance = _provenance(store, checkpoint, index, split, crop_side, cfg, run.backend)
    policy = CalibrationPolicy.from_index(thresholds, index, provenance)
    policy_file = policy.save(policy_path or out / "policy.json")

    crops = tuple(sorted(set(cfg.crops) | {round(crop_side**2, 6)}))
    rows = heldout_table(run, store, policy, split.held, crops, cfg.target, cfg.batch_size, progress, cfg.exact)
    record = {
        "policy": str(policy_file), "model": str(checkpoint), "store": str(store.root), "split": split.name,
        "calibration_images": len(split.calib_keys), "heldout_images": len(split.held), "crop_side": crop_side,
        "calibration_target": cfg.target, "thresholds": {str(r): t for r, t in thresholds.items()},
        "calibration": rows, "calibration_sweep": [p for s in searches for p in s["sweep"]],
        "search": [{k: v for k, v in s.items() if k != "sweep"} for s in searches],
        "seconds": time.perf_counter() - t0,
    }
    if scale_model is not None:
        record["dynamic"] = dynamic_rows(store.root, checkpoint, scale_model, policy_file, split.held, crops,
                                         cfg.target)
    record["summary"] = calibration_summary(record, store, policy, split.held)
    out.mkdir(parents=True, exist_ok=True)
    calibration_sweep(record["calibration_sweep"], out / "calibration_sweep.png")
    write_records(out, "calibration", record, calibration_markdown(record))
    return record


@dataclass(frozen=True)
class CalibrationSplit:
    """The images calibration searches on (``calib_keys`` of ``calib_src``, with its quality index) and the
    images the result is reported on (``held``, of the calibrated store); ``name`` says how they were split."""

    calib_keys: list[str]
    held: list[str]
    calib_src: StoreLike
    calib_index: QualityIndex
    name: str


def calibration_split(store: Store, index: QualityIndex, checkpoint: str | Path, classes: Sequence[str],
                      cfg: CalibrationConfig, calib_store: StoreLike | None = None) -> CalibrationSplit:
    """Calibration and held-out images (see :func:`calibrate`); ``index`` is ``store``'s quality index, and the
    checkpoint's ``classes`` must be the stores'."""
    if calib_store is None:
        calib_keys, held = split_keys(store.keys, cfg.holdout_fraction, cfg.seed)
        calib_src, calib_index, name = store, index, "hashed split of STORE"
    else:
        calib_keys, held = list(calib_store.keys), list(store.keys)
        calib_src, calib_index, name = calib_store, load_quality(calib_store), "separate calibration store"
    for s in {id(store): store, id(calib_src): calib_src}.values():
        if list(classes) != list(s.classes):
            raise ConfigError(checkpoint, f"checkpoint classes differ from the classes of store {s.root}")
    if len(calib_keys) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        calib_keys = sorted(rng.choice(calib_keys, cfg.max_images, replace=False).tolist())
    if not calib_keys or not held:
        raise StoreError(store.root, f"need calibration and held-out images, got {len(calib_keys)} and {len(held)}")
    return CalibrationSplit(calib_keys, held, calib_src, calib_index, name)


def _provenance(store: Store, checkpoint: str | Path, index: QualityIndex, split: CalibrationSplit,
                crop_side: float, cfg: CalibrationConfig, backend: str) -> dict:
    """What the policy was calibrated from: saved with it."""
    from dynres.model.checkpoint import checkpoint_digest

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dynres": __version__,
        "model": str(checkpoint), "model_sha256": checkpoint_digest(checkpoint),
        "store": str(store.root), "store_manifest_hash": manifest_hash(store),
        "calibration_store": str(split.calib_src.root), "calibration_manifest_hash": manifest_hash(split.calib_src),
        "quality_index": index.meta, "crop_side": crop_side, "target": cfg.target, "split": split.name,
        "calibration_images": len(split.calib_keys), "heldout_images": len(split.held), "config": asdict(cfg),
        "backend": backend,
    }


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


# --- renderings -------------------------------------------------------------------------------------------------


def calibration_markdown(record: dict) -> str:
    """Table III/IV layout plus the search summary; cells losing more than the target are flagged."""
    target = record["calibration_target"]
    rows = [r | {"loss": r["acc_full"] - r["acc_calibrated"], "flag": "**LOSS > target**" if r["flag"] else ""}
            for r in record["calibration"] + record.get("dynamic", [])]
    search = [{"resolution": s["resolution"], "threshold": f"{s['threshold']:.4f}", "acc_full": s["acc_full"],
               "acc_calibrated": s["acc_calibrated"], "read_savings": s["read_savings"],
               "prefixes": s["prefixes_evaluated"]} for s in record["search"]]
    return "\n".join([
        "# Storage calibration",
        "",
        f"Policy `{record['policy']}`: per resolution, read the fewest scans whose SSIM (luma, vs the full decode, "
        f"at crop side {record['crop_side']}) reaches the threshold. Target: lose at most {target} points vs reading "
        f"every scan{_at_crops(record)}. Calibrated on {record['calibration_images']} images ({record['split']}); "
        f"the table below is on {record['heldout_images']} held-out images. Crops are area fractions; read savings "
        "= 1 - bytes read / file bytes (identical for every crop).",
        "",
        "## Held-out: full vs calibrated reads",
        "",
        markdown_table(rows, ["resolution", "crop", "acc_full", "acc_calibrated", "loss", "read_savings", "flag"],
                       ["res", "crop", "acc. full reads (%)", "acc. calibrated (%)", "loss (points)",
                        "read savings", ""]),
        "",
        "## Thresholds (calibration split)",
        "",
        markdown_table(search, ["resolution", "threshold", "acc_full", "acc_calibrated", "read_savings", "prefixes"],
                       ["res", "SSIM threshold", "acc. full (%)", "acc. calibrated (%)", "read savings",
                        "prefixes evaluated"]),
        "",
        "![Figure 6](calibration_sweep.png)",
    ])


def _at_crops(record: dict) -> str:
    crops = record["search"][0].get("search_crops", []) if record["search"] else []
    return f", at each of the crop areas {', '.join(f'{c:g}' for c in crops)}" if len(crops) > 1 else ""
