"""The guard ("never silently worse", issue 18) and the serving configuration it writes for `dynres infer` / `serve`.

Per crop, the study recommends the dynamic pipeline only where held-out evidence shows it at least as accurate as
the best static resolution at no more GFLOPs, and that static resolution everywhere else:

1. Selection, on the calibration part of the validation store (calibration's own split, so that the evidence is on
   exactly the images the pipeline benchmark times): the best static resolution r* (most images right; the cheaper
   on a tie) and the iso-cost λ* (the λ of the sweep with the most images right among those whose mean GFLOPs,
   scale model included, do not exceed r*'s), under the rule `dynres infer` / `serve` run: argmax p(r) −
   λ·GFLOPs(r)/max GFLOPs. Where configured, the rule's bias is chosen with λ (:mod:`dynres.study.bias`: b = 0,
   the anchor τ·onehot(r*) for each τ, rules fitted on the training labels); the serving configuration records
   the chosen bias with λ. Dynamic at λ* must already get at least as many selection images right as r*.
2. Decision, on the held-out part: dynamic at λ* when it also gets at least as many held-out images right as r*
   and its mean GFLOPs there do not exceed r*'s; else static at r*. Correctness is the evaluation's with every scan
   read (serving reads what the calibrated policy allows), each mode on its own engine's pixels
   (:class:`EngineViews`): r* on the static engine's views, the scale model's p(r) and the dynamic picks on the
   dynamic engine's. One table for both moved 21 of 325 answers on the demo (docs/run-config.md).
3. The pipeline stage runs after the guard, at the guard's crop nearest the pipeline's default and at its r* and
   λ* (:func:`pipeline_point`): nothing is chosen on the images it times. The mode it serves is the dynamic one
   only where the guard says dynamic and the timed dynamic row is at that λ*, no less accurate, no costlier in
   GFLOPs and no slower in images/s than the static row (:func:`served_pipeline`).

Everything here reads records (the per-image tables and the scale model's p(r) per image, beside
``dynamic.json``); no model runs.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from dynres.errors import ConfigError
from dynres.paper import crop_area, crop_side
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.runners import choose
from dynres.study.dynamic import PROBS_FILE

RULE = ("per crop: the dynamic pipeline at the iso-cost λ (and, where configured, the rule's bias b: argmax p + b - "
        "λ·cost, p the scale model's p(r), recalibrated per resolution where configured; all fitted and chosen on "
        "the calibration split) where it gets at least "
        "as many images right as the best static resolution (chosen on the calibration split) on the calibration "
        "split and again on the held-out split, at no more mean GFLOPs (scale model included); that static "
        "resolution elsewhere")
SERVING_FILE = "serving.json"
EPS = 1e-12  # GFLOPs compared as floats: equal costs must count as "no more"


# --- the guard --------------------------------------------------------------------------------------------------


def _rule(p: np.ndarray, ok: np.ndarray, cost: np.ndarray, scale_g: float, lam: float,
          mask: np.ndarray, bias: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Per image of ``mask``, right or not, and the mean GFLOPs (scale model included) of the cost-aware rule at
    ``lam`` (and ``bias``)."""
    pick = choose(p[mask], cost, lam, bias)
    return ok[mask][np.arange(len(pick)), pick], float(cost[pick].mean() + scale_g)


def _point(p: np.ndarray, ok: np.ndarray, cost: np.ndarray, scale_g: float, lam: float,
           mask: np.ndarray, bias: np.ndarray | None = None) -> tuple[int, float]:
    """Images right and mean GFLOPs of :func:`_rule`."""
    right, gf = _rule(p, ok, cost, scale_g, lam, mask, bias)
    return int(right.sum()), gf


def discordance(dynamic: np.ndarray, static: np.ndarray) -> dict:
    """How far a comparison of two modes on the same images can be told from chance: the images only ``dynamic``
    gets right, those only ``static`` gets right (both: right or not per image), and McNemar's exact two-sided
    p-value of that split (how likely a split at least this uneven is if neither mode were better). The verdict
    does not use it: it says how much one run's held-out images can tell apart."""
    from scipy.stats import binomtest

    dynamic_only, static_only = int((dynamic & ~static).sum()), int((static & ~dynamic).sum())
    n = dynamic_only + static_only
    p_value = float(binomtest(min(dynamic_only, static_only), n, 0.5).pvalue) if n else 1.0
    return {"dynamic_only": dynamic_only, "static_only": static_only, "p_value": p_value}


