"""Cross-validated scale labels and the scale model (paper section IV, Figure 5).

1. Split train into K disjoint, class-stratified shards; train K backbones, each on the other K-1 shards.
2. Each backbone labels only its held-out shard: at every grid resolution and several crops (the crops show the
   backbone object scales the data set does not show by itself). Label = "backbone correct at resolution r".
3. The scale model (default a width-0.25 MobileNetV2) reads the low-resolution prefix of an image at the scale
   resolution and predicts the multi-hot label with binary cross-entropy over the grid.

``cheap=True`` is the paper's footnote 2: one split only (one backbone, one labelled shard). ``splits=n`` (beyond
the paper) repeats steps 1-2 with n shard seeds, so every image gets n labels from n backbones that did not see it,
and the scale model learns their mean: less label noise for n times the backbone trainings.
A tenth of the labelled images (by key) is held out of scale training to report per-resolution AUC.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import Dataset

from dynres._ui import track_threads
from dynres.errors import ConfigError
from dynres.io.store import StoreLike
from dynres.model.checkpoint import ModelMeta, load_checkpoint, load_weights, scale_probs
from dynres.model.nets import channels_last, create_model, to_input
from dynres.model.train import LR_DEFAULTS, ImageCache, TrainConfig, data_hash, fit, train_backbone
from dynres.paper import PAPER_CROPS, scaled_grid
from dynres.policy.scans import Scans
from dynres.records import markdown_table, write_records
from dynres.study.static import image_views, predict_grid


# target name -> (labels column, its map to [0, 1]); every column is written by the held-out backbone of the row
TARGETS = {"correct": ("correct", lambda v: float(v)), "prob": ("true_prob", float),
           "margin": ("margin", lambda v: (1.0 + v) / 2.0), "best": ("correct", lambda v: float(v))}
# targets that are one distribution over the grid (a softmax head, trained by cross-entropy): "best", where the
# held-out backbone is right, uniformly (uniform over the whole grid where it is right nowhere: no preference,
# the rule's cost term then decides); the others are one sigmoid per resolution (binary cross-entropy)
DISTRIBUTION_TARGETS = ("best",)


def target_activation(target: str) -> str:
    """The scale model's output map for a training target (:data:`dynres.model.checkpoint.SCALE_ACTIVATIONS`)."""
    return "softmax" if target in DISTRIBUTION_TARGETS else "sigmoid"


