"""Did the backbones learn the data? A check the verdict carries, so that a run whose models are at chance says so.

A run trains its backbone and shard backbones from the user's recipe. When a recipe does not learn the data (a
learning rate or weight decay meant for another optimizer, too few epochs) every later stage still runs and the
guard still recommends something: the cheapest static resolution ties everything. Nothing in those numbers tells
the user that they compare untrained models, so this module tests each backbone against chance and the verdict
states the result first.

Decisions:

- **Chance is 1 / the number of classes**, the top-1 of a constant or uniformly random answer on balanced classes
  (the accuracy a collapsed network reaches on an ImageFolder split of equal class sizes; a skewed split's
  majority class can score more, which the test does not model).
- **A one-sided exact binomial test** of the backbone's best top-1 over the evaluated (crop, resolution) cells:
  "no better than chance" when P(X >= right | n, 1/classes) > :data:`ALPHA`. The best cell is the most favourable
  of up to a few dozen correlated cells, so :data:`ALPHA` is strict (0.001: a family-wise 5% even for 50
  independent cells) and a backbone flagged here is no better than chance anywhere.
- **The main backbone is judged on the static engine's views of every validation image** (what it serves); each
  shard backbone on the training images it labelled and never saw (``scale_labels.parquet``), per (split, fold):
  a shard at chance means its share of the scale model's labels is noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ALPHA = 1e-3  # the one-sided binomial p-value above which a backbone counts as no better than chance


def chance_p_value(right: int, n: int, classes: int) -> float:
    """P(X >= right) for X ~ Binomial(n, 1 / classes): how likely a guesser gets at least ``right`` of ``n``."""
    from scipy.stats import binom

    return float(binom.sf(right - 1, n, 1.0 / classes)) if n else 1.0


def judge(right: int, n: int, where: dict, classes: int) -> dict:
    """One backbone's best cell (``right`` of ``n``, at ``where``) against chance."""
    p = chance_p_value(right, n, classes)
    return where | {"images": int(n), "right": int(right), "accuracy": 100.0 * right / n if n else None,
                    "p_value": p, "at_chance": p > ALPHA}


def best_cell(ok: Mapping[float, np.ndarray], grid: Sequence[int]) -> tuple[int, int, dict]:
    """(right, images, {crop, resolution}) of the most accurate cell of per-crop correctness (images x grid)."""
    right, n, where = -1, 0, {}
    for crop, table in sorted(ok.items()):
        counts = np.asarray(table, dtype=bool).sum(0)
        i = int(np.argmax(counts))
        if counts[i] > right:
            right, n, where = int(counts[i]), int(table.shape[0]), {"crop": float(crop), "resolution": int(grid[i])}
    return right, n, where


def shard_cells(labels: str | Path) -> list[tuple[int, int, dict]]:
    """Per (split, fold) of a ``scale_labels.parquet``: its best (crop, resolution) cell on the images it labelled."""
    table = pq.read_table(labels)
    n = table.num_rows
    for name in ("split", "fold"):  # labels from one split (or one shard) may lack the column
        if name not in table.column_names:
            table = table.append_column(name, pa.array(np.zeros(n, np.int32)))
    counts = table.group_by(["split", "fold", "crop", "resolution"]).aggregate(
        [("correct", "sum"), ("correct", "count")]).to_pylist()
    best: dict[tuple[int, int], tuple[int, int, dict]] = {}
    for row in sorted(counts, key=lambda r: (r["split"], r["fold"], r["crop"], r["resolution"])):
        shard = (int(row["split"]), int(row["fold"]))
        if shard not in best or row["correct_sum"] > best[shard][0]:
            best[shard] = (int(row["correct_sum"]), int(row["correct_count"]),
                           {"split": shard[0], "fold": shard[1], "crop": float(row["crop"]),
                            "resolution": int(row["resolution"])})
    return [best[shard] for shard in sorted(best)]