def guard_crop(crop: float, p: np.ndarray, ok: np.ndarray, grid: Sequence[int], cost: np.ndarray, scale_g: float,
               lambdas: Sequence[float], select: np.ndarray, baseline_resolution: int | None = None,
               biases: dict[str, np.ndarray | None] | None = None, anchor_taus: Sequence[float] = (),
               ok_static: np.ndarray | None = None, recalibrate: bool = False) -> dict:
    """One crop's decision. ``p``: the scale model's p(r) and ``ok``: the backbone right or not (images x grid) on
    the dynamic engine's views, ``ok_static`` on the static engine's (None: the same views);
    ``cost``: the backbone's GFLOPs per grid resolution; ``select``: True for the selection images (the rest are
    the held-out evidence); ``baseline_resolution``: the common baseline's, reported alongside when on the grid;
    ``biases``: candidate rules by name (a per-resolution bias each, None: zero), chosen together with λ on the
    selection images (default: b = 0 alone, the plain cost-aware rule; on a tie the earlier candidate wins);
    ``anchor_taus``: also the anchor rule at the guard's own r*, b = τ·onehot(r*), for each τ (chosen with λ on the
    selection images too, so the held-out evidence stays unseen); ``recalibrate``: every rule reads p(r) mapped
    to the probability that the backbone is right at r (Platt scaling per resolution, fitted on the selection images:
    :mod:`dynres.study.recalibrate`), recorded as ``recalibration`` (a, c per resolution)."""
    select = np.asarray(select, dtype=bool)
    held = ~select
    ok_static = ok if ok_static is None else np.asarray(ok_static, dtype=bool)
    n_sel, n_held = int(select.sum()), int(held.sum())
    row: dict = {"crop": crop, "selection_images": n_sel, "held_out_images": n_held, "lambda": None}
    if not n_sel or not n_held:
        best = int(np.argmax(ok_static.sum(0)))
        return row | {"mode": "static", "static_resolution": int(grid[best]),
                      "reason": "too few validation images to hold any out: the most accurate static resolution"}
    right_sel = ok_static[select].sum(0)
    best = int(np.argmax(right_sel))  # the first maximum: the cheapest resolution on a tie (the grid ascends)
    budget = float(cost[best])
    static_right = int(ok_static[held, best].sum())
    row |= {"static_resolution": int(grid[best]), "selection_static_accuracy": 100 * right_sel[best] / n_sel,
            "held_static_accuracy": 100 * static_right / n_held, "held_static_gflops": budget}
    if baseline_resolution in grid:
        i = list(grid).index(baseline_resolution)
        row |= {"baseline_resolution": int(baseline_resolution),
                "held_baseline_accuracy": 100 * int(ok_static[held, i].sum()) / n_held,
                "held_baseline_gflops": float(cost[i])}
    if recalibrate:
        from dynres.study.recalibrate import apply_platt, fit_platt

        coef = fit_platt(p[select], ok[select])
        p = apply_platt(p, coef)
        row["recalibration"] = coef.tolist()
    candidates = list((biases or {"b=0": None}).items())
    candidates += [(f"anchor-r*@{t:g}", t * np.eye(len(grid))[best]) for t in anchor_taus]
    affordable = []
    for order, (_, b) in enumerate(candidates):
        for lam in lambdas:
            right, gf = _point(p, ok, cost, scale_g, lam, select, b)
            if gf <= budget + EPS:
                affordable.append((right, -gf, -order, lam))
    if not affordable:
        return row | {"mode": "static", "reason": "no λ of the sweep is as cheap as the best static resolution "
                                                  "(the scale model's own GFLOPs included)"}
    sel_right, neg_gf, neg_order, lam = max(affordable)
    rule, bias = candidates[-neg_order]
    held_right, gf = _rule(p, ok, cost, scale_g, lam, held, bias)
    right = int(held_right.sum())
    row["held_discordance"] = discordance(held_right, ok_static[held, best])
    sel_static = int(right_sel[best])
    if len(candidates) > 1:
        row |= {"rule": rule, "bias": None if bias is None else [float(v) for v in bias]}
    row |= {"lambda": lam, "selection_dynamic_accuracy": 100 * sel_right / n_sel,
            "selection_dynamic_gflops": -neg_gf, "held_dynamic_accuracy": 100 * right / n_held,
            "held_dynamic_gflops": gf}
    named = ("recalibrated p, " if recalibrate else "") + (f"{rule}, " if len(candidates) > 1 else "")
    vs = (f"dynamic ({named}λ={lam:g}) {row['held_dynamic_accuracy']:.1f}% at {gf:.4g} GFLOPs vs static "
          f"{grid[best]} px {row['held_static_accuracy']:.1f}% at {budget:.4g} GFLOPs on {n_held} held-out images")
    if sel_right < sel_static:
        return row | {"mode": "static", "reason": f"less accurate on the {n_sel} selection images "
                                                  f"({row['selection_dynamic_accuracy']:.1f}% vs "
                                                  f"{row['selection_static_accuracy']:.1f}%); held out: {vs}"}
    if right < static_right:
        return row | {"mode": "static", "reason": f"less accurate: {vs}"}
    if gf > budget + EPS:
        return row | {"mode": "static", "reason": f"costlier: {vs}"}
    return row | {"mode": "dynamic", "reason": f"at least as accurate for no more GFLOPs: {vs}"}


