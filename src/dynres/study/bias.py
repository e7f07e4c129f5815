"""Per-resolution biases for the choice rule: argmax_r p(r) + b(r) - λ·cost(r)/max cost (issue 18).

Where the scale model's p(r) is mostly image difficulty plus noise (real photos with a weak backbone), today's rule
(b = 0) scatters images over resolutions at random, and its accuracy is an average over resolutions instead of the
best one; the best static resolution is not a point of the λ sweep. A bias makes the static resolution a limit of
the rule family, so a rule that learned nothing degrades to it instead of losing to it:

- ``anchor``: b = τ·onehot(r*), r* the resolution most often right on the training labels at that crop (the
  cheapest on a tie). τ = 0 is today's rule; a τ larger than any p difference is static r* (plus the scale
  model's cost); between them the scale model moves an image off r* only where it is sure enough.
- ``recentred``: b(r) = base_rate(r) - mean p(r) over the training images, so that an uninformative scale model
  (p = its mean everywhere) picks the resolution most often right on the training labels. The training images'
  p is mostly in-sample (the scale model trained on them, all but its held-out tenth): it is closer to the labels
  than validation p is; :func:`fit_rules` records both means so that the record shows how much that matters.

Both are fitted only from the chain's training labels (``scale_labels.parquet``: each row judged by the shard
backbone that did not see the image) and the scale model's p on those training images; never from validation
images. They are judged on the validation evidence the guard reads (:func:`biased_record`; no model runs there).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from dynres.bench.scale import RULES
from dynres.errors import ConfigError
from dynres.io.store import StoreLike
from dynres.model.checkpoint import load_checkpoint
from dynres.study.dynamic import DynamicConfig, crop_rows
from dynres.study.scale import multi_hot, predict_scale, read_labels, scale_inputs
from dynres.study.verdict import guard_crop, load_evidence


def base_rates(labels: pa.Table, grid: Sequence[int]) -> dict[float, np.ndarray]:
    """Per crop: the fraction of labelled training images whose held-out backbone is right at each resolution."""
    answers = multi_hot(labels, grid)
    crops = sorted({c for _, c in answers})
    return {c: np.mean([v for (_, crop), v in answers.items() if crop == c], axis=0).astype(np.float64)
            for c in crops}


def anchor_bias(rates: np.ndarray, tau: float) -> np.ndarray:
    """τ at the resolution most often right (the first maximum: the grid ascends, so the cheaper on a tie)."""
    if tau < 0:
        raise ConfigError("tau", f"must be >= 0, got {tau}")
    bias = np.zeros(len(rates))
    bias[int(np.argmax(rates))] = tau
    return bias


def recentred_bias(rates: np.ndarray, p_mean: np.ndarray) -> np.ndarray:
    """base_rate(r) - mean p(r): the rule of a scale model that outputs its mean everywhere is argmax base_rate."""
    return np.asarray(rates, dtype=np.float64) - np.asarray(p_mean, dtype=np.float64)


def heldout_keys(keys: Sequence[str], holdout: float, seed: int) -> set[str]:
    """The scale model's own held-out training images, drawn as :func:`dynres.study.scale.train_scale` draws them
    (its recipe's ``holdout`` and ``seed``): the training images whose p is out of sample."""
    order = sorted(keys)
    random.Random(seed + 1).shuffle(order)
    return set(order[: int(round(holdout * len(order)))])


def train_probs(scale_model: str | Path, store: StoreLike, labels: pa.Table,
                progress: bool = True) -> tuple[list[str], dict[float, np.ndarray]]:
    """The scale model's p(r) on every labelled training (image, crop): the keys and, per crop, keys x grid."""
    model, meta = load_checkpoint(scale_model)
    keys = sorted(set(labels.column("key").to_pylist()))
    crops = sorted(set(labels.column("crop").to_pylist()))
    pairs = [(k, c) for c in crops for k in keys]
    probs = predict_scale(model, scale_inputs(store, pairs, meta.train_resolution, crops, meta.scans, progress),
                          meta.activation)
    return keys, {c: probs[i * len(keys):(i + 1) * len(keys)].astype(np.float64) for i, c in enumerate(crops)}


def fit_rules(labels: pa.Table, grid: Sequence[int], keys: Sequence[str], p_train: dict[float, np.ndarray],
              held: set[str], rules: Sequence[str], taus: Sequence[float]) -> tuple[list[dict], list[dict]]:
    """The candidate rules (``name``, ``rule``, ``tau``, ``bias`` per crop) and, per crop, what they were fitted
    from: base rates, r*, and the mean p over all training images and over the scale model's held-out ones."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise ConfigError("rules", f"unknown rules {sorted(unknown)} (known: {', '.join(RULES)})")
    rates = base_rates(labels, grid)
    out_of_sample = np.array([k in held for k in keys])
    fitted = [{"crop": c, "anchor_resolution": int(grid[int(np.argmax(rates[c]))]),
               "base_rate": rates[c].tolist(), "p_mean_train": p_train[c].mean(0).tolist(),
               "p_mean_heldout": p_train[c][out_of_sample].mean(0).tolist() if out_of_sample.any() else None}
              for c in sorted(rates)]
    candidates = []
    if "anchor" in rules:
        candidates += [{"name": f"anchor@{t:g}", "rule": "anchor", "tau": float(t),
                        "bias": {c: anchor_bias(rates[c], t) for c in rates}} for t in taus]
    if "recentred" in rules:
        candidates.append({"name": "recentred", "rule": "recentred", "tau": None,
                           "bias": {c: recentred_bias(rates[c], p_train[c].mean(0)) for c in rates}})
    return candidates, fitted


def fit_chain_rules(run: str | Path, train_store: StoreLike, rules: Sequence[str], taus: Sequence[float],
                    progress: bool = True) -> tuple[list[dict], dict]:
    """The rules fitted on an accuracy chain's training labels (``run/scale/scale_labels.parquet``) and its scale
    model's p on those images (:func:`fit_rules`' candidates), and what they were fitted from (``fit`` per crop,
    ``train_images``, ``p_out_of_sample_images``: the scale model's own held-out training images)."""
    run = Path(run)
    scale_model = run / "scale" / "scale_model" / "model.pt"
    _, meta = load_checkpoint(scale_model)
    labels = read_labels(run / "scale" / "scale_labels.parquet", train_store)
    keys, p_train = train_probs(scale_model, train_store, labels, progress)
    held = heldout_keys(keys, float(meta.recipe.get("holdout", 0.0)), int(meta.recipe.get("seed", 0)))
    candidates, fitted = fit_rules(labels, meta.grid, keys, p_train, held, rules, taus)
    return candidates, {"fit": fitted, "train_images": len(keys), "p_out_of_sample_images": len(held)}


def biased_record(eval_dir: str | Path, dyn: dict, bias: dict[float, np.ndarray] | None = None,
                  cfg: DynamicConfig = DynamicConfig(plot=False), keys: Sequence[str] | None = None) -> dict:
    """The dynamic evaluation's ``summary``/``auc``/``oracle``/``cost_aware`` rows under a biased rule, from the
    evidence beside ``dynamic.json`` in ``eval_dir`` (its record ``dyn``: GFLOPs and static rows); ``keys``: only
    those validation images (default all). ``bias=None`` gives the record's own numbers again."""
    all_keys, grid, p, ok = load_evidence(eval_dir)
    mask = np.ones(len(all_keys), dtype=bool) if keys is None else np.isin(all_keys, list(keys))
    gflops = {r["resolution"]: r["gflops"] for r in dyn["static"]}
    cost = np.array([gflops[r] for r in grid], dtype=np.float64)
    rows: dict[str, list[dict]] = {}
    for c in sorted(p):
        b = None if bias is None else _crop_bias(bias, c)
        right = ok[c][mask]
        static = [{"crop": c, "resolution": r, "accuracy": 100 * float(right[:, i].mean()), "gflops": cost[i]}
                  for i, r in enumerate(grid)]
        for name, value in crop_rows(c, p[c][mask], right, grid, cost, cost, float(dyn["scale_gflops"]), static, cfg,
                                     b).items():
            rows.setdefault(name, []).extend(value)
    return rows | {"grid": grid, "images": int(mask.sum())}


def _crop_bias(bias: dict[float, np.ndarray], crop: float) -> np.ndarray:
    """The bias fitted at ``crop`` (crops are matched to 1e-6: they come from different files)."""
    for c, b in bias.items():
        if abs(c - crop) < 1e-6:
            return b
    raise ConfigError("bias", f"no bias fitted at crop {crop:g} (fitted at {sorted(bias)})")


def guarded_rows(eval_dir: str | Path, dyn: dict, candidates: Sequence[dict], lambdas: Sequence[float],
                 taus: Sequence[float], splits: int = 20) -> list[dict]:
    """The honest numbers for each rule family: the validation images are split in two halves (``splits`` seeded
    shuffles, each half selecting once); the guard (:func:`dynres.study.verdict.guard_crop`) chooses r*, the rule
    and λ on one half and is judged on the other. Families: ``b=0`` (the paper's rule), ``train-rules`` (b = 0 or a
    rule fitted on the training labels), ``anchor-r*`` (b = 0 or τ·onehot(the guard's own r*), τ in ``taus``),
    ``all`` (every one of them), ``recalibrated`` (b = 0 on p(r) recalibrated on the selecting half,
    :mod:`dynres.study.recalibrate`) and ``recalibrated+anchor-r*``.
    Per (family, crop, split, half): the held-out accuracy of the dynamic rule chosen and of r*, and of what the
    guard serves; ``held_best_static_accuracy`` is the held half's own best static resolution (chosen on the
    images it is scored on, so optimistic: the number the bench's "best static" columns compare with)."""
    keys, grid, p, ok = load_evidence(eval_dir)
    gflops = {r["resolution"]: r["gflops"] for r in dyn["static"]}
    cost = np.array([gflops[r] for r in grid], dtype=np.float64)
    rows = []
    for split in range(splits):
        order = list(range(len(keys)))
        random.Random(split).shuffle(order)
        first = np.zeros(len(keys), dtype=bool)
        first[order[: len(keys) // 2]] = True
        for c in sorted(p):
            trained = {"b=0": None} | {cand["name"]: _crop_bias(cand["bias"], c) for cand in candidates}
            families = {"b=0": ({"b=0": None}, (), False), "train-rules": (trained, (), False),
                        "anchor-r*": ({"b=0": None}, taus, False), "all": (trained, taus, False),
                        "recalibrated": ({"b=0": None}, (), True), "recalibrated+anchor-r*": ({"b=0": None}, taus, True)}
            for family, (biases, anchor_taus, recalibrate) in families.items():
                for half, select in enumerate((first, ~first)):
                    g = guard_crop(c, p[c], ok[c], grid, cost, float(dyn["scale_gflops"]), lambdas, select,
                                   biases=biases, anchor_taus=anchor_taus, recalibrate=recalibrate)
                    rows.append(_guarded_row(family, split, half, g, ok[c][~select]))
    return rows


def _guarded_row(family: str, split: int, half: int, g: dict, held_ok: np.ndarray) -> dict:
    """One guard decision, judged on its held-out half."""
    dynamic, static = g.get("held_dynamic_accuracy"), g.get("held_static_accuracy")
    served = dynamic if g["mode"] == "dynamic" else static
    return {"family": family, "crop": g["crop"], "split": split, "half": half, "mode": g["mode"],
            "rule": g.get("rule"), "lambda": g.get("lambda"), "static_resolution": g.get("static_resolution"),
            "held_static_accuracy": static, "held_dynamic_accuracy": dynamic, "served_accuracy": served,
            "held_dynamic_gflops": g.get("held_dynamic_gflops"), "held_static_gflops": g.get("held_static_gflops"),
            "held_best_static_accuracy": 100 * float(held_ok.mean(0).max())}


def guarded_summary(rows: Sequence[dict]) -> list[dict]:
    """Per (family, crop), means over every split and half (points): the dynamic rule the guard chose against its
    r* on the held-out half, what it serves against r*, and against the held half's own best static resolution;
    how often it served dynamic, the rules it chose and how often none was affordable."""
    out = []
    for family in dict.fromkeys(r["family"] for r in rows):
        for crop in dict.fromkeys(r["crop"] for r in rows):
            cell = [r for r in rows if r["family"] == family and r["crop"] == crop]
            dyn = [r["held_dynamic_accuracy"] - r["held_static_accuracy"] for r in cell
                   if r["held_dynamic_accuracy"] is not None]
            rules: dict[str, int] = {}
            for r in cell:
                rules[str(r["rule"])] = rules.get(str(r["rule"]), 0) + 1
            out.append({
                "family": family, "crop": crop, "decisions": len(cell),
                "dynamic_vs_r_star": float(np.mean(dyn)) if dyn else None,
                "served_vs_r_star": float(np.mean([r["served_accuracy"] - r["held_static_accuracy"] for r in cell])),
                "served_vs_held_best_static": float(np.mean([r["served_accuracy"] - r["held_best_static_accuracy"]
                                                              for r in cell])),
                "dynamic_served_pct": 100 * float(np.mean([r["mode"] == "dynamic" for r in cell])),
                "no_affordable_pct": 100 * float(np.mean([r["held_dynamic_accuracy"] is None for r in cell])),
                "rules_chosen": ", ".join(f"{k} x{v}" for k, v in sorted(rules.items(), key=lambda kv: -kv[1])),
            })
    return out


def guard_rules(run: str | Path, cfg: DynamicConfig, train_store: StoreLike | None,
                progress: bool = True) -> dict:
    """:func:`dynres.study.verdict.run_guard`'s rule arguments for ``cfg.rules``: ``anchor_taus`` for the anchor
    at the guard's own r*, ``biases`` for the rules fitted on the chain's training labels (needs ``train_store``)."""
    fitted = [r for r in cfg.rules if r in RULES]
    if fitted and train_store is None:
        raise ConfigError("rules", f"{fitted} are fitted on the training labels: give the training store")
    candidates = fit_chain_rules(run, train_store, fitted, cfg.taus, progress)[0] if fitted else []
    return {"anchor_taus": tuple(cfg.taus) if "anchor-r*" in cfg.rules else (),
            "biases": {c["name"]: c["bias"] for c in candidates} or None}