@dataclass(frozen=True)
class ScaleConfig:
    """The scale labels' and the scale model's settings; ``crops`` are area fractions (a run file's ``[scale]``)."""

    folds: int = 4
    cheap: bool = False  # the paper's single split: train only fold 0's backbone
    # repeated K-fold splits (shard seeds seed, seed+1, ...): one label per image and split, the scale model learns
    # their mean (less label noise: held-out backbones disagree on some labels); each split costs K more trainings
    splits: int = 1
    crops: tuple[float, ...] = PAPER_CROPS  # area fractions the labels (and the scale inputs) cover
    grid: tuple[int, ...] | None = None  # None: the paper's ratios around the backbone's train resolution
    backbone: TrainConfig = field(default_factory=TrainConfig)
    # the shard backbones' epochs (None: the backbone's). They only label, so fewer save time on a tight budget, at
    # the price of noisier labels and a scale model that chooses worse (docs/demo-config.md)
    shard_epochs: int | None = None
    arch: str = "mobilenet_v2_tiny"
    init: str | None = None  # local state_dict for the scale model's trunk (its head is always new)
    resolution: int | None = None  # scale model input; None: the grid minimum
    scans: int | None = None  # prefix the scale model reads (None: all scans; calibration sets it later)
    epochs: int = 12
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 0.004
    weight_decay: float = 0.01
    holdout: float = 0.1  # fraction of labelled images kept out of scale training for the AUC report
    seed: int = 0
    labels: str | None = None  # an existing scale_labels.parquet: retrain only the scale model (no shard backbones)
    # what the scale model learns per resolution, from the held-out shard backbones (TARGETS; measured in
    # docs/scale-candidates.md): "correct" their 0/1 answer, "prob" their probability of the true class,
    # "margin" (1 + that probability's lead over the best other class) / 2, above 0.5 exactly where they are right
    target: str = "correct"

    def __post_init__(self) -> None:
        from dynres.model.nets import check_architecture

        check_architecture(self.arch)
        if self.folds < 2:
            raise ConfigError("folds", f"need at least 2 shards, got {self.folds}")
        if self.shard_epochs is not None and self.shard_epochs < 1:
            raise ConfigError("shard_epochs", f"need at least 1 epoch, got {self.shard_epochs}")
        if self.splits < 1:
            raise ConfigError("splits", f"need at least 1 split, got {self.splits}")
        if not 0 <= self.holdout < 0.5:
            raise ConfigError("holdout", f"must be in [0, 0.5), got {self.holdout}")
        if self.target not in TARGETS:
            raise ConfigError("target", f"must be one of {sorted(TARGETS)}, got {self.target!r}")
        if self.optimizer not in LR_DEFAULTS:
            raise ConfigError("optimizer", f"must be one of {sorted(LR_DEFAULTS)}, got {self.optimizer!r}")
        small_grid = self.labels is None and min(self.label_grid) < 16  # existing labels bring their own grid
        if small_grid or (self.resolution is not None and self.resolution < 16):
            raise ConfigError("grid", f"the scale model's input and grid need >= 16 px, got {self.resolution} and "
                                      f"{list(self.label_grid)}")

    @property
    def label_grid(self) -> tuple[int, ...]:
        return tuple(self.grid or scaled_grid(self.backbone.resolution))

    @property
    def shard_backbone(self) -> TrainConfig:
        """The shard backbones' recipe: the backbone's, with ``shard_epochs`` if set."""
        return replace(self.backbone, epochs=self.shard_epochs) if self.shard_epochs else self.backbone


def shard_split(store: StoreLike, keys: Sequence[str], folds: int, seed: int = 0) -> list[list[str]]:
    """K disjoint shards covering ``keys``, each class dealt round-robin after a seeded shuffle."""
    by_class: dict[int, list[str]] = {}
    for key in keys:
        by_class.setdefault(store.label(key), []).append(key)
    rng = random.Random(seed)
    shards: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for label in sorted(by_class):
        members = sorted(by_class[label])
        rng.shuffle(members)
        for i, key in enumerate(members):
            shards[(i + offset) % folds].append(key)
        offset += len(members)
    return shards


def fold_dir(out: Path, split: int, fold: int) -> Path:
    """Where the shard backbone of (split, fold) lives: ``fold{k}`` for the first split, ``split{s}/fold{k}`` after."""
    return (out if split == 0 else out / f"split{split}") / f"fold{fold}"


def make_labels(store: StoreLike, out: Path, cfg: ScaleConfig, cache: ImageCache | None = None,
                progress: bool = True) -> pa.Table:
    """Train the shard backbones and label each held-out shard; returns (and writes) ``scale_labels.parquet``."""
    tables = []
    for split in range(cfg.splits):
        shards = shard_split(store, store.keys, cfg.folds, cfg.seed + split)
        for fold in range(1 if cfg.cheap else cfg.folds):
            train_keys = [k for i, s in enumerate(shards) if i != fold for k in s]
            ckpt = train_backbone(store, fold_dir(out, split, fold), cfg.shard_backbone, train_keys, cache, progress)
            model, _ = load_checkpoint(ckpt)
            name = f"label shard {fold}" + (f" of split {split}" if cfg.splits > 1 else "")
            table = predict_grid(model, store, shards[fold], cfg.label_grid, cfg.crops, None, False,
                                 progress=progress, description=name)
            tables.append(table.append_column("fold", pa.array([fold] * len(table), pa.int32()))
                          .append_column("split", pa.array([split] * len(table), pa.int32())))
    labels = pa.concat_tables(tables)
    pq.write_table(labels, out / "scale_labels.parquet")
    return labels