@dataclass(frozen=True)
class EngineViews:
    """Which per-image tables (the static evaluation's layout, beside it) hold each engine's pixels, so that each
    mode is judged on what it will serve. ``static``: the static engine's views (each decoded at its own DCT scale,
    :func:`~dynres.io.decode.decode`); ``dynamic``: the dynamic engine's decode-once views (its scale prefix
    decoded once for the grid's largest view, then resized); ``exact_keys``: images whose dynamic backbone view is
    the static engine's anyway (their scale prefix is shorter than the full read the guard judges, so the engine
    reads the rest and decodes it on its own)."""

    static: Path
    dynamic: Path
    exact_keys: frozenset[str] = frozenset()


def correctness(path: str | Path, keys: Sequence[str], crops: Sequence[float], grid: Sequence[int]
                ) -> dict[float, np.ndarray]:
    """Per crop, the backbone right or not (``keys`` x ``grid``) from a per-image table."""
    table = pq.read_table(path)
    correct = {(k, c, r): bool(v) for k, c, r, v in zip(*(table.column(n).to_pylist()
                                                         for n in ("key", "crop", "resolution", "correct")))}
    try:
        return {c: np.array([[correct[(k, c, r)] for r in grid] for k in keys], dtype=bool) for c in crops}
    except KeyError as err:
        raise ConfigError(str(path), f"no prediction for (image, crop, resolution) {err.args[0]}: the table does "
                                     "not cover the dynamic evaluation") from None


def load_evidence(eval_dir: str | Path, table: str | Path | None = None
                  ) -> tuple[list[str], list[int], dict[float, np.ndarray], dict[float, np.ndarray]]:
    """Keys, grid, and per crop the scale model's p(r) and the backbone's correctness (images x grid), from the
    dynamic evaluation's per-image table and the static one beside it (or ``table``)."""
    eval_dir = Path(eval_dir)
    probs = pq.read_table(eval_dir / PROBS_FILE)
    grid = [int(r) for r in json.loads(probs.schema.metadata[b"grid"])]
    keys = list(dict.fromkeys(probs.column("key").to_pylist()))
    by_pair = {(k, c): v for k, c, v in zip(*(probs.column(n).to_pylist() for n in ("key", "crop", "probs")))}
    crops = sorted({c for _, c in by_pair})
    p = {c: np.array([by_pair[(k, c)] for k in keys], dtype=np.float64) for c in crops}
    ok = correctness(table or eval_dir / "static_images.parquet", keys, crops, grid)
    return keys, grid, p, ok


