"""Storage calibration (paper section V, Figure 6, Tables III/IV): how many scans each image needs per resolution.

Per resolution, every policy family (``count``: one scan count for every image; ``ssim``: the paper's SSIM
threshold) is walked from the full read towards the cheapest rule on *pools* of images judged by models that never
trained on them (:mod:`dynres.study.certify`), and the family that saves most wins while an upper confidence bound
on the loss stays within the target (default 0.05 points at confidence 95%). The pools: the deployed backbone on
the labelled calibration split (a hashed part of STORE, or a separate calibration store), and, when the accuracy
chain's shard backbones are given, each of them on the training shard it did not see: thousands of images without
new labels. The criterion (``net`` accuracy drop, ``lost`` answers, or label-free ``flips``) is a setting;
docs/calibration.md compares them. :class:`CalibrationPolicy` implements the ``ScanPolicy`` protocol, so the
dataset, the evaluation and the pipeline read calibrated prefixes by being handed it.

The result is reported on images calibration never saw (the held-out part of STORE): every resolution x crop,
full vs calibrated reads, with the static evaluation's views by default (one decode per image and prefix; the
same numbers as Table I for full reads; ``exact=True`` decodes each view on its own, docs/demo-config.md).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynres._ui import log, track
from dynres.errors import ConfigError, StoreError
from dynres.io.store import Store, StoreLike
from dynres.paper import DEFAULT_CROP_SIDE, PAPER_CROPS
from dynres.policy.calibration import ReadRule
from dynres.policy.quality import QualityIndex, manifest_hash
from dynres.records import write_records
from dynres.report.calibration import calibration_markdown
from dynres.report.figures import calibration_sweep
from dynres.study.calibration_heldout import calibration_summary, heldout_reports, static_full_reads
from dynres.study.calibration_index import calibration_index, materialize
from dynres.study.certify import (
    Certification,
    ChoiceModel,
    ChoicePool,
    Pool,
    ViewPredictions,
    certify_resolution,
)
from dynres.version import __version__


@dataclass(frozen=True)
class CalibrationConfig:
    """The certified search and the held-out report; ``crops`` and ``search_crops`` are area fractions."""

    target: float = 0.05  # accuracy points a calibrated read may lose vs reading every scan
    # the bound holds at confidence 1 - delta; None (or 0, as a run file spells it): point estimates, no guarantee
    delta: float | None = 0.05
    criterion: str = "net"  # net (accuracy drop), lost (answers lost, gains ignored) or flips (label-free)
    families: tuple[str, ...] = ("count", "ssim")
    max_images: int = 10_000  # labelled calibration images (the paper's budget)
    holdout_fraction: float = 0.5  # share of STORE held out for the report when no calibration store is given
    seed: int = 0
    resolutions: tuple[int, ...] | None = None  # None: every resolution of the quality index
    crops: tuple[float, ...] = PAPER_CROPS  # area fractions of the held-out table (the index's crop is added)
    # area fractions whose losses the search also bounds, each held to the target (the index's crop always is):
    # for a service that sees objects at several scales; longer reads, fewer bytes saved
    search_crops: tuple[float, ...] = ()
    sweep: tuple[float, ...] = (0.94, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999, 1.0)
    batch_size: int = 16  # images per model call: small batches run faster on one thread (docs/calibration.md)
    # how the model runs (dynres.study.static.GridModel): predictions, not rules, depend on it
    backend: str = "auto"
    # views: False, one decode per image and prefix with every view resized from it (the static evaluation's
    # views, for the search and the held-out table); True, each view decoded on its own (35x the decodes)
    exact: bool = False
    judge_images: int = 4_000  # shard-backbone judged images at most (0: none), spread over the shards

    def __post_init__(self) -> None:
        from dynres.policy.bounds import CRITERIA

        if self.target < 0 or self.max_images < 1 or not 0 < self.holdout_fraction < 1 or self.judge_images < 0:
            raise ConfigError("calibration", "need target >= 0, max_images >= 1, 0 < holdout_fraction < 1, "
                                             "judge_images >= 0")
        if self.delta == 0:
            object.__setattr__(self, "delta", None)
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError("delta", f"need 0 < delta < 1 (or None for point estimates), got {self.delta}")
        if self.criterion not in CRITERIA:
            raise ConfigError("criterion", f"unknown criterion {self.criterion!r}; one of {', '.join(CRITERIA)}")
        if not self.families or not set(self.families) <= {"count", "ssim"}:
            raise ConfigError("families", f"need families among count, ssim, got {self.families}")
        if not all(0 < c <= 1 for c in self.search_crops):
            raise ConfigError("search_crops", f"crop areas must be in (0, 1], got {self.search_crops}")
        if not self.crops or not all(0 < c <= 1 for c in self.crops):
            raise ConfigError("crops", f"need at least one crop area, each in (0, 1], got {self.crops}")

    @property
    def certification(self) -> Certification:
        return Certification(self.criterion, self.target, self.delta)


# --- the pools -------------------------------------------------------------------------------------------------


def split_keys(keys: Sequence[str], holdout_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic (calibration, held-out) split by a hash of each key: stable as the store grows."""
    calib, held = [], []
    for key in keys:
        h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
        (held if h < holdout_fraction else calib).append(key)
    return calib, held


