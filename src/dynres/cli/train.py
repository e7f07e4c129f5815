"""``dynres train backbone`` and ``dynres train scale``: flags to :class:`TrainConfig` / :class:`ScaleConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.cli.options import join, parse_list, path_text
from dynres.model.train import LR_DEFAULTS, WD_DEFAULTS, TrainConfig
from dynres.study.scale import ScaleConfig

app = typer.Typer(no_args_is_help=True, help="Train backbones and the scale model.")

LR_HELP = "Peak learning rate (default " + ", ".join(f"{lr} {name}" for name, lr in LR_DEFAULTS.items()) + ")."
WD_HELP = "Weight decay (default " + ", ".join(f"{wd:g} {name}" for name, wd in WD_DEFAULTS.items()) + ")."


@app.command("backbone")
def train_backbone_cmd(
    store: str = typer.Argument(..., help="Train store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/backbone"), "--out", help="Checkpoint folder (model.pt + model.json)."),
    arch: str = typer.Option(TrainConfig.arch, help="resnet_tiny, resnet_small or any torchvision classifier name."),
    resolution: int = typer.Option(TrainConfig.resolution, help="Train resolution (RandomResizedCrop size)."),
    epochs: int = typer.Option(TrainConfig.epochs),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    optimizer: str = typer.Option(TrainConfig.optimizer, help="adamw or sgd (momentum, nesterov)."),
    lr: Optional[float] = typer.Option(TrainConfig.lr, help=LR_HELP),
    weight_decay: Optional[float] = typer.Option(TrainConfig.weight_decay, help=WD_HELP),
    label_smoothing: float = typer.Option(TrainConfig.label_smoothing),
    seed: int = typer.Option(TrainConfig.seed),
    init: Optional[Path] = typer.Option(None, help="Local state_dict to fine-tune from."),
    no_cache: bool = typer.Option(not TrainConfig.cache, "--no-cache",
                                  help="Decode every view (no in-memory decoded images)."),
) -> None:
    """Train a classifier; re-running resumes from the last finished epoch."""
    from dynres.io.store import open_store
    from dynres.model.train import train_backbone

    cfg = TrainConfig(arch=arch, resolution=resolution, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                      lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, seed=seed,
                      init=path_text(init), cache=not no_cache)
    path = train_backbone(open_store(store), out, cfg)
    console.print(f"wrote {path} (+ model.json, train_log.json)")


@app.command("scale")
def train_scale_cmd(
    store: str = typer.Argument(..., help="Train store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/scale"), "--out", help="Shard backbones, labels, scale model, scale.json."),
    folds: int = typer.Option(ScaleConfig.folds, help="K disjoint shards (K backbones on K-1 shards each)."),
    cheap: bool = typer.Option(ScaleConfig.cheap, "--cheap", help="One split only (the paper's footnote 2)."),
    splits: int = typer.Option(ScaleConfig.splits, help="Repeat the K-fold split with N shard seeds; the scale model "
                               "learns the mean of the N labels per image (N x K backbones)."),
    crops: str = typer.Option(join(ScaleConfig.crops), help="Crop areas the labels cover."),
    grid: Optional[str] = typer.Option(None, help="Resolutions (default: 0.5x..2x of --resolution, step 0.25x)."),
    arch: str = typer.Option(ScaleConfig.arch, help="Scale model architecture."),
    init: Optional[Path] = typer.Option(None, help="Local state_dict for the scale model's trunk."),
    backbone_init: Optional[Path] = typer.Option(None, help="Local state_dict the shard backbones fine-tune from."),
    scale_resolution: Optional[int] = typer.Option(None, help="Scale model input (default the grid minimum)."),
    scans: Optional[int] = typer.Option(None, help="Scans the scale model reads (default all)."),
    labels: Optional[Path] = typer.Option(None, help="Reuse this scale_labels.parquet: retrain only the scale model."),
    epochs: int = typer.Option(ScaleConfig.epochs, help="Scale model epochs."),
    backbone_arch: str = typer.Option(TrainConfig.arch),
    resolution: int = typer.Option(TrainConfig.resolution, help="Shard backbones' train resolution."),
    backbone_epochs: int = typer.Option(TrainConfig.epochs),
    batch_size: int = typer.Option(TrainConfig.batch_size),
    seed: int = typer.Option(ScaleConfig.seed),
) -> None:
    """Cross-validated scale labels and the scale model, with label statistics and per-resolution AUC."""
    from dynres.io.store import open_store
    from dynres.study.scale import train_scale

    backbone = TrainConfig(arch=backbone_arch, resolution=resolution, epochs=backbone_epochs, batch_size=batch_size,
                           seed=seed, init=path_text(backbone_init))
    cfg = ScaleConfig(folds=folds, cheap=cheap, splits=splits, crops=parse_list(crops, float, "--crops"),
                      grid=parse_list(grid, int, "--grid"), backbone=backbone, arch=arch, init=path_text(init),
                      resolution=scale_resolution, scans=scans, epochs=epochs, batch_size=batch_size, seed=seed,
                      labels=path_text(labels))
    result = train_scale(open_store(store), out, cfg)
    for row in result["auc"]:
        console.print(f"AUC @{row['resolution']}: {row['auc'] if row['auc'] is None else round(row['auc'], 3)}")
    console.print(f"wrote {result['scale_model']} and {out / 'scale.md'}")