def run_guard(eval_dir: str | Path, dyn: dict, held_keys: Sequence[str], lambdas: Sequence[float],
              baseline_resolution: int | None = None, anchor_taus: Sequence[float] = (),
              biases: dict[str, dict[float, np.ndarray]] | None = None, views: EngineViews | None = None,
              classes: int | None = None, labels: str | Path | None = None, recalibrate: bool = False,
              duplicates: dict | None = None) -> dict:
    """The guard over every crop of the dynamic evaluation in ``eval_dir`` (its record ``dyn`` gives the GFLOPs):
    held-out images are ``held_keys``, the rest select. ``anchor_taus``: also the anchor rule at the guard's r*;
    ``biases``: also these rules (name -> crop -> bias over the grid, e.g. fitted on the training labels by
    :func:`dynres.study.bias.fit_rules`); both chosen with λ on the selection images (:func:`guard_crop`).
    ``views``: each engine's own views (None: both modes judged on the evaluation's table). ``classes``: also
    ``health``, the backbone (on the static engine's views of every image) and the shard backbones of ``labels``
    against chance, with the scale model's AUC (:func:`dynres.study.health.backbone_health`) and ``duplicates``
    across the splits. ``recalibrate``: p(r) recalibrated per crop on the selection images (:func:`guard_crop`)."""
    keys, grid, p, ok = load_evidence(eval_dir, None if views is None else views.dynamic)
    ok_static = ok if views is None else correctness(views.static, keys, sorted(p), grid)
    if views is not None and views.exact_keys:
        exact = np.array([k in views.exact_keys for k in keys])[:, None]
        ok = {c: np.where(exact, ok_static[c], ok[c]) for c in ok}
    gflops = {r["resolution"]: r["gflops"] for r in dyn["static"]}
    cost = np.array([gflops[r] for r in grid], dtype=np.float64)
    held = set(held_keys)
    select = np.array([k not in held for k in keys])
    rows = [guard_crop(c, p[c], ok[c], grid, cost, float(dyn["scale_gflops"]), lambdas, select, baseline_resolution,
                       _crop_biases(biases, c), anchor_taus, ok_static[c], recalibrate)
            for c in sorted(p)]
    seen = ({"static": Path(views.static).name, "dynamic": Path(views.dynamic).name,
             "dynamic_exact_images": sum(k in views.exact_keys for k in keys)} if views is not None else
            {"static": "static_images.parquet", "dynamic": "static_images.parquet", "dynamic_exact_images": 0})
    guard = {"rule": RULE, "cost": "gflops", "selection_images": int(select.sum()),
             "held_out_images": int((~select).sum()), "anchor_taus": list(anchor_taus), "recalibrated": recalibrate,
             "rules": sorted(biases or {}) + (["anchor-r*"] if anchor_taus else []), "views": seen, "crops": rows}
    if classes is None:
        return guard
    from dynres.study.health import backbone_health

    aucs = [a["auc"] for a in dyn.get("auc", [])]
    return guard | {"health": backbone_health(ok_static, grid, classes, labels, aucs, duplicates)}


def _crop_biases(biases: dict[str, dict[float, np.ndarray]] | None, crop: float) -> dict | None:
    """The candidate rules at ``crop`` (b = 0 first), or None (b = 0 alone) when there are none."""
    if not biases:
        return None
    out: dict[str, np.ndarray | None] = {"b=0": None}
    for name, per_crop in biases.items():
        matches = [b for c, b in per_crop.items() if abs(float(c) - crop) < 1e-6]
        if not matches:
            raise ConfigError("bias", f"rule {name!r} has no bias at crop {crop:g}")
        out[name] = np.asarray(matches[0], dtype=np.float64)
    return out


def nearest(rows: Sequence[dict], area: float) -> dict:
    """The guard row of the crop nearest to ``area`` (an area fraction)."""
    return min(rows, key=lambda r: abs(r["crop"] - area))