def search_areas(cfg: CalibrationConfig, crop_side: float) -> list[float]:
    """The crop areas the search holds to the target: the quality index's (``crop_side``) first, then every
    ``cfg.search_crops`` that is not it."""
    return [crop_side**2] + [c for c in dict.fromkeys(cfg.search_crops)
                             if not math.isclose(c, crop_side**2, abs_tol=1e-6)]


@dataclass(frozen=True)
class Judge:
    """A model that never trained on ``keys`` of ``store`` (a shard backbone of the accuracy chain)."""

    checkpoint: str
    store: StoreLike
    keys: tuple[str, ...]


def recorded_path(record: str | Path, path: str) -> Path:
    """A path a record (e.g. ``scale.json``) holds. An absolute one as written; a relative one (relative to where
    the run was started) is looked for beside the record first: as written relative to the record's folder, or as
    the part of it below a folder named like the record's (``runs/demo/accuracy/scale/fold0/model.pt`` beside
    ``…/scale/scale.json`` is ``…/scale/fold0/model.pt``), so a moved run, or one read from another directory,
    resolves to its own files and never to another run's at the same relative path; then as written. Neither: a
    clear error naming both."""
    given, folder = Path(path), Path(record).resolve().parent
    if not given.is_absolute():
        for i in range(len(given.parts)):
            if i and given.parts[i - 1] != folder.name:
                continue
            beside = folder / Path(*given.parts[i:])
            if beside.exists():
                return beside
    if given.exists():
        return given
    raise StoreError(path, f"recorded in {record}, found neither there nor beside the record")


def judges_from_record(train_store: StoreLike, scale_json: str | Path) -> list[Judge]:
    """The accuracy chain's shard backbones, each with the training images it did not see, from a scale stage's
    ``scale.json`` (``dynres train scale`` or the study's): the shard each backbone labelled is exactly the one it
    was not trained on (``scale_labels.parquet``: key, split, fold). Only the first split's: each training image
    is judged once."""
    import json

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rec = json.loads(Path(scale_json).read_text())
    if not rec.get("backbones") or not rec.get("labels"):
        raise ConfigError(scale_json, "records no shard backbones and labels (labels given from a file?)")
    backbones = [recorded_path(scale_json, p) for p in rec["backbones"]]
    table = pq.read_table(recorded_path(scale_json, rec["labels"]), columns=["key", "split", "fold"])
    pairs = sorted({(s, f) for s, f in zip(table.column("split").to_pylist(), table.column("fold").to_pylist())})
    if len(pairs) != len(backbones):
        raise ConfigError(scale_json, f"{len(backbones)} backbones but {len(pairs)} labelled shards")
    judges, stored = [], set(train_store.keys)
    for path, (split, fold) in zip(backbones, pairs):
        if split > 0:  # repeated splits judge the same images again with correlated models: not independent draws
            continue
        mask = pc.and_(pc.equal(table.column("split"), split), pc.equal(table.column("fold"), fold))
        keys = sorted(set(table.filter(mask).column("key").to_pylist()))
        judges.append(Judge(str(path), train_store, tuple(k for k in keys if k in stored)))
    return judges


