"""Backbone training: a visible loop, a frozen recipe, resumable checkpoints that carry their metadata.

Recipe: RandomResizedCrop at the train resolution + horizontal flip, AdamW (or SGD with momentum), linear warm-up
then cosine decay per step, optional label smoothing. Deterministic for a seed: each epoch reseeds the shuffle and
the augmentation RNG from (seed, epoch), so a resumed run continues exactly as an uninterrupted one would.

Images are read from the store once (all scans) and decoded once to a shorter side of ``cache_factor`` x the train
resolution; every epoch then cuts its random crops from memory. On 2 CPU cores a progressive-JPEG decode costs
about as much as a tiny backbone's training step, so decoding once per run instead of once per epoch is what makes
the demo's five backbones affordable. ``cache=False`` decodes every view through ``StoreDataset(train=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dynres._ui import status_bar, track_threads
from dynres.errors import CheckpointError, ConfigError
from dynres.io.decode import decode_short_side
from dynres.io.store import StoreLike
from dynres.model.checkpoint import ModelMeta, checkpoint_digest, load_weights, save_checkpoint
from dynres.model.nets import build_backbone, channels_last, create_model, to_input

STATE_NAME = "train_state.pt"
LR_DEFAULTS = {"adamw": 0.003, "sgd": 0.1}  # peak learning rate per optimizer when a recipe gives none
# weight decay per optimizer when a recipe gives none. AdamW's is decoupled (the weights shrink by lr x wd a step);
# SGD's is an L2 term in the gradient: AdamW's 0.05 there shrinks a fine-tuned net to chance within a few epochs
# (seen on the real-photo set, docs/real-photos.md); 5e-5 is the demo recipe's SGD value
WD_DEFAULTS = {"adamw": 0.05, "sgd": 5e-5}
OPTIMIZER_TIED = ("lr", "weight_decay")  # a recipe's settings whose good values depend on its optimizer


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe; the defaults are the CPU demo's (``resnet_tiny`` at 112 px). ``lr=None`` and
    ``weight_decay=None`` take the optimizer's :data:`LR_DEFAULTS` / :data:`WD_DEFAULTS` entry, so the recipe (and
    the checkpoint's record of it) always holds numbers, and a recipe that names only its optimizer gets values
    meant for that optimizer."""

    arch: str = "resnet_tiny"
    resolution: int = 112
    epochs: int = 20
    batch_size: int = 32  # small data: more steps per epoch matter more than batch efficiency
    optimizer: str = "adamw"  # "adamw" or "sgd" (momentum, nesterov)
    lr: float | None = None  # peak; None: LR_DEFAULTS[optimizer]
    momentum: float = 0.9
    weight_decay: float | None = None  # None: WD_DEFAULTS[optimizer]
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    crop_scale: tuple[float, float] = (0.25, 1.0)  # RandomResizedCrop area range
    seed: int = 0
    cache: bool = True
    cache_factor: float = 2.0
    init: str | None = None  # local state_dict to fine-tune from (None: from scratch)

    def __post_init__(self) -> None:
        from dynres.model.nets import check_architecture

        check_architecture(self.arch)
        if self.optimizer not in LR_DEFAULTS:
            raise ConfigError("optimizer", f"must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.resolution < 16:
            raise ConfigError("train config", "epochs and batch_size must be >= 1, resolution >= 16")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("crop_scale", f"need 0 < min <= max <= 1, got {self.crop_scale}")
        if self.lr is None:
            object.__setattr__(self, "lr", LR_DEFAULTS[self.optimizer])
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", WD_DEFAULTS[self.optimizer])
        if self.lr < 0 or self.weight_decay < 0:
            raise ConfigError("train config", f"need lr >= 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


def data_hash(store: StoreLike, keys: Sequence[str]) -> str:
    """Identifies the training data: class names plus every (key, label, stored file's SHA-256) used, in order, so
    that a store re-ingested under the same keys (other sizes, other quality) is not resumed from."""
    h = hashlib.sha256(json.dumps(list(store.classes)).encode())
    for key in keys:
        h.update(f"{key}\t{store.label(key)}\t{store.sha256(key)}\n".encode())
    return h.hexdigest()[:16]


# --- data ---------------------------------------------------------------------------------------------------


class ImageCache:
    """Decoded training images kept in memory (uint8, shorter side fixed), shared by several trainings."""

    def __init__(self, images: dict[str, torch.Tensor], short_side: int):
        self.images = images
        self.short_side = short_side

    @classmethod
    def build(cls, store: StoreLike, keys: Sequence[str], short_side: int, progress: bool = True) -> ImageCache:
        keys = list(keys)
        decoded = track_threads(lambda key: decode_short_side(store.read(key), short_side, name=key), keys,
                                f"decode {len(keys)} images (short side {short_side})", progress)
        return cls(dict(zip(keys, decoded)), short_side)


class CachedTrainSet(Dataset):
    """RandomResizedCrop + flip views cut from an :class:`ImageCache` (torch's global RNG)."""

    def __init__(self, cache: ImageCache, keys: Sequence[str], labels: Sequence[int], resolution: int,
                 crop_scale: tuple[float, float]):
        from torchvision.transforms import v2 as T

        self.cache, self.keys, self.labels = cache, list(keys), list(labels)
        self.transform = T.Compose([T.RandomResizedCrop(resolution, scale=crop_scale, antialias=True),
                                    T.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.cache.images[self.keys[i]]), self.labels[i]


def train_dataset(store: StoreLike, keys: Sequence[str], cfg: TrainConfig, cache: ImageCache | None = None,
                  progress: bool = True) -> Dataset:
    if not cfg.cache:
        from dynres.model.data import StoreDataset

        return StoreDataset(store, cfg.resolution, keys=keys, train=True, train_scale=cfg.crop_scale)
    short = round(cfg.cache_factor * cfg.resolution)
    if cache is None or cache.short_side != short or not set(keys) <= cache.images.keys():
        cache = ImageCache.build(store, keys, short, progress)
    return CachedTrainSet(cache, keys, [store.label(k) for k in keys], cfg.resolution, cfg.crop_scale)


# --- the loop -----------------------------------------------------------------------------------------------


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _resume(state_path: Path, meta: ModelMeta, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """(epochs done, history) from ``state_path`` when its recipe and data hash match ``meta``; else (0, [])."""
    if not state_path.is_file():
        return 0, []
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(state_path, f"cannot load training state: {err}") from None
    if state.get("recipe") != json.dumps(meta.recipe, sort_keys=True) or state.get("data_hash") != meta.data_hash:
        return 0, []
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    return int(state["epoch"]), json.loads(state["history"])


def _save_epoch(out: Path, meta: ModelMeta, model: nn.Module, opt: torch.optim.Optimizer, history: list) -> None:
    """The checkpoint after ``meta.epochs_done`` epochs, then the state a resumed run continues from (atomically)."""
    save_checkpoint(model, meta, out / "model.pt")
    tmp = out / (STATE_NAME + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": meta.epochs_done,
                "recipe": json.dumps(meta.recipe, sort_keys=True), "data_hash": meta.data_hash,
                "history": json.dumps(history)}, tmp)
    tmp.replace(out / STATE_NAME)


def fit(model: nn.Module, dataset: Dataset, cfg: TrainConfig, loss_fn: Callable, out: Path, meta: ModelMeta,
        description: str, progress: bool = True, accuracy: Callable | None = None) -> list[dict]:
    """Train ``model`` (with its Normalize front) on ``dataset``; after each epoch save ``out/model.pt`` (+ JSON)
    and ``out/train_state.pt``. Resumes from that state when its recipe and data hash match ``meta``."""
    out.mkdir(parents=True, exist_ok=True)
    channels_last(model)
    opt = _optimizer(cfg, model.parameters())
    start, history = _resume(out / STATE_NAME, meta, model, opt)
    drop_last = len(dataset) > cfg.batch_size  # a last batch of one breaks BatchNorm
    steps_per_epoch = len(dataset) // cfg.batch_size if drop_last else 1
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if start >= cfg.epochs:
        return history
    with status_bar(total, description, progress) as update:
        for _ in range(start * steps_per_epoch):
            update("resumed")
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation RNG, reproducible after a resume
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
            loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen, num_workers=0,
                                drop_last=drop_last)
            model.train()
            seen, loss_sum, right = 0, 0.0, 0.0
            for i, (x, y) in enumerate(loader):
                for group in opt.param_groups:
                    group["lr"] = _lr_at(epoch * steps_per_epoch + i, total, warmup, cfg.lr)
                logits = model(to_input(x, channels_last=True))
                loss = loss_fn(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                if accuracy is not None:
                    right += float(accuracy(logits.detach(), y))
                status = f"ep {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f}"
                update(status + (f" acc {100 * right / seen:.1f}%" if accuracy else ""))
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen,
                            "train_accuracy": 100 * right / seen if accuracy else None,
                            "seconds": time.perf_counter() - t0})
            _save_epoch(out, replace(meta, epochs_done=epoch + 1), model, opt, history)
    return history


def _top1(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).sum()


def train_backbone(store: StoreLike, out: str | Path, cfg: TrainConfig = TrainConfig(), keys: Sequence[str] | None = None,
                   cache: ImageCache | None = None, progress: bool = True) -> Path:
    """Train a classifier on ``keys`` of ``store`` (default: all); returns the path of ``out/model.pt``.

    Re-running with the same recipe and data resumes from the last finished epoch (or returns at once).
    """
    out = Path(out)
    keys = list(store.keys if keys is None else keys)
    if not keys:
        raise ConfigError(out, "no training images")
    torch.manual_seed(cfg.seed)
    net = build_backbone(cfg.arch, len(store.classes))
    if cfg.init:
        load_weights(net, cfg.init)
    model = create_model(cfg.arch, len(store.classes))
    model.net = net
    # the init weights by content too: a resume must not continue from other weights saved under the same path
    recipe = asdict(cfg) | {"images": len(keys)} | ({"init_sha256": checkpoint_digest(cfg.init)} if cfg.init else {})
    meta = ModelMeta(arch=cfg.arch, classes=tuple(store.classes), train_resolution=cfg.resolution,
                     recipe=recipe, data_hash=data_hash(store, keys))
    dataset = train_dataset(store, keys, cfg, cache, progress)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history = fit(model, dataset, cfg, loss_fn, out, meta, f"train {cfg.arch} @{cfg.resolution}", progress, _top1)
    (out / "train_log.json").write_text(json.dumps({"recipe": recipe, "history": history}, indent=2))
    return out / "model.pt"
