"""Dynamic evaluation (paper Figures 8/9) and the cost-aware rule beyond the paper.

Per crop and image the scale model reads the prefix at its low resolution and predicts p(r) = P(backbone right at
r). The paper's rule runs the backbone at argmax_r p(r); the cost-aware rule at argmax_r p(r) - lambda * cost(r),
with cost(r) normalized to 1 at the grid's largest resolution, so lambda is dimensionless and sweeping it draws the
dynamic Pareto curve. The cost is the backbone's GFLOPs, or a measured latency per resolution when one is given
(``DynamicConfig.cost_table``; ``dynres eval dynamic --cost-json``). Backbone correctness is looked up in the
static per-image table (same views), so nothing is re-run. Mean GFLOPs include the scale model. The oracle knows
the best resolution per image: its accuracy is "right at some resolution", its cost the cheapest right resolution
(free choice, no scale model). Crops are area fractions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynres.bench.scale import DEFAULT_TAUS, RULES
from dynres.errors import ConfigError
from dynres.io.decode import decode
from dynres.io.store import StoreLike
from dynres.model.checkpoint import checkpoint_digest, load_checkpoint
from dynres.model.nets import gflops
from dynres.paper import crop_side
from dynres.records import markdown_table, write_records
from dynres.report.figures import accuracy_vs_gflops
from dynres.runtime.runners import choose
from dynres.study.scale import auc, predict_scale, scale_inputs
from dynres.study.stages import recorded
from dynres.study.static import EvalConfig, run_static

GUARD_RULES = (*RULES, "anchor-r*")  # "anchor-r*": the anchor at the guard's own r* (chosen on its selection images)
GUARD_ONLY = ("rules", "taus", "recalibrate")  # DynamicConfig settings only the guard reads: not in the evaluation's key
PROBS_FILE = "dynamic_images.parquet"  # the scale model's p(r) per image and crop, beside dynamic.json
# fine where the choices move most (0-0.2), then on to where the rule picks the cheapest resolution for almost any
# p(r): the cost term is λ·cost/max cost, and the paper's grid's smallest step (56 -> 84 px) is 8% of the largest
# cost, so λ = 20 outweighs any difference of p. Stopping at 1 left the sweep no point as cheap as a cheap best
# static resolution (the demo's 25% crop, best at 84 px).
DEFAULT_LAMBDAS = tuple(round(float(x), 3)
                        for x in np.concatenate([np.linspace(0, 0.2, 21), np.linspace(0.25, 1.0, 16),
                                                 (1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)]))


@dataclass(frozen=True)
class DynamicConfig:
    """How the dynamic evaluation chooses and reports: the λ sweep, the tolerance of the reported cost-aware
    choice, the scale model's prefix, the cost the cost-aware rule weighs, and the anchor biases the guard
    (:mod:`dynres.study.verdict`) may choose with λ."""

    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    tolerance: float = 0.5  # accuracy points the cost-aware choice may give up against the best static
    scans: int | None = None  # scale model prefix; None: the scale checkpoint's own setting
    cost_table: dict | None = None  # resolution -> latency (ms) for the cost-aware rule; None: GFLOPs
    plot: bool = True
    # biased rules the guard may choose with λ besides b = 0 (GUARD_RULES; (): b = 0 only, the paper's rule)
    rules: tuple[str, ...] = ()
    taus: tuple[float, ...] = DEFAULT_TAUS  # the anchor rules' bias sizes
    # the guard maps p(r) to the deployed backbone's probability of being right at r (Platt scaling per resolution,
    # fitted on its selection images; dynres.study.recalibrate) before any rule reads it: it served more accurately
    # than the anchored rule, and dynamic more often, on three real-photo runs and the demo (docs/scale-candidates.md)
    recalibrate: bool = True

    def __post_init__(self) -> None:
        if not self.lambdas or min(self.lambdas) < 0:
            raise ConfigError("lambdas", f"need at least one cost weight, each >= 0, got {self.lambdas}")
        if self.tolerance < 0:
            raise ConfigError("tolerance", f"must be >= 0 accuracy points, got {self.tolerance}")
        unknown = sorted(set(self.rules) - set(GUARD_RULES))
        if unknown:
            raise ConfigError("rules", f"unknown rules {unknown} (known: {', '.join(GUARD_RULES)})")
        if min(self.taus, default=0.0) < 0:
            raise ConfigError("taus", f"bias sizes must be >= 0, got {self.taus}")
        if self.recalibrate and "recentred" in self.rules:
            raise ConfigError("rules", "\"recentred\" is fitted on the scale model's own p(r); the guard would add it "
                                       "to the recalibrated p(r): set [dynamic] recalibrate = false to use it")
        anchored = [r for r in self.rules if r != "recentred"]
        if anchored and not self.taus:
            raise ConfigError("taus", f"rules {anchored} need at least one bias size τ")
        if self.scans is not None and self.scans < 1:
            raise ConfigError("scans", f"the scale model reads at least 1 scan, got {self.scans}")


def load_cost_table(path: str | Path) -> dict[int, float]:
    """A JSON object ``{"112": 3.1, ...}`` (resolution -> latency)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {int(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(path, f"need a JSON object resolution -> latency: {err}") from None


def decide(scale, prefix: bytes, crop_area: float, lam: float | None = None,
           cost: np.ndarray | None = None, bias: Sequence[float] | None = None) -> tuple[int, np.ndarray]:
    """One image's decision from the prefix bytes it is given (nothing else is read): the chosen resolution and
    p(r) over the grid. ``scale`` is a scale checkpoint path or ``(model, meta)``; ``crop_area`` the center crop's
    area fraction; ``bias`` the rule's per-resolution term (:func:`dynres.runtime.runners.choose`)."""
    model, meta = load_checkpoint(scale) if isinstance(scale, (str, Path)) else scale
    x = decode(prefix, meta.train_resolution, crop_side(crop_area))[None]
    probs = predict_scale(model, x, meta.activation)
    cost = np.array(meta.grid, dtype=float) ** 2 if cost is None else np.asarray(cost, dtype=float)
    return meta.grid[int(choose(probs, cost, lam, bias)[0])], probs[0]


def run_dynamic(backbone: str | Path, scale_model: str | Path, store: StoreLike, out: str | Path,
                cfg: DynamicConfig = DynamicConfig(), eval_cfg: EvalConfig = EvalConfig(),
                static_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Static + dynamic + oracle + cost-aware records for every crop; writes ``dynamic.json``/``.md``/``.png``.

    The static results come from ``static_dir`` (default ``out``) when a ``run_static`` of this backbone there
    covers the scale model's grid and the crops; otherwise the static evaluation runs first."""
    out = Path(out)
    payload = dynamic_record(backbone, scale_model, store, Path(static_dir) if static_dir else out, cfg, eval_cfg,
                             progress, probs_path=out / PROBS_FILE)
    if cfg.plot:
        payload["plot"] = str(accuracy_vs_gflops(payload, out / "dynamic.png"))
    write_records(out, "dynamic", payload, dynamic_markdown(payload))
    return payload


def static_results(backbone: str | Path, store: StoreLike, static_dir: Path, grid: Sequence[int],
                   eval_cfg: EvalConfig, progress: bool = True) -> dict:
    """The ``run_static`` record in ``static_dir`` if it is of this very backbone (by content) and covers ``grid``
    x ``eval_cfg.crops`` with its per-image table; else a fresh static evaluation there."""
    def covers(static: dict) -> bool:
        return ((static_dir / "static_images.parquet").is_file()
                and static.get("checkpoint_sha256") == checkpoint_digest(backbone)
                and set(grid) <= set(static["grid"]) and set(eval_cfg.crops) <= set(static["crops"]))

    static = recorded(static_dir / "static.json", covers)
    if static is None:
        static = run_static(backbone, store, static_dir, dataclasses.replace(eval_cfg, grid=tuple(grid)),
                            progress=progress)
    return static


def dynamic_record(backbone: str | Path, scale_model: str | Path, store: StoreLike, static_dir: Path,
                   cfg: DynamicConfig = DynamicConfig(), eval_cfg: EvalConfig = EvalConfig(),
                   progress: bool = True, probs_path: Path | None = None) -> dict:
    """Compute :func:`run_dynamic`'s record without writing it (the static evaluation may run and be recorded).
    ``probs_path``: also write the scale model's p(r) per image and crop there (:func:`write_probs`)."""
    smodel, smeta = load_checkpoint(scale_model)
    if smeta.task != "scale":
        raise ConfigError(scale_model, f"not a scale model (task {smeta.task!r})")
    grid = list(smeta.grid)
    static = static_results(backbone, store, static_dir, grid, eval_cfg, progress)
    table = pq.read_table(static_dir / "static_images.parquet")
    bmodel, _ = load_checkpoint(backbone)
    cost_g = np.array([gflops(bmodel, r) for r in grid])
    scale_g = gflops(smodel, smeta.train_resolution)
    cost_rule = _rule_cost(cfg, grid, cost_g)
    correct = {(k, c, r): ok for k, c, r, ok in zip(*(table.column(n).to_pylist()
                                                      for n in ("key", "crop", "resolution", "correct")))}
    keys = list(dict.fromkeys(table.column("key").to_pylist()))
    crops = list(eval_cfg.crops)
    scans = cfg.scans if cfg.scans is not None else smeta.scans
    pairs = [(k, c) for c in crops for k in keys]
    before = store.bytes_read
    images = scale_inputs(store, pairs, smeta.train_resolution, crops, scans, progress, decode_for=max(grid))
    scale_bytes = store.bytes_read - before
    probs_all = predict_scale(smodel, images, smeta.activation)
    if probs_path is not None:
        write_probs(probs_path, pairs, probs_all, grid)

    static_rows = [r for r in static["static"] if r["resolution"] in grid]
    rows: dict[str, list[dict]] = {"dynamic": [], "oracle": [], "cost_aware": [], "summary": [], "auc": []}
    for ci, c in enumerate(crops):
        p = probs_all[ci * len(keys):(ci + 1) * len(keys)]
        ok = np.array([[correct[(k, c, r)] for r in grid] for k in keys], dtype=bool)
        crop_static = [r for r in static_rows if r["crop"] == c]
        for name, value in crop_rows(c, p, ok, grid, cost_g, cost_rule, scale_g, crop_static, cfg).items():
            rows[name] += value
    return {
        "backbone": str(backbone), "scale_model": str(scale_model), "images": len(keys), "grid": grid,
        "crops": crops, "scale_resolution": smeta.train_resolution, "scale_gflops": scale_g, "scale_scans": scans,
        "scale_bytes_read": scale_bytes, "cost_rule": "latency" if cfg.cost_table else "gflops",
        "tolerance": cfg.tolerance,
        "flop_convention": "FlopCounterMode: 2 x MACs; dynamic GFLOPs include the scale model",
        "static": static_rows, "dynamic": rows["dynamic"], "oracle": rows["oracle"], "cost_aware": rows["cost_aware"],
        "summary": rows["summary"], "auc": rows["auc"],
    }


def write_probs(path: Path, pairs: Sequence[tuple[str, float]], probs: np.ndarray, grid: Sequence[int]) -> Path:
    """The scale model's p(r) per (key, crop) as Parquet (``key``, ``crop``, ``probs`` over ``grid``): with the
    static per-image table it is everything a choice rule needs, so the guard (:mod:`dynres.study.verdict`) decides
    on other images than it reports on without running a model again."""
    table = pa.table({"key": [k for k, _ in pairs], "crop": pa.array([c for _, c in pairs], pa.float64()),
                      "probs": pa.array([list(map(float, row)) for row in probs], pa.list_(pa.float32()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({"grid": json.dumps(list(grid))}), path)
    return path


def _rule_cost(cfg: DynamicConfig, grid: Sequence[int], cost_g: np.ndarray) -> np.ndarray:
    """The cost the cost-aware rule weighs: the configured latency per resolution, else the backbone's GFLOPs."""
    if cfg.cost_table is None:
        return cost_g
    missing = [r for r in grid if r not in cfg.cost_table]
    if missing:
        raise ConfigError("cost_table", f"no latency for resolutions {missing}")
    return np.array([cfg.cost_table[r] for r in grid])


def crop_rows(c: float, p: np.ndarray, ok: np.ndarray, grid: Sequence[int], cost_g: np.ndarray,
              cost_rule: np.ndarray, scale_g: float, crop_static: list[dict], cfg: DynamicConfig,
              bias: np.ndarray | None = None) -> dict:
    """One crop area's rows: ``p`` the scale model's p(r) and ``ok`` the backbone's correctness (images x grid);
    ``bias``: the rule's per-resolution term (:func:`dynres.runtime.runners.choose`; None: zero). The AUC is the
    scale model's own, whatever the bias."""
    rows = np.arange(len(ok))

    def point(lam: float | None) -> dict:
        pick = choose(p, cost_rule, lam, bias)
        return {"crop": c, "accuracy": 100 * float(ok[rows, pick].mean()),
                "gflops": float(cost_g[pick].mean() + scale_g), "lambda": lam,
                "mean_resolution": float(np.array(grid)[pick].mean())}

    plain = point(None)
    curve = [point(lam) for lam in cfg.lambdas]
    cheapest_right = np.where(ok.any(1), ok.argmax(1), 0)  # grid is ascending: first right = cheapest
    oracle = {"crop": c, "accuracy": 100 * float(ok.any(1).mean()), "gflops": float(cost_g[cheapest_right].mean())}
    aucs = [{"crop": c, "resolution": r, "auc": auc(p[:, i], ok[:, i].astype(float))} for i, r in enumerate(grid)]
    return {"dynamic": [plain], "oracle": [oracle], "cost_aware": curve, "auc": aucs,
            "summary": [versus_best_static(c, plain, curve, crop_static, cfg.tolerance)]}


def versus_best_static(c: float, plain: dict, curve: list[dict], crop_static: list[dict], tolerance: float) -> dict:
    """The summary row of one crop: the best static resolution against the paper's rule (``plain``), the cheapest
    point of the λ sweep within ``tolerance`` points of it, and the most accurate point at no more GFLOPs."""
    best = max(crop_static, key=lambda r: r["accuracy"])
    ok_points = [q for q in curve if q["accuracy"] >= best["accuracy"] - tolerance]
    pick = min(ok_points, key=lambda q: q["gflops"]) if ok_points else None
    budget = [q for q in curve if q["gflops"] <= best["gflops"]]
    iso = max(budget, key=lambda q: (q["accuracy"], -q["gflops"])) if budget else None
    return {
        "crop": c, "best_static_resolution": best["resolution"], "best_static_accuracy": best["accuracy"],
        "best_static_gflops": best["gflops"], "dynamic_accuracy": plain["accuracy"],
        "dynamic_gflops": plain["gflops"],
        "dynamic_within_1pt": plain["accuracy"] >= best["accuracy"] - 1.0,
        "dynamic_not_costlier": plain["gflops"] <= best["gflops"],
        "lambda": pick["lambda"] if pick else None, "cost_aware_accuracy": pick["accuracy"] if pick else None,
        "cost_aware_gflops": pick["gflops"] if pick else None,
        "cost_aware_savings_pct": 100 * (1 - pick["gflops"] / best["gflops"]) if pick else None,
        "iso_cost_lambda": iso["lambda"] if iso else None, "iso_cost_accuracy": iso["accuracy"] if iso else None,
        "iso_cost_gflops": iso["gflops"] if iso else None,
        "iso_cost_within_1pt": bool(iso and iso["accuracy"] >= best["accuracy"] - 1.0),
    }


def dynamic_markdown(p: dict) -> str:
    """The dynamic record as Markdown: the summary per crop, the iso-cost comparison, the oracle, the AUCs."""
    summary = markdown_table(
        p["summary"],
        ["crop", "best_static_resolution", "best_static_accuracy", "best_static_gflops", "dynamic_accuracy",
         "dynamic_gflops", "lambda", "cost_aware_accuracy", "cost_aware_gflops", "cost_aware_savings_pct"],
        ["Crop (area)", "Best static res", "Acc.", "GFLOPs", "Dynamic acc.", "Dynamic GFLOPs", "λ (cost-aware)",
         "Acc.", "GFLOPs", "Saving vs best static %"])
    iso = markdown_table(
        p["summary"], ["crop", "best_static_accuracy", "best_static_gflops", "iso_cost_lambda", "iso_cost_accuracy",
                       "iso_cost_gflops"],
        ["Crop (area)", "Best static acc.", "Its GFLOPs", "λ", "Dynamic acc.", "Dynamic GFLOPs"])
    oracle = markdown_table(p["oracle"], ["crop", "accuracy", "gflops"], ["Crop", "Oracle acc.", "Oracle GFLOPs"])
    aucs = {}
    for row in p["auc"]:
        aucs.setdefault(row["resolution"], {"resolution": row["resolution"]})[f"c{row['crop']}"] = row["auc"]
    auc_md = markdown_table(list(aucs.values()), ["resolution", *[f"c{c}" for c in p["crops"]]],
                            ["Resolution", *[f"AUC {round(100 * c)}%" for c in p["crops"]]])
    return (f"# Dynamic resolution vs static ({p['images']} images)\n\n"
            f"Scale model at {p['scale_resolution']} px ({p['scale_gflops']:.4f} GFLOPs, included in every dynamic "
            f"number; {p['scale_bytes_read']:,} bytes read for it). GFLOPs = 2 x MACs. Cost-aware rule: "
            f"argmax p(r) - λ·cost(r)/cost(max) with cost = {p['cost_rule']}; λ = the cheapest within "
            f"{p['tolerance']:g} points of the best static.\n\n{summary}\n\n## At the best static resolution's cost\n\n"
            f"The most accurate λ of the sweep whose mean GFLOPs (scale model included) do not exceed the best "
            f"static resolution's.\n\n{iso}\n\n## Oracle\n\n{oracle}\n\n"
            f"## Scale model AUC on this split\n\n{auc_md}\n")