def build_pools(main: Pool, judges: Sequence[Judge], cfg: CalibrationConfig, grid: Sequence[int],
                areas: Sequence[float], classes: Sequence[str]) -> list[Pool]:
    """The labelled calibration pool plus one pool per judge, ``cfg.judge_images`` judged images in all."""
    from dynres.model.checkpoint import load_checkpoint
    from dynres.study.static import GridModel

    pools, budget = [main], cfg.judge_images
    rng = np.random.default_rng(cfg.seed)
    for i, judge in enumerate(judges):
        take = budget // (len(judges) - i)
        if take <= 0:
            continue
        model, meta = load_checkpoint(judge.checkpoint)
        if list(meta.classes) != list(classes):
            raise ConfigError(judge.checkpoint, "a judge's classes differ from the calibrated backbone's")
        if not judge.keys:
            log(f"judge {judge.checkpoint} has no images in {judge.store.root}: not used")
            continue
        keys = sorted(rng.choice(judge.keys, min(take, len(judge.keys)), replace=False).tolist())
        budget -= len(keys)
        run = GridModel(model, cfg.backend, threads=1)  # one thread per call: lanes (certify.predict_lanes)
        preds = ViewPredictions(run, judge.store, grid, areas, cfg.exact, cfg.batch_size)
        pools.append(Pool(f"shard backbone {Path(judge.checkpoint).parent.name}", preds, keys))
    return pools


def scale_read_pools(scale_model: str | Path | None, backbone, main: Pool, cfg: CalibrationConfig,
                     areas: Sequence[float], classes: int) -> tuple[int | None, list[ChoicePool]]:
    """The scale model's resolution and the pool that judges its read by the dynamic pipeline's end answers on the
    labelled calibration images (none without a scale model, or when its grid is not calibrated here)."""
    if scale_model is None:
        return None, []
    from dynres.model.checkpoint import load_checkpoint
    from dynres.model.nets import gflops
    from dynres.runtime.engine import PipelineConfig
    from dynres.study.static import GridModel

    scale, meta = load_checkpoint(scale_model)
    grid = tuple(meta.grid or ())
    if meta.scans is not None:
        log(f"the scale model reads {meta.scans} scans whatever the policy says: its read is not calibrated here")
        return None, []
    if meta.train_resolution not in main.preds.grid or not set(grid) <= set(main.preds.grid):
        log(f"the scale model's read is not calibrated: its resolutions {meta.train_resolution}, {grid} are not all "
            f"among the calibrated {main.preds.grid}")
        return None, []
    costs = [gflops(backbone, r) for r in grid]
    choice = ChoiceModel(scale, costs, PipelineConfig().lam, max(len(grid), classes), meta.activation)
    preds = ViewPredictions(GridModel(choice, "eager"), main.preds.store, (meta.train_resolution,), areas, cfg.exact,
                            cfg.batch_size)
    return meta.train_resolution, [ChoicePool(preds, main, grid)]


def sweep_points(pool: Pool, resolutions: Sequence[int], cfg: CalibrationConfig) -> list[dict]:
    """Figure 6 on the labelled pool at the index's crop: accuracy change vs relative bytes, per family."""
    from dynres.policy.calibration import ReadRule

    points = []
    for r in resolutions:
        rules = [ReadRule("count", k) for k in range(1, int(pool.num_scans.max()) + 1)]
        if pool.index is not None and "ssim" in cfg.families:
            rules += [ReadRule("ssim", t) for t in cfg.sweep]
        for rule in rules:
            j = pool.judge(rule, r)
            points.append({"resolution": r, "family": rule.family, "value": rule.value,
                           "relative_bytes": float(j["read"] / j["size"]),
                           "acc_change": 100.0 * float(j["gained"][0] - j["lost"][0]) / j["n"]})
    return points


# --- held-out report -------------------------------------------------------------------------------------------


