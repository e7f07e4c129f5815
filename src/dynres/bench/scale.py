"""``dynres bench scale``: scale-model candidates compared on held-out validation data (issue 18, item 3).

Each candidate is one way to train the scale model (its ``ScaleConfig.target``), trained on the same labels (one
accuracy chain's shard-backbone labels) with the same recipe and seed, and judged the way the dynamic pipeline
uses it: on the validation images, against the chain's backbone, per crop: the scale model's AUC per resolution,
the accuracy of its argmax choice, and the accuracy of the cost-aware rule at no more GFLOPs than the best static
resolution (iso-cost). Several seeds measure how much of a difference is training noise. The runner lives in
:mod:`dynres.study.scale_compare` (it trains and evaluates); this module holds the settings and the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynres.errors import ConfigError
from dynres.model.probe import parse_probe
from dynres.records import markdown_table, write_records

RULES = ("anchor", "recentred")  # :mod:`dynres.study.bias`
DEFAULT_TAUS = (0.02, 0.05, 0.1, 0.2, 1.0)  # τ = 1 exceeds any difference of probabilities: static r*


@dataclass(frozen=True)
class ScaleBenchConfig:
    """Which targets (``ScaleConfig.target`` values) and seeds to train; everything else is the run's recipe.
    ``probes``: backbone-probe candidates (:func:`dynres.model.probe.parse_probe` specs, e.g. ``softmax-linear``)
    judged beside them."""

    targets: tuple[str, ...] = ("correct", "prob", "margin")
    seeds: tuple[int, ...] = (0,)
    probes: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()  # biased choice rules (RULES) on the run's own scale model; none by default
    taus: tuple[float, ...] = DEFAULT_TAUS  # the anchor rule's bias sizes

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rules) - set(RULES))
        if unknown or len(set(self.rules)) != len(self.rules):
            raise ConfigError("rules", f"need distinct rules among {', '.join(RULES)}, got {list(self.rules)}")
        if "anchor" in self.rules and (not self.taus or min(self.taus) < 0):
            raise ConfigError("taus", f"the anchor rule needs bias sizes >= 0, got {list(self.taus)}")
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError("targets", f"need distinct targets, got {list(self.targets)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"need distinct seeds, got {list(self.seeds)}")
        if len({parse_probe(p).name for p in self.probes}) != len(self.probes):  # parsing refuses a bad spec
            raise ConfigError("probes", f"need distinct probes, got {list(self.probes)}")


def candidate_rows(target: str, seed: int, scale: dict, dynamic: dict) -> list[dict]:
    """One row per crop for one trained candidate: ``scale`` is its scale record (train_scale's payload), ``dynamic``
    its dynamic evaluation record on the validation images."""
    label_aucs = [a["auc"] for a in scale["auc"] if a["auc"] is not None]
    oracle = {o["crop"]: o["accuracy"] for o in dynamic["oracle"]}
    rows = []
    for s in dynamic["summary"]:
        aucs = [a["auc"] for a in dynamic["auc"] if a["crop"] == s["crop"] and a["auc"] is not None]
        rows.append({
            "target": target, "seed": seed, "crop": s["crop"],
            "auc_min": min(aucs) if aucs else None, "auc_mean": float(np.mean(aucs)) if aucs else None,
            "label_auc_mean": float(np.mean(label_aucs)) if label_aucs else None,
            "argmax_accuracy": s["dynamic_accuracy"], "argmax_gflops": s["dynamic_gflops"],
            "iso_cost_accuracy": s["iso_cost_accuracy"], "iso_cost_gflops": s["iso_cost_gflops"],
            "best_static_resolution": s["best_static_resolution"], "best_static_accuracy": s["best_static_accuracy"],
            "best_static_gflops": s["best_static_gflops"], "oracle_accuracy": oracle.get(s["crop"]),
        })
    return rows


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (target, crop): the mean over seeds, with the iso-cost and argmax accuracy against the best static
    resolution (points); then per target over crops (``crop`` "all": mean gaps, the worst AUC)."""
    out = []
    targets = list(dict.fromkeys(r["target"] for r in rows))
    crops = list(dict.fromkeys(r["crop"] for r in rows))
    for target in targets:
        per_crop = []
        for crop in crops:
            cell = [r for r in rows if r["target"] == target and r["crop"] == crop]
            best = cell[0]["best_static_accuracy"]
            iso = _mean([r["iso_cost_accuracy"] for r in cell])
            argmax = _mean([r["argmax_accuracy"] for r in cell])
            per_crop.append({
                "target": target, "crop": crop, "seeds": len(cell), "auc_min": _mean([r["auc_min"] for r in cell]),
                "auc_mean": _mean([r["auc_mean"] for r in cell]), "argmax_accuracy": argmax,
                "argmax_vs_best_static": None if argmax is None else argmax - best,
                "iso_cost_accuracy": iso, "iso_cost_vs_best_static": None if iso is None else iso - best,
                "best_static_accuracy": best, "oracle_accuracy": cell[0]["oracle_accuracy"],
            })
        out += per_crop
        out.append({"target": target, "crop": "all", "seeds": per_crop[0]["seeds"],
                    "auc_min": min((r["auc_min"] for r in per_crop if r["auc_min"] is not None), default=None),
                    "auc_mean": _mean([r["auc_mean"] for r in per_crop]),
                    "argmax_vs_best_static": _mean([r["argmax_vs_best_static"] for r in per_crop]),
                    "iso_cost_vs_best_static": _mean([r["iso_cost_vs_best_static"] for r in per_crop])})
    return out


SUMMARY_COLUMNS = ["target", "crop", "seeds", "auc_min", "auc_mean", "argmax_accuracy", "argmax_vs_best_static",
                   "iso_cost_accuracy", "iso_cost_vs_best_static", "best_static_accuracy", "oracle_accuracy"]
ROW_COLUMNS = ["target", "seed", "crop", "auc_min", "auc_mean", "label_auc_mean", "argmax_accuracy",
               "argmax_gflops", "iso_cost_accuracy", "iso_cost_gflops", "best_static_resolution",
               "best_static_accuracy", "best_static_gflops", "probe_reused_pct"]


def bench_scale_markdown(payload: dict) -> str:
    """The record as Markdown: the summary per target and crop, then every (target, seed, crop) row."""
    return (f"# Scale-model candidates on {payload['val_images']} validation images\n\n"
            f"Run: `{payload['run']}`; labels: {payload['labelled_images']} labelled training images; scale model "
            f"{payload['scale_arch']} at {payload['scale_resolution']} px; seeds {payload['seeds']}. Accuracy in "
            "percent; AUC per resolution against the backbone's correctness on the validation images (min and "
            "mean over the grid); label_auc_mean: on the labels' held-out tenth. Iso-cost: the cost-aware rule's "
            "best accuracy at no more GFLOPs than the best static resolution of the crop.\n\n"
            + _probe_text(payload) +
            "## Summary (mean over seeds)\n\n" + markdown_table(payload["summary"], SUMMARY_COLUMNS)
            + _rules_text(payload.get("rules") or {})
            + "\n\n## Every run\n\n" + markdown_table(payload["rows"], ROW_COLUMNS))


GUARDED_COLUMNS = ["family", "crop", "decisions", "dynamic_vs_r_star", "served_vs_r_star",
                   "served_vs_held_best_static", "dynamic_served_pct", "no_affordable_pct", "rules_chosen"]


def _rules_text(rules: dict) -> str:
    """The biased rules' fits and the guard's two-half selection, when the bench ran any."""
    if not rules:
        return ""
    fit = [{"crop": f["crop"], "anchor_resolution": f["anchor_resolution"],
            "base_rate": " ".join(f"{100 * v:.1f}" for v in f["base_rate"]),
            "p_mean_train": " ".join(f"{100 * v:.1f}" for v in f["p_mean_train"]),
            "p_mean_heldout": " ".join(f"{100 * v:.1f}" for v in f["p_mean_heldout"] or [])} for f in rules["fit"]]
    return ("\n\n## Biased rules (argmax p + b - λ·cost)\n\nRows `b=0` (today's rule), `anchor@τ` and `recentred`"
            " above are the run's own scale model under each rule, fitted on the training labels "
            f"({rules['train_images']} images; p on them is in-sample for the scale model except on its "
            f"{rules['p_out_of_sample_images']} held-out images). Fits per crop (percent, over the grid):\n\n"
            + markdown_table(fit, ["crop", "anchor_resolution", "base_rate", "p_mean_train", "p_mean_heldout"])
            + "\n\nThe guard's choice judged honestly: the validation images split in halves (each split twice, "
            "every half selecting once); r*, the rule and λ chosen on one half, scored on the other (points; "
            "served_vs_held_best_static compares with the scored half's own best static resolution, chosen on "
            "the images it is scored on):\n\n" + markdown_table(rules["guarded_summary"], GUARDED_COLUMNS))


def _probe_text(payload: dict) -> str:
    """What the probe candidates are and what they cost, when there are any."""
    costs = payload.get("probe_gflops") or {}
    if not costs:
        return ""
    listed = ", ".join(f"{name} {g:.4f}" for name, g in costs.items())
    return ("Probe candidates (`probe-FEATURES-HEAD[@RES]`): the backbone's own pass at the probe resolution "
            "(default: the scale model's input) read by a small head; charged the backbone's GFLOPs there per image "
            f"({listed}), and nothing more when the rule picks the probe resolution (its answer is reused; "
            "probe_reused_pct: how often the argmax rule did).\n\n")


def write_bench_scale(out: str | Path, payload: dict) -> tuple[Path, Path]:
    """``bench_scale.json`` + ``bench_scale.md`` under ``out``."""
    return write_records(out, "bench_scale", payload, bench_scale_markdown(payload))