def split_duplicates(train, val, show: int = 3) -> dict:
    """Validation images byte-identical to a training image (the stores' sha256; ``train`` and ``val`` are
    stores): ``images`` and a few ``examples``. Copies across splits are common in collected data sets, and the
    backbone trained on them; resized or re-encoded copies are not found here."""
    seen = {train.sha256(k): k for k in train.keys}
    pairs = [(k, seen[h]) for k in val.keys if (h := val.sha256(k)) in seen]
    return {"images": len(pairs), "of": len(val.keys), "examples": [{"val": v, "train": t} for v, t in pairs[:show]]}


def duplicates_warning(duplicates: dict | None) -> list[str]:
    if not duplicates or not duplicates["images"]:
        return []
    e = duplicates["examples"][0]
    return [(f"{duplicates['images']} of {duplicates['of']} validation images are byte-identical to training "
             f"images (e.g. val {e['val']} = train {e['train']}): the backbone trained on them, so the accuracy, the "
             "guard's held-out decisions and the calibration's labelled pool are not held out for those; remove "
             "them from val/ (or train/)")]


def backbone_health(ok_static: Mapping[float, np.ndarray], grid: Sequence[int], classes: int,
                    labels: str | Path | None = None, scale_aucs: Sequence[float] = (),
                    duplicates: dict | None = None) -> dict:
    """The main backbone (``ok_static``: per crop, right or not on the static engine's views, images x grid) and
    each shard backbone of ``labels`` against chance for ``classes`` classes; ``warnings`` says, by name, each one
    that is no better than chance. ``scale_aucs`` (the scale model's held-out AUC per (crop, resolution)) is
    summarized beside them as ``scale_auc``: how well the scale model tells where this backbone is right.
    ``duplicates`` (:func:`split_duplicates`) adds a warning when validation images are copies of training ones."""
    finite = [a for a in scale_aucs if a is not None and np.isfinite(a)]
    scale_auc = ({"min": float(min(finite)), "max": float(max(finite)), "mean": float(np.mean(finite))}
                 if finite else None)
    if classes < 2:
        return {"classes": classes, "chance": None, "backbone": None, "shards": [],
                "warnings": duplicates_warning(duplicates), "scale_auc": scale_auc, "duplicates": duplicates}
    cell = best_cell(ok_static, grid)
    backbone = judge(*cell, classes) if cell[1] else None  # no image evaluated: nothing to judge
    shards = [judge(*c, classes) for c in shard_cells(labels) if c[1]] if labels and Path(labels).is_file() else []
    warnings = []
    chance = 100.0 / classes
    if backbone is not None and backbone["at_chance"]:
        warnings.append(f"the backbone is no better than chance: best top-1 {backbone['accuracy']:.1f}% "
                        f"({backbone['right']} of {backbone['images']} validation images, "
                        f"{round(100 * backbone['crop'])}% crop, {backbone['resolution']} px) against 1/{classes} = "
                        f"{chance:.1f}% (binomial p = {backbone['p_value']:.2g}). It did not learn this data, so "
                        "the verdict compares untrained models: check the [backbone] recipe (lr and weight_decay "
                        "for its optimizer, epochs, init)")
    flat = [s for s in shards if s["at_chance"]]
    if flat:
        names = ", ".join(f"fold {s['fold']}" + (f" of split {s['split']}" if s["split"] else "") +
                          f" {s['accuracy']:.1f}% of {s['images']}" for s in flat)
        warnings.append(f"{len(flat)} of {len(shards)} shard backbones are no better than chance on the training "
                        f"images they label ({names}; chance {chance:.1f}%): the scale model's labels from them are "
                        "noise")
    return {"classes": classes, "chance": chance, "alpha": ALPHA, "backbone": backbone, "shards": shards,
            "warnings": warnings + duplicates_warning(duplicates), "scale_auc": scale_auc, "duplicates": duplicates}