def calibrate(store: Store, checkpoint: str | Path, out: str | Path, cfg: CalibrationConfig = CalibrationConfig(),
              calib_store: StoreLike | None = None, policy_path: str | Path | None = None,
              scale_model: str | Path | None = None, progress: bool = True, judges: Sequence[Judge] = (),
              static_eval: str | Path | None = None) -> dict:
    """Certify a read rule per resolution, save the policy for ``store`` and write ``calibration.json/.md`` +
    Figure 6 PNG.

    Calibration images: up to ``max_images`` of ``calib_store`` if given (then all of ``store`` is held out), else
    the hashed calibration part of ``store``; plus up to ``cfg.judge_images`` images judged by ``judges`` (e.g.
    :func:`shard_judges`). ``static_eval``: the ``static.json`` of this checkpoint's static evaluation of
    ``store`` (the accuracy stage's): the held-out table takes its full reads from it where they are this
    calibration's (:func:`~dynres.study.calibration_heldout.static_full_reads`) instead of predicting them again.
    Returns the record.
    """
    from dynres.model.checkpoint import load_checkpoint
    from dynres.study.static import GridModel

    t0 = time.perf_counter()
    out = Path(out)
    model, meta = load_checkpoint(checkpoint)
    split = calibration_split(store, checkpoint, meta.classes, cfg, calib_store)
    # the index of the calibration images alone: the rest of the store's only if an SSIM rule is certified
    index = calibration_index(split.calib_src, split.calib_keys, cfg.families, bool(cfg.resolutions))
    crop_side = float(index.meta.get("config", {}).get("crop_side", DEFAULT_CROP_SIDE)) if index else DEFAULT_CROP_SIDE
    resolutions = tuple(cfg.resolutions or index.resolutions)
    if index is not None:
        for r in resolutions:
            index.column(r)  # fails early, naming a resolution the index lacks
    # one model (ORT session) for every search step and the held-out table, on one thread per call: the
    # predictions run in lanes, one per core (dynres.study.certify.predict_lanes)
    run = GridModel(model, cfg.backend, threads=1)
    areas = search_areas(cfg, crop_side)
    main = Pool("calibration split", ViewPredictions(run, split.calib_src, resolutions, areas, cfg.exact,
                                                     cfg.batch_size), split.calib_keys, index)
    pools = build_pools(main, judges, cfg, resolutions, areas, meta.classes)
    scale_res, scale_pools = scale_read_pools(scale_model, model, main, cfg, areas, len(meta.classes))
    certified = []
    n = sum(len(p.keys) for p in pools)
    for r in track(resolutions, len(resolutions), f"calibrate ({n} images, {len(pools)} judges)", progress):
        certified.append(certify_resolution(pools, r, cfg.families, cfg.certification,
                                            scale_pools if r == scale_res else ()))
        c = certified[-1]
        bound = "" if c["bound"] is None else f", bound {c['bound']:.3f} points"
        log(f"{r}px: {ReadRule(**c['rule']).label()} ({c['family']}){bound}, pooled read savings "
            f"{c['read_savings']:.1%}")
    rules = {c["resolution"]: ReadRule(**c["rule"]) for c in certified}
    provenance = _provenance(store, checkpoint, index, split, crop_side, cfg, run.backend, pools)
    policy, extension = materialize(store, index, rules, provenance, progress)
    policy_file = policy.save(policy_path or out / "policy.json")

    crops = tuple(sorted(set(cfg.crops) | {round(crop_side**2, 6)}))
    known = None if static_eval is None else static_full_reads(static_eval, store, checkpoint, run.backend,
                                                               cfg.exact, resolutions, split.held)
    rows, sweep, dynamic = heldout_reports(run, store, checkpoint, scale_model, policy, policy_file, split.held, crops,
                                           cfg, lambda: sweep_points(main, resolutions, cfg), progress, known)
    record = {
        "policy": str(policy_file), "model": str(checkpoint), "store": str(store.root), "split": split.name,
        "calibration_images": len(split.calib_keys), "judged_images": n - len(main.keys),
        "pools": [{"name": p.name, "images": len(p.keys)} for p in pools],
        "heldout_images": len(split.held), "heldout_full_reads_from": None if known is None else str(static_eval),
        "crop_side": crop_side, "calibration_target": cfg.target,
        "delta": cfg.delta, "criterion": cfg.criterion, "families": list(cfg.families),
        "rules": {str(r): rule.to_dict() for r, rule in rules.items()},
        "thresholds": {str(r): t for r, t in policy.thresholds.items()},
        "calibration": rows, "calibration_sweep": sweep,
        "search": certified, "search_crops": [round(c, 6) for c in areas], "seconds": time.perf_counter() - t0,
        "quality_index_extension": extension,
    }
    if dynamic is not None:
        record["dynamic"] = dynamic
    record["summary"] = calibration_summary(record, store, policy, split.held)
    out.mkdir(parents=True, exist_ok=True)
    calibration_sweep(record["calibration_sweep"], out / "calibration_sweep.png")
    write_records(out, "calibration", record, calibration_markdown(record))
    return record


