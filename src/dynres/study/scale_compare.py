"""Scale-model candidates trained on one accuracy chain's labels and judged on its validation images
(``dynres bench scale``; the record and its settings live in :mod:`dynres.bench.scale`).

A candidate differs from the run's scale model only in ``ScaleConfig.target`` (and the seed): same labels (so no
shard backbone is trained again), same architecture, input resolution, prefix and recipe, read from the run's own
scale checkpoint. The "correct" candidate at the run's seed is the run's scale model again.

Probe candidates (``ScaleBenchConfig.probes``) replace the second network by the backbone's own cheap pass
(:mod:`dynres.study.probe`): their head learns the same labels from the shard backbones that made them, and they
are judged on the same validation images, charged the backbone's GFLOPs at the probe resolution.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dynres.bench.scale import ScaleBenchConfig, candidate_rows, summarize, write_bench_scale
from dynres.errors import ConfigError
from dynres.io.store import StoreLike
from dynres.model.checkpoint import ModelMeta, load_checkpoint
from dynres.model.probe import parse_probe
from dynres.study.bias import biased_record, fit_chain_rules, guarded_rows, guarded_summary
from dynres.study.dynamic import PROBS_FILE, DynamicConfig, dynamic_record
from dynres.study.probe import fit_probe, probe_record, train_probe_data, write_probe_head
from dynres.study.scale import ScaleConfig, read_labels, train_scale
from dynres.study.static import EvalConfig

_RECIPE_FIELDS = ("arch", "init", "scans", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "holdout",
                  "seed")


def run_scale_config(meta: ModelMeta, labels: Path) -> ScaleConfig:
    """The run's scale-model recipe (from its checkpoint's metadata), to retrain on ``labels``."""
    recipe = {k: meta.recipe[k] for k in _RECIPE_FIELDS if k in meta.recipe}
    return ScaleConfig(**recipe, resolution=meta.train_resolution, grid=tuple(meta.grid), labels=str(labels))


def compare_scale_targets(train_store: StoreLike, val_store: StoreLike, run: str | Path, out: str | Path,
                          cfg: ScaleBenchConfig = ScaleBenchConfig(), progress: bool = True) -> dict:
    """Train every (target, seed) candidate under ``out`` and evaluate it on ``val_store``; writes and returns the
    ``bench_scale`` record. ``run`` is an accuracy chain's folder (``backbone/``, ``scale/``, ``eval/``)."""
    run, out = Path(run), Path(out)
    backbone, labels = run / "backbone" / "model.pt", run / "scale" / "scale_labels.parquet"
    scale_ckpt = run / "scale" / "scale_model" / "model.pt"
    for path in (backbone, labels, scale_ckpt):
        if not path.is_file():
            raise ConfigError(run, f"not a finished accuracy chain: {path.relative_to(run)} is missing")
    _, meta = load_checkpoint(scale_ckpt)
    base = run_scale_config(meta, labels)
    for target in cfg.targets:
        replace(base, target=target)  # refuse an unknown target before anything trains
    rows, scale = [], {}
    for seed in cfg.seeds:
        for target in cfg.targets:
            scale = _candidate(train_store, run, out / f"{target}-seed{seed}", replace(base, target=target, seed=seed),
                               meta, progress)
            eval_cfg = EvalConfig(grid=tuple(scale["grid"]), crops=tuple(scale["crops"]))
            dynamic = dynamic_record(backbone, scale["scale_model"], val_store, run / "eval",
                                     DynamicConfig(plot=False), eval_cfg, progress=progress)
            rows += candidate_rows(target, seed, scale, dynamic)
    probe_rows, probe_gflops = _probe_rows(train_store, val_store, run, out, cfg, base, meta, progress)
    rows += probe_rows
    rule_rows, rules = _rule_rows(train_store, val_store, run, cfg, base, progress)
    rows += rule_rows
    payload = {"run": str(run), "targets": list(cfg.targets), "seeds": list(cfg.seeds),
               "scale_arch": base.arch, "scale_resolution": meta.train_resolution, "grid": scale["grid"],
               "crops": scale["crops"], "labelled_images": scale["labelled_images"],
               "val_images": len(val_store.keys), "recipe": {k: getattr(base, k) for k in _RECIPE_FIELDS},
               "probes": list(cfg.probes), "probe_gflops": probe_gflops, "rows": rows, "summary": summarize(rows),
               "rules": rules}
    write_bench_scale(out, payload)
    return payload