def read_labels(path: str | Path, store: StoreLike) -> pa.Table:
    """A ``scale_labels.parquet`` written by :func:`make_labels`, checked against the store it will be used with."""
    try:
        labels = pq.read_table(path)
    except Exception as err:
        raise ConfigError(path, f"cannot read scale labels: {err}") from None
    missing = {"key", "crop", "resolution", "correct"} - set(labels.column_names)
    if missing:
        raise ConfigError(path, f"not a scale-labels table (missing columns {sorted(missing)})")
    unknown = set(labels.column("key").to_pylist()) - set(store.keys)
    if unknown:
        raise ConfigError(path, f"{len(unknown)} labelled keys are not in the store (e.g. {sorted(unknown)[0]!r})")
    return labels


def multi_hot(labels: pa.Table, grid: Sequence[int]) -> dict[tuple[str, float], np.ndarray]:
    """(key, crop) -> float vector over ``grid``: 1 where the held-out backbone was right; with several splits,
    the fraction of their held-out backbones that were."""
    return label_targets(labels, grid, "correct")


def label_targets(labels: pa.Table, grid: Sequence[int], target: str = "correct") -> dict[tuple[str, float],
                                                                                          np.ndarray]:
    """(key, crop) -> the ``target`` (see :data:`TARGETS`) over ``grid``, from the row's held-out backbone; with
    several splits, the mean over their held-out backbones."""
    column, to_unit = TARGETS[target]
    if column not in labels.column_names:
        raise ConfigError("target", f"{target!r} needs the labels' {column!r} column, which these labels (made "
                                    "before it existed) lack: make them again")
    index = {r: i for i, r in enumerate(grid)}
    sums: dict[tuple[str, float], np.ndarray] = {}
    counts: dict[tuple[str, float], np.ndarray] = {}
    for key, crop, r, value in zip(*(labels.column(n).to_pylist() for n in ("key", "crop", "resolution", column))):
        sums.setdefault((key, crop), np.zeros(len(grid), dtype=np.float32))[index[r]] += to_unit(value)
        counts.setdefault((key, crop), np.zeros(len(grid), dtype=np.float32))[index[r]] += 1.0
    means = {p: sums[p] / np.maximum(counts[p], 1.0) for p in sums}
    if target in DISTRIBUTION_TARGETS:
        return {p: v / v.sum() if v.sum() > 0 else np.full_like(v, 1.0 / len(v)) for p, v in means.items()}
    return means


def label_stats(targets: dict[tuple[str, float], np.ndarray], grid: Sequence[int],
                crops: Sequence[float]) -> list[dict]:
    """Per crop: how often each resolution is right, how often none / all are, the mean number right."""
    rows = []
    for c in crops:
        m = np.stack([v for (_, crop), v in targets.items() if crop == c])
        row = {"crop": c, "samples": len(m), "none_correct": 100 * float((m.sum(1) == 0).mean()),
               "all_correct": 100 * float((m.sum(1) == len(grid)).mean()), "mean_correct": float(m.sum(1).mean())}
        row |= {f"p@{r}": 100 * float(m[:, i].mean()) for i, r in enumerate(grid)}
        rows.append(row)
    return rows


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by the rank statistic (ties averaged); None when one class is absent."""
    pos, neg = labels > 0.5, labels <= 0.5
    if not pos.any() or not neg.any():
        return None
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


class ScaleInputs(Dataset):
    """Scale-model inputs (uint8, scale resolution) with their multi-hot targets; flip is the only augmentation,
    since any resizing would change the very object scale being predicted."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, train: bool = True):
        self.images, self.targets, self.train = images, targets, train

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.targets[i]


def scale_inputs(store: StoreLike, pairs: Sequence[tuple[str, float]], resolution: int, crops: Sequence[float],
                 scans: Scans, progress: bool = True, decode_for: int | None = None) -> torch.Tensor:
    """Decoded scale-model inputs for (key, crop) pairs, each image decoded once for all its crops (per DCT scale
    with ``decode_for``).
    ``decode_for``: the dynamic engine's views, pixel for pixel, of a prefix decoded once for this resolution (the
    engine's grid's largest); None: the cheap shared views (:func:`~dynres.study.static.image_views`)."""
    keys = list(dict.fromkeys(k for k, _ in pairs))
    decoded = track_threads(lambda key: image_views(store, key, [resolution], crops, scans,
                                                        engine=decode_for is not None, decode_for=decode_for), keys,
                            f"scale inputs @{resolution}", progress)
    views = {(key, c): v for key, image in zip(keys, decoded) for (c, _), v in image.items()}
    return torch.stack([views[p] for p in pairs])