@dataclass(frozen=True)
class CalibrationSplit:
    """The images calibration searches on (``calib_keys`` of ``calib_src``) and the images the result is reported
    on (``held``, of the calibrated store); ``name`` says how they were split."""

    calib_keys: list[str]
    held: list[str]
    calib_src: StoreLike
    name: str


def calibration_keys(keys: Sequence[str], cfg: CalibrationConfig, separate: bool = False
                     ) -> tuple[list[str], list[str]]:
    """(calibration, held-out) keys of a store: its hashed split, or (``separate``: a calibration store's keys)
    all of them and none; at most ``cfg.max_images`` calibration keys, a seeded sample. What the quality index
    needs before calibration runs (:mod:`dynres.study.calibration_index`)."""
    calib_keys, held = (list(keys), []) if separate else split_keys(keys, cfg.holdout_fraction, cfg.seed)
    if len(calib_keys) > cfg.max_images:
        rng = np.random.default_rng(cfg.seed)
        calib_keys = sorted(rng.choice(calib_keys, cfg.max_images, replace=False).tolist())
    return calib_keys, held


def calibration_split(store: Store, checkpoint: str | Path, classes: Sequence[str], cfg: CalibrationConfig,
                      calib_store: StoreLike | None = None) -> CalibrationSplit:
    """Calibration and held-out images (see :func:`calibrate`); the checkpoint's ``classes`` must be the
    stores'."""
    if calib_store is None:
        calib_keys, held = calibration_keys(store.keys, cfg)
        calib_src, name = store, "hashed split of STORE"
    else:
        calib_keys, held = calibration_keys(calib_store.keys, cfg, separate=True)[0], list(store.keys)
        calib_src, name = calib_store, "separate calibration store"
    for s in {id(store): store, id(calib_src): calib_src}.values():
        if list(classes) != list(s.classes):
            raise ConfigError(checkpoint, f"checkpoint classes differ from the classes of store {s.root}")
    if not calib_keys or not held:
        raise StoreError(store.root, f"need calibration and held-out images, got {len(calib_keys)} and {len(held)}")
    return CalibrationSplit(calib_keys, held, calib_src, name)


def _provenance(store: Store, checkpoint: str | Path, index: QualityIndex | None, split: CalibrationSplit,
                crop_side: float, cfg: CalibrationConfig, backend: str, pools: Sequence[Pool]) -> dict:
    """What the policy was calibrated from: saved with it."""
    from dynres.model.checkpoint import checkpoint_digest

    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dynres": __version__,
        "model": str(checkpoint), "model_sha256": checkpoint_digest(checkpoint),
        "store": str(store.root), "store_manifest_hash": manifest_hash(store),
        "calibration_store": str(split.calib_src.root), "calibration_manifest_hash": manifest_hash(split.calib_src),
        "quality_index": index.meta if index is not None else None, "crop_side": crop_side, "target": cfg.target,
        "delta": cfg.delta, "criterion": cfg.criterion, "split": split.name,
        "calibration_images": len(split.calib_keys), "heldout_images": len(split.held), "config": asdict(cfg),
        "pools": [{"name": p.name, "images": len(p.keys)} for p in pools], "backend": backend,
    }
