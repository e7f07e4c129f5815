"""The backbone's cheap pass as a scale-model candidate, trained and judged on one accuracy chain
(``dynres bench scale --probes``; the per-image parts are :mod:`dynres.model.probe`).

Training data come only from backbones that did not see the image, as the scale labels do: each labelled training
image is probed by the shard backbone that labelled it (its ``fold``/``split`` row of ``scale_labels.parquet``, the
fold trained without that image's shard), and the head learns that backbone's answers. On validation the chain's
final backbone probes, and its answers (the static per-image table) judge.

Cost, charged as :mod:`dynres.study.dynamic` charges the scale model (a fixed price per image on top of the chosen
resolution's): every image pays the backbone's GFLOPs at the probe resolution; a chosen resolution pays its
GFLOPs unless it is the probe resolution, whose answer is the probe's own (no second pass). The cost-aware rule
weighs that marginal cost (zero at the probe resolution). Correctness at the probe resolution is the probe's own
prediction on its view (what would be served), elsewhere the static table's, as for the scale model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dynres.errors import ConfigError
from dynres.io.store import StoreLike
from dynres.model.checkpoint import load_checkpoint
from dynres.model.nets import gflops
from dynres.model.probe import ProbeConfig, ProbeHead, fit_probe_head, predict_probe, probe_features, probe_pass
from dynres.policy.scans import Scans
from dynres.runtime.runners import choose
from dynres.study.dynamic import DynamicConfig, static_results, versus_best_static
from dynres.study.scale import auc, fold_dir, label_targets, multi_hot, scale_inputs
from dynres.study.static import EvalConfig


def heldout_backbones(labels: pa.Table, scale_dir: str | Path) -> dict[str, Path]:
    """key -> the checkpoint of the shard backbone that labelled it (first split), i.e. one trained without it."""
    if "fold" not in labels.column_names:
        raise ConfigError("labels", "these scale labels do not say which shard backbone made them (no 'fold')")
    rows = labels.filter(pc.equal(labels.column("split"), 0)) if "split" in labels.column_names else labels
    out: dict[str, Path] = {}
    for key, fold in zip(rows.column("key").to_pylist(), rows.column("fold").to_pylist()):
        out.setdefault(key, fold_dir(Path(scale_dir), 0, fold) / "model.pt")
    return out


def probe_views(store: StoreLike, pairs: Sequence[tuple[str, float]], resolution: int, crops: Sequence[float],
                scans: Scans, progress: bool) -> torch.Tensor:
    """The probe's inputs: the (key, crop) views at the probe resolution, from the scale model's prefix."""
    return scale_inputs(store, pairs, resolution, crops, scans, progress)


def train_probe_data(store: StoreLike, labels: pa.Table, scale_dir: str | Path, grid: Sequence[int],
                     crops: Sequence[float], resolution: int, scans: Scans, target: str = "correct",
                     progress: bool = True) -> dict:
    """Every labelled (key, crop) of the first split probed by its held-out shard backbone: ``pairs``, their
    ``logits`` and ``pooled`` features, ``targets`` over ``grid`` and ``sources`` (the checkpoint per pair)."""
    if "split" in labels.column_names:
        labels = labels.filter(pc.equal(labels.column("split"), 0))
    targets = label_targets(labels, grid, target)
    pairs = sorted(targets)
    sources = heldout_backbones(labels, scale_dir)
    logits = torch.empty(0)
    pooled = torch.empty(0)
    for ckpt in sorted(set(sources.values())):
        idx = [i for i, (k, _) in enumerate(pairs) if sources[k] == ckpt]
        if not Path(ckpt).is_file():
            raise ConfigError(ckpt, "the shard backbone that made these labels is missing")
        model, _ = load_checkpoint(ckpt)
        images = probe_views(store, [pairs[i] for i in idx], resolution, crops, scans, progress)
        lo, po = probe_pass(model, images)
        if not len(logits):
            logits, pooled = lo.new_zeros(len(pairs), lo.shape[1]), po.new_zeros(len(pairs), po.shape[1])
        logits[idx], pooled[idx] = lo, po
    return {"pairs": pairs, "logits": logits, "pooled": pooled, "sources": [sources[k] for k, _ in pairs],
            "targets": torch.from_numpy(np.stack([targets[p] for p in pairs])),
            "answers": multi_hot(labels, grid)}


def fit_probe(data: dict, cfg: ProbeConfig, grid: Sequence[int], holdout: float = 0.1,
              seed: int = 0) -> tuple[ProbeHead, list[dict]]:
    """The head on the training probe data, a ``holdout`` share of the keys (shuffled as the scale model's) kept
    out to report its AUC per resolution on its own labels; returns (head, that AUC list)."""
    pairs = data["pairs"]
    keys = sorted({k for k, _ in pairs})
    random.Random(seed + 1).shuffle(keys)
    held = set(keys[: round(holdout * len(keys))])
    feats = probe_features(data["logits"], data["pooled"], cfg)
    tr = torch.tensor([i for i, (k, _) in enumerate(pairs) if k not in held], dtype=torch.long)
    head = fit_probe_head(feats[tr], data["targets"][tr], cfg)
    test = [i for i, (k, _) in enumerate(pairs) if k in held]
    if not test:
        return head, []
    probs = predict_probe(head, feats[torch.tensor(test, dtype=torch.long)])
    truth = np.stack([data["answers"][pairs[i]] for i in test])
    return head, [{"resolution": r, "auc": auc(probs[:, i], truth[:, i]),
                   "positive_rate": 100 * float(truth[:, i].mean())} for i, r in enumerate(grid)]


def probe_crop_rows(c: float, p: np.ndarray, ok: np.ndarray, grid: Sequence[int], cost_g: np.ndarray,
                    probe_index: int | None, probe_g: float, crop_static: list[dict], cfg: DynamicConfig,
                    judged: np.ndarray | None = None) -> dict:
    """One crop's rows as :mod:`dynres.study.dynamic` writes them, with the probe's cost: ``probe_g`` per image,
    plus the chosen resolution's GFLOPs unless it is the probe resolution (``probe_index``: reused).

    ``ok``: what the served answer gets right (at the probe resolution, the probe's own answer); ``judged``: the
    static table's correctness, which AUC and the oracle are scored against, as the scale model's are (scoring the
    probe's AUC against its own answers would favour it at that one cell). ``None``: ``ok``."""
    judged = ok if judged is None else judged
    marginal = cost_g.copy()
    if probe_index is not None:
        marginal[probe_index] = 0.0
    rows = np.arange(len(ok))

    def point(lam: float | None) -> dict:
        pick = choose(p, marginal, lam)
        return {"crop": c, "accuracy": 100 * float(ok[rows, pick].mean()),
                "gflops": float(marginal[pick].mean() + probe_g), "lambda": lam,
                "mean_resolution": float(np.array(grid)[pick].mean()),
                "probe_reused": 100 * float((pick == probe_index).mean()) if probe_index is not None else 0.0}

    plain = point(None)
    curve = [point(lam) for lam in cfg.lambdas]
    cheapest_right = np.where(judged.any(1), judged.argmax(1), 0)
    oracle = {"crop": c, "accuracy": 100 * float(judged.any(1).mean()),
              "gflops": float(cost_g[cheapest_right].mean())}
    aucs = [{"crop": c, "resolution": r, "auc": auc(p[:, i], judged[:, i].astype(float))}
            for i, r in enumerate(grid)]
    summary = versus_best_static(c, plain, curve, crop_static, cfg.tolerance) | {
        "probe_reused_pct": plain["probe_reused"]}
    return {"dynamic": [plain], "oracle": [oracle], "cost_aware": curve, "auc": aucs, "summary": [summary]}


def probe_record(backbone: str | Path, head: ProbeHead, cfg: ProbeConfig, store: StoreLike, static_dir: Path,
                 grid: Sequence[int], resolution: int, scans: Scans, eval_cfg: EvalConfig,
                 dyn_cfg: DynamicConfig = DynamicConfig(plot=False), progress: bool = True,
                 passes: dict | None = None) -> dict:
    """The probe candidate judged on ``store`` (validation) with the final ``backbone``: the dynamic record's
    ``summary``, ``auc``, ``oracle``, ``cost_aware`` and ``dynamic`` rows (see :func:`probe_crop_rows`).
    ``passes``: the backbone's validation pass per probe resolution, kept there for the next candidate (it does
    not depend on the head)."""
    grid = list(grid)
    static = static_results(backbone, store, static_dir, grid, eval_cfg, progress)
    table = pq.read_table(static_dir / "static_images.parquet")
    correct = {(k, c, r): ok for k, c, r, ok in zip(*(table.column(n).to_pylist()
                                                      for n in ("key", "crop", "resolution", "correct")))}
    keys = list(dict.fromkeys(table.column("key").to_pylist()))
    crops = list(eval_cfg.crops)
    pairs = [(k, c) for c in crops for k in keys]
    model, _ = load_checkpoint(backbone)
    passes = {} if passes is None else passes
    if resolution not in passes:
        passes[resolution] = probe_pass(model, probe_views(store, pairs, resolution, crops, scans, progress))
    logits, pooled = passes[resolution]
    probs = predict_probe(head, probe_features(logits, pooled, cfg))
    probe_right = (logits.argmax(1).numpy() == np.array([store.label(k) for k, _ in pairs]))
    cost_g = np.array([gflops(model, r) for r in grid])
    probe_g = gflops(model, resolution)
    probe_index = grid.index(resolution) if resolution in grid else None
    static_rows = [r for r in static["static"] if r["resolution"] in grid]
    rows: dict[str, list[dict]] = {"dynamic": [], "oracle": [], "cost_aware": [], "summary": [], "auc": []}
    for ci, c in enumerate(crops):
        span = slice(ci * len(keys), (ci + 1) * len(keys))
        judged = np.array([[correct[(k, c, r)] for r in grid] for k in keys], dtype=bool)
        ok = judged.copy()
        if probe_index is not None:  # the served answer at the probe resolution is the probe's own
            ok[:, probe_index] = probe_right[span]
        crop_static = [r for r in static_rows if r["crop"] == c]
        for name, value in probe_crop_rows(c, probs[span], ok, grid, cost_g, probe_index, probe_g, crop_static,
                                           dyn_cfg, judged).items():
            rows[name] += value
    return {"backbone": str(backbone), "images": len(keys), "grid": grid, "crops": crops,
            "probe_resolution": resolution, "probe_gflops": probe_g, "probe_reuse": probe_index is not None,
            "static": static_rows, **rows}


def write_probe_head(out: str | Path, head: ProbeHead, cfg: ProbeConfig, grid: Sequence[int], resolution: int,
                     scans: Scans) -> Path:
    """The fitted head as ``out/probe_head.pt`` (tensors and plain settings: loads with ``weights_only=True``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "probe_head.pt"
    torch.save({"state_dict": head.state_dict(), "config": asdict(cfg), "grid": list(grid),
                "resolution": resolution, "scans": scans}, path)
    return path