def pipeline_point(guard: dict, lambdas: Sequence[float], side: float = PipelineConfig.crop_side) -> dict:
    """The operating point the pipeline stage times, fixed before it runs: the guard's crop nearest ``side``'s
    area (as a side ratio), its r*, its λ*, its rule's bias and its recalibration of p(r); where the guard found no
    affordable λ, the sweep's largest (the cheapest rule), so that the dynamic rows still run, for reference. Keys
    are :class:`~dynres.bench.pipeline.PipelineBenchConfig` fields."""
    row = nearest(guard["crops"], crop_area(side))
    lam = row["lambda"] if row.get("lambda") is not None else max(lambdas)
    bias = row.get("bias") if row.get("lambda") is not None else None  # the rule chosen with λ*
    recal = row.get("recalibration")  # fitted before λ, so there even where no λ was affordable
    return {"crop_side": crop_side(row["crop"]), "static_resolution": int(row["static_resolution"]),
            "lam": float(lam), "bias": None if bias is None else tuple(float(b) for b in bias),
            "recalibration": None if recal is None else tuple((float(a), float(c)) for a, c in recal)}


def _pipeline_objection(row: dict, pipe: dict, dynamic: str) -> str | None:
    """Why the pipeline's timed dynamic row may not be served although the guard chose dynamic (None: it may)."""
    rows, run_lam = pipe["pipeline"], pipe.get("lams", {}).get(dynamic)
    dyn, static = rows[dynamic], rows["static_tuned"]
    area = crop_area(pipe.get("config", {}).get("crop_side", PipelineConfig.crop_side))
    if abs(area - row["crop"]) > 1e-6 or pipe.get("static_resolution") != row["static_resolution"] \
            or run_lam is None or abs(run_lam - row["lambda"]) > EPS:
        return (f"the pipeline ran at crop {area:.3g}, static {pipe.get('static_resolution')} px, λ={run_lam}, not "
                f"at the guard's crop {row['crop']:g}, {row['static_resolution']} px, λ={row['lambda']:g}")
    if (row.get("bias") or None) != (pipe.get("bias") or None):
        return f"the pipeline timed another bias than the guard's rule ({row.get('rule', 'b=0')})"
    guard_recal, timed_recal = (np.asarray(r.get("recalibration") or [], dtype=np.float64) for r in (row, pipe))
    if guard_recal.shape != timed_recal.shape or not np.allclose(guard_recal, timed_recal, rtol=0, atol=1e-12):
        return "the pipeline timed another recalibration of p(r) than the guard's"
    if (dyn.get("accuracy") or 0.0) < (static.get("accuracy") or 0.0):
        return (f"its {dynamic} run was less accurate than the static row on the pipeline's images "
                f"({dyn.get('accuracy') or 0.0:.2f}% vs {static.get('accuracy') or 0.0:.2f}%)")
    if dyn.get("gflops") is None or static.get("gflops") is None or dyn["gflops"] > static["gflops"] + EPS:
        return f"its {dynamic} run was costlier in GFLOPs than the static row (or the record has no GFLOPs)"
    if dyn["images_per_s"] < static["images_per_s"]:
        return (f"its {dynamic} run was slower in images/s than the static row ({dyn['images_per_s']:.1f} vs "
                f"{static['images_per_s']:.1f}, at {dyn['accuracy']:.2f}% vs {static['accuracy']:.2f}% and "
                f"{dyn['gflops']:.4g} vs {static['gflops']:.4g} GFLOPs)")
    return None