def _candidate(train_store: StoreLike, run: Path, out: Path, cfg: ScaleConfig, meta: ModelMeta,
               progress: bool) -> dict:
    """The candidate's scale record: the run's own when it is the run's recipe (same target and seed: training is
    deterministic, so retraining would give the same weights), else a new training under ``out``. The run's record
    holds paths relative to where the run was started: they are resolved beside the record, so a moved run, or one
    benchmarked from another directory, finds its own scale model."""
    from dynres.study.calibrate import recorded_path

    own = run / "scale" / "scale.json"
    if (cfg.target == meta.recipe.get("target", "correct") and cfg.seed == meta.recipe.get("seed")
            and own.is_file()):
        record = json.loads(own.read_text())
        return record | {"scale_model": str(recorded_path(own, record["scale_model"]))}
    return train_scale(train_store, out, cfg, progress=progress)


def _probe_rows(train_store: StoreLike, val_store: StoreLike, run: Path, out: Path, cfg: ScaleBenchConfig,
                base: ScaleConfig, meta: ModelMeta, progress: bool) -> tuple[list[dict], dict]:
    """Rows of every (probe, seed) candidate and each probe's GFLOPs per image; the training features are
    computed once per probe resolution (they do not depend on the head)."""
    rows: list[dict] = []
    costs: dict[str, float] = {}
    if not cfg.probes:
        return rows, costs
    labels = read_labels(base.labels, train_store)
    grid = sorted(set(labels.column("resolution").to_pylist()))
    crops = tuple(sorted(set(labels.column("crop").to_pylist())))
    data: dict[int, dict] = {}
    passes: dict[int, tuple] = {}  # the validation pass per probe resolution, shared by every head
    eval_cfg = EvalConfig(grid=tuple(grid), crops=crops)
    for seed in cfg.seeds:
        for spec in cfg.probes:
            probe = replace(parse_probe(spec), seed=seed)
            res = probe.resolution or meta.train_resolution  # default: the scale model's own cheap view
            if res not in data:
                data[res] = train_probe_data(train_store, labels, run / "scale", grid, crops, res, meta.scans,
                                             progress=progress)
            head, label_auc = fit_probe(data[res], probe, grid, base.holdout, base.seed)
            write_probe_head(out / f"{probe.name}-seed{seed}", head, probe, grid, res, meta.scans)
            record = probe_record(run / "backbone" / "model.pt", head, probe, val_store, run / "eval", grid, res,
                                  meta.scans, eval_cfg, DynamicConfig(plot=False), progress, passes)
            costs[probe.name] = record["probe_gflops"]
            rows += [r | {"probe_reused_pct": s["probe_reused_pct"]}
                     for r, s in zip(candidate_rows(probe.name, seed, {"auc": label_auc}, record), record["summary"])]
    return rows, costs


def _rule_rows(train_store: StoreLike, val_store: StoreLike, run: Path, cfg: ScaleBenchConfig, base: ScaleConfig,
               progress: bool) -> tuple[list[dict], dict]:
    """Rows of today's rule (``b=0``) and of every biased rule (:mod:`dynres.study.bias`) on the run's own scale
    model, fitted on the training labels and judged on the validation evidence; and the fits and the guard's
    two-half selection (``rules`` in the record)."""
    if not cfg.rules:
        return [], {}
    eval_dir = run / "eval"
    dyn = json.loads((eval_dir / "dynamic.json").read_text())
    if not (eval_dir / PROBS_FILE).is_file():  # a chain from before the guard: its p(r) on val, computed once
        dynamic_record(run / "backbone" / "model.pt", run / "scale" / "scale_model" / "model.pt", val_store, eval_dir,
                       DynamicConfig(plot=False), EvalConfig(grid=tuple(dyn["grid"]), crops=tuple(dyn["crops"])),
                       progress, probs_path=eval_dir / PROBS_FILE)
    candidates, fitted = fit_chain_rules(run, train_store, cfg.rules, cfg.taus, progress)
    rows = candidate_rows("b=0", base.seed, {"auc": []}, biased_record(eval_dir, dyn))
    for cand in candidates:
        rows += candidate_rows(cand["name"], base.seed, {"auc": []}, biased_record(eval_dir, dyn, cand["bias"]))
    guarded = guarded_rows(eval_dir, dyn, candidates, DynamicConfig().lambdas, cfg.taus)
    biases = {c["name"]: {str(k): v.tolist() for k, v in c["bias"].items()} for c in candidates}
    return rows, fitted | {"rules": list(cfg.rules), "taus": list(cfg.taus), "bias": biases, "guarded": guarded,
                           "guarded_summary": guarded_summary(guarded)}