def _targets_hash(store: StoreLike, keys: Sequence[str], targets: torch.Tensor) -> str:
    """The scale model's training data: the images and their labels' values, so that a resumed (or finished) scale
    model is reused only for the same labels, not for new labels written to the same path."""
    h = hashlib.sha256(data_hash(store, keys).encode())
    h.update(targets.numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def predict_scale(model: nn.Module, images: torch.Tensor, activation: str = "sigmoid", batch_size: int = 256
                  ) -> np.ndarray:
    """p(r) (N, len(grid)) by the checkpoint's ``activation``: per resolution, that the backbone is right there
    (sigmoid), or one distribution over the grid (softmax)."""
    channels_last(model).eval()
    out = [scale_probs(model(to_input(images[i:i + batch_size], True)), activation)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def train_scale(store: StoreLike, out: str | Path, cfg: ScaleConfig = ScaleConfig(),
                cache: ImageCache | None = None, progress: bool = True) -> dict:
    """Shard backbones, labels, scale model, label statistics and AUC (or only the scale model on ``cfg.labels``).

    Writes ``out/scale_model/model.pt`` (+ JSON), ``out/scale_labels.parquet`` and ``out/scale.json``/``.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels, source = scale_labels(store, out, cfg, cache, progress)
    grid, crops = source["grid"], source["crops"]
    res = cfg.resolution or min(grid)
    targets = label_targets(labels, grid, cfg.target)  # what the scale model learns (several splits: the mean)
    answers = multi_hot(labels, grid)  # statistics and AUC judge against one held-out backbone's 0/1 answers
    if source["splits"] > 1:
        answers = multi_hot(labels.filter(pc.equal(labels.column("split"), 0)), grid)
    keys = sorted({k for k, _ in targets})
    rng = random.Random(cfg.seed + 1)
    rng.shuffle(keys)
    held = set(keys[: int(round(cfg.holdout * len(keys)))])
    pairs = sorted(targets)
    images = scale_inputs(store, pairs, res, crops, cfg.scans, progress)
    y = torch.from_numpy(np.stack([targets[p] for p in pairs]))
    tr = torch.tensor([i for i, p in enumerate(pairs) if p[0] not in held], dtype=torch.long)
    test = [i for i, p in enumerate(pairs) if p[0] in held]
    model = fit_scale_model(images[tr], y[tr], out, cfg, grid, res, _targets_hash(store, keys, y), progress)
    aucs = heldout_auc(model, images, [answers[pairs[i]] for i in test], test, grid, target_activation(cfg.target))
    stats = label_stats(answers, grid, crops)
    payload = {"grid": list(grid), "crops": list(crops), "folds": source["folds"], "splits": source["splits"],
               "cheap": cfg.cheap, "target": cfg.target, "scale_resolution": res, "scale_arch": cfg.arch,
               "scans": cfg.scans,
               "labelled_images": len(keys), "heldout_images": len(held), "label_stats": stats, "auc": aucs,
               "scale_model": str(out / "scale_model" / "model.pt"), "labels": source["labels"],
               "backbones": source["backbones"]}
    write_records(out, "scale", payload, scale_markdown(payload))
    return payload


def scale_labels(store: StoreLike, out: Path, cfg: ScaleConfig, cache: ImageCache | None = None,
                 progress: bool = True) -> tuple[pa.Table, dict]:
    """The labels (``cfg.labels``, or made by :func:`make_labels`) and what they cover: ``grid``, ``crops``,
    ``folds``, ``splits``, the ``labels`` path and the shard ``backbones``."""
    if cfg.labels is not None:  # grid and crops are the labels' own
        labels = read_labels(cfg.labels, store)
        return labels, {
            "grid": tuple(sorted(set(labels.column("resolution").to_pylist()))),
            "crops": tuple(sorted(set(labels.column("crop").to_pylist()))),
            "folds": len(set(labels.column("fold").to_pylist())) if "fold" in labels.column_names else None,
            "splits": len(set(labels.column("split").to_pylist())) if "split" in labels.column_names else 1,
            "labels": str(cfg.labels), "backbones": []}
    if cfg.backbone.cache and cache is None:
        cache = ImageCache.build(store, store.keys, round(cfg.backbone.cache_factor * cfg.backbone.resolution),
                                 progress)
    labels = make_labels(store, out, cfg, cache, progress)
    folds = 1 if cfg.cheap else cfg.folds
    return labels, {"grid": cfg.label_grid, "crops": cfg.crops, "folds": folds, "splits": cfg.splits,
                    "labels": str(out / "scale_labels.parquet"),
                    "backbones": [str(fold_dir(out, s, f) / "model.pt") for s in range(cfg.splits)
                                  for f in range(folds)]}


def fit_scale_model(images: torch.Tensor, targets: torch.Tensor, out: Path, cfg: ScaleConfig,
                    grid: Sequence[int], resolution: int, data_hash: str, progress: bool = True) -> nn.Module:
    """Train the scale model on its inputs and multi-hot targets; saved (resumably) under ``out/scale_model``."""
    tcfg = TrainConfig(arch=cfg.arch, resolution=resolution, epochs=cfg.epochs, batch_size=cfg.batch_size,
                       optimizer=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, label_smoothing=0.0,
                       seed=cfg.seed, cache=False)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, len(grid))
    if cfg.init:
        load_weights(model.net, cfg.init)
    recipe = asdict(cfg) | {"samples": len(targets)}
    activation = target_activation(cfg.target)
    meta = ModelMeta(arch=cfg.arch, classes=(), train_resolution=resolution, task="scale", grid=tuple(grid),
                     scans=cfg.scans, recipe=json.loads(json.dumps(recipe, default=str)), data_hash=data_hash,
                     activation=activation)
    loss = nn.CrossEntropyLoss() if activation == "softmax" else nn.BCEWithLogitsLoss()  # soft targets: a distribution
    fit(model, ScaleInputs(images, targets), tcfg, loss, out / "scale_model", meta,
        f"train scale model {cfg.arch} @{resolution}", progress)
    return model


def heldout_auc(model: nn.Module, images: torch.Tensor, answers: Sequence[np.ndarray], test: Sequence[int],
                grid: Sequence[int], activation: str = "sigmoid") -> list[dict]:
    """Per-resolution AUC of the scale model on the held-out samples ``test`` (indices into ``images``), judged
    against ``answers`` (one 0/1 vector per held-out sample)."""
    if not test:
        return []
    probs = predict_scale(model, images[torch.tensor(test, dtype=torch.long)], activation)
    truth = np.stack(answers)
    return [{"resolution": r, "auc": auc(probs[:, i], truth[:, i]), "positive_rate": 100 * float(truth[:, i].mean())}
            for i, r in enumerate(grid)]


def scale_markdown(payload: dict) -> str:
    """The scale record as Markdown: label statistics per crop and the scale model's AUC per resolution."""
    grid, splits = payload["grid"], payload["splits"]
    stat_cols = ["crop", "samples", "none_correct", "all_correct", "mean_correct"] + [f"p@{r}" for r in grid]
    split_text = f" in each of {splits} splits (the scale model learns the mean label)" if splits > 1 else ""
    return (f"# Scale labels and scale model\n\n{payload['folds']} held-out shard(s){split_text}, "
            f"{payload['labelled_images']} labelled images; scale model {payload['scale_arch']} at "
            f"{payload['scale_resolution']} px.\n\n"
            "## Labels (percent of samples; p@r = backbone right at r)\n\n"
            + markdown_table(payload["label_stats"], stat_cols)
            + f"\n\n## Scale model AUC per resolution ({payload['heldout_images']} held-out images)\n\n"
            + markdown_table(payload["auc"], ["resolution", "auc", "positive_rate"]))