def served_pipeline(guard: dict, pipe: dict) -> dict:
    """Which of the pipeline benchmark's modes the study serves: the dynamic variant the benchmark reports
    (``ratios.dynamic_mode``) only where the guard says dynamic at the benchmark's crop, the benchmark ran that
    crop at the guard's r* and λ*, and that variant's row is no less accurate, no costlier in GFLOPs and no slower
    in images/s than the static row; else the static row."""
    rows = pipe["pipeline"]
    area = crop_area(pipe.get("config", {}).get("crop_side", PipelineConfig.crop_side))
    row = nearest(guard["crops"], area)
    dynamic = pipe.get("ratios", {}).get("dynamic_mode", "dynamic")
    if row["mode"] != "dynamic":
        served, reason = "static_tuned", f"the guard chose static at crop {row['crop']:g}: {row['reason']}"
    elif (objection := _pipeline_objection(row, pipe, dynamic)) is not None:
        served, reason = "static_tuned", f"the guard chose dynamic at crop {row['crop']:g}, but {objection}"
    else:
        served, reason = dynamic, f"the guard chose dynamic at crop {row['crop']:g}: {row['reason']}"
    keep = ("images_per_s", "accuracy", "gflops", "bytes_per_image", "p50_ms", "p99_ms")
    return {"crop": area, "guard_crop": row["crop"], "served": served, "reason": reason,
            "lambda": pipe.get("lams", {}).get(dynamic), "dynamic_mode": dynamic,
            "static_resolution": pipe.get("static_resolution"), "baseline_resolution": pipe.get("baseline_resolution"),
            "rows": {name: {k: rows[name].get(k) for k in keep}
                     for name in dict.fromkeys((served, dynamic, "static_tuned", "baseline")) if name in rows}}


# --- the serving configuration ------------------------------------------------------------------------------------


def serving_entry(row: dict, store: str, backbone: str, scale: str, policy: str | None,
                  kernels: str = "tuned") -> dict:
    """One crop's serving configuration: the engine spec (static: the backbone alone at r*, no scale model) and the
    `dynres infer` / `dynres serve` command lines that run it (a dynamic entry with the guard's λ*, bias and
    recalibration of p(r))."""
    side = crop_side(row["crop"])
    static = row["mode"] != "dynamic"
    bias = None if static or row.get("bias") is None else tuple(float(b) for b in row["bias"])
    recal = None if static or row.get("recalibration") is None else row["recalibration"]
    cfg = PipelineConfig(crop_side=side, resolution=row["static_resolution"] if static else None,
                         lam=0.0 if static else float(row["lambda"]), bias=bias, recalibration=recal)
    spec = EngineSpec(store, backbone, None if static else scale, policy, kernels, cfg)
    mode = (["--resolution", str(row["static_resolution"])] if static
            else ["--scale", scale, "--lambda", f"{row['lambda']:g}",
                  *(["--bias", ",".join(repr(b) for b in bias)] if bias else []),
                  *(["--recalibration", ";".join(f"{a!r},{c!r}" for a, c in cfg.recalibration)]
                    if cfg.recalibration else [])])
    common = ["--model", backbone, *mode, *(["--policy", policy] if policy else []), "--kernels", kernels]
    return {"crop": row["crop"], "mode": "static" if static else "dynamic", "resolution": cfg.resolution,
            "lambda": None if static else cfg.lam, "rule": None if static else row.get("rule", "b=0"),
            "bias": None if bias is None else list(bias),
            "recalibration": None if cfg.recalibration is None else [list(p) for p in cfg.recalibration],
            "reason": row["reason"],
            "engine": asdict(spec),
            "infer": shlex.join(["dynres", "infer", store, *common, "--crop", f"{side:.4g}"]),
            "serve": shlex.join(["dynres", "serve", *common, "--crop", f"{side:.4g}", "--store", store])}


def serving_config(guard: dict, store: str, backbone: str, scale: str, policy: str | None,
                   kernels: str = "tuned") -> dict:
    """Every crop's serving entry, and as ``default`` the one at the crop `dynres infer` / `serve` use unless told
    (:attr:`PipelineConfig.crop_side`)."""
    entries = [serving_entry(row, store, backbone, scale, policy, kernels) for row in guard["crops"]]
    default = nearest(entries, crop_area(PipelineConfig.crop_side))
    return {"rule": guard["rule"], "default": default, "crops": entries}


def engine_spec(entry: dict) -> EngineSpec:
    """The :class:`EngineSpec` of a serving entry (as :func:`dynres.runtime.engine.build_engine` takes it)."""
    spec = dict(entry["engine"])
    return EngineSpec(**{**spec, "config": PipelineConfig(**spec["config"])})
