"""The accuracy chain of the study in one call: full backbone → static grid → scale labels + model → dynamic.

``dynres demo`` runs it as its ``accuracy`` stage with :func:`demo_config`. Every step is
resumable on its own: backbone training resumes from its last epoch; the finished chain's result is reused while
its record (:func:`dynres.study.stages.recorded`) says it was run with the same settings.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from dynres.errors import ConfigError
from dynres.io.store import StoreLike
from dynres.model.train import ImageCache, TrainConfig, train_backbone
from dynres.bench.scale import RULES as FITTED_RULES
from dynres.study.dynamic import GUARD_ONLY, DynamicConfig, run_dynamic
from dynres.study.scale import ScaleConfig, target_activation, train_scale
from dynres.study.stages import digest, local, portable, recorded, store_key, write_json
from dynres.study.static import EvalConfig, run_static


@dataclass(frozen=True)
class ChainConfig:
    """The accuracy chain's settings, one dataclass per step."""

    backbone: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)

    def __post_init__(self) -> None:
        chain_grid(self)  # a [scale] grid and an [eval] grid that differ are refused here, before anything trains
        fitted = sorted(set(self.dynamic.rules) & set(FITTED_RULES))
        missing = [c for c in self.eval.crops if not any(abs(c - s) < 1e-6 for s in self.scale.crops)]
        if fitted and missing:  # refused before anything trains, not when the guard looks for them
            raise ConfigError("rules", f"{fitted} are fitted on the scale labels, which cover crops "
                                       f"{list(self.scale.crops)}, not the evaluated crops {missing}: add them to "
                                       "[scale] crops or use the rule \"anchor-r*\"")
        if self.dynamic.recalibrate and target_activation(self.scale.target) != "sigmoid":
            raise ConfigError("recalibrate", f"[scale] target = {self.scale.target!r} trains a softmax head, whose "
                                             "p(r) is not a per-resolution probability to recalibrate: set [dynamic] "
                                             "recalibrate = false")


def demo_config(quick: bool = False, seed: int = 0, pretrained: bool = False) -> ChainConfig:
    """The demo's settings: ``resnet_tiny`` at 112 px, grid 56..224 (the paper's 0.5x..2x), a 56 px scale model.
    ``quick``: fewer epochs. The measurements behind each choice are in docs/demo-config.md.

    ``pretrained`` (the built-in data): the backbones and the scale model's trunk fine-tune from the shipped weights
    (:func:`dynres.model.checkpoint.demo_weights`, trained on synthetic images no demo uses), as one fine-tunes from
    ImageNet weights; that makes the K=4 shard backbones affordable on 2 cores. From scratch (a user's data set,
    ``dynres run``) the scale labels keep ScaleConfig's own cross-validation (``folds`` shard backbones, ``cheap``
    false): a run file's ``folds = K`` trains K of them, and only a run file's own ``cheap = true`` trains one
    (the paper's footnote 2). It once defaulted to one shard of labels here, silently (issue 18).
    """
    if pretrained:
        from dynres.model.checkpoint import demo_weights

        backbone = TrainConfig(epochs=4 if quick else 12, optimizer="sgd", lr=0.05, weight_decay=5e-5,
                               crop_scale=(0.35, 1.0), seed=seed, init=str(demo_weights("resnet_tiny")))
        # resnet_micro: the same choices as a width-0.25 MobileNetV2 at a quarter of the training time; its trunk
        # fine-tuned from shipped weights chooses better at no extra time; more epochs, splits=2 or fewer shard
        # epochs did not choose better
        scale = ScaleConfig(backbone=backbone, folds=4, cheap=quick, arch="resnet_micro", epochs=6 if quick else 12,
                            init=str(demo_weights("resnet_micro")), seed=seed)
        return ChainConfig(backbone=backbone, scale=scale)
    # lr 0.01 and crops of >= 50% area: a from-scratch resnet_tiny learns within the budget (smaller random crops
    # often cut the object out; the default lr learns too slowly)
    backbone = TrainConfig(epochs=12 if quick else 40, lr=0.01, crop_scale=(0.5, 1.0), seed=seed)
    return ChainConfig(backbone=backbone, scale=ScaleConfig(backbone=backbone, epochs=8 if quick else 12, seed=seed))


def chain_grid(cfg: ChainConfig) -> tuple[int, ...] | None:
    """The chain's one resolution grid: the scale model predicts over the grid the evaluations report, so a grid
    set in either ``[scale]`` or ``[eval]`` is both's (None: the paper's ratios around the train resolution)."""
    if cfg.scale.grid and cfg.eval.grid and tuple(cfg.scale.grid) != tuple(cfg.eval.grid):
        raise ConfigError("grid", f"scale grid {list(cfg.scale.grid)} and eval grid {list(cfg.eval.grid)} differ; "
                                  "the scale model must predict over the grid the evaluations use: set one of them")
    grid = cfg.scale.grid or cfg.eval.grid
    return tuple(grid) if grid else None


def chain_settings(cfg: ChainConfig) -> dict:
    """The settings that decide what the chain computes, as JSON: the guard's own (``GUARD_ONLY``: which rules it
    may choose) left out, so that changing them recomputes nothing here."""
    settings = json.loads(json.dumps(asdict(cfg), default=str))
    settings["dynamic"] = {k: v for k, v in settings["dynamic"].items() if k not in GUARD_ONLY}
    return settings


def run_accuracy_chain(train_store: StoreLike, val_store: StoreLike, out: str | Path,
                       cfg: ChainConfig = ChainConfig(), progress: bool = True) -> dict:
    """Run (or resume) the whole chain under ``out``; returns ``{backbone, static, scale, dynamic, seconds}``.

    The result is recorded in ``out/accuracy_chain.json`` with the settings it was run with and a key of those
    settings (weight files by content) and of both stores' contents, and reused as long as the key is unchanged."""
    grid = chain_grid(cfg)  # a bad grid fails before anything trains
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = chain_settings(cfg)
    key = digest({"settings": settings, "stores": store_key(train_store, val_store)})
    record = out / "accuracy_chain.json"
    if (rec := recorded(record, lambda r: r.get("key") == key)) is not None:
        return local(rec["result"], out)
    result = _run_chain(train_store, val_store, out, cfg, grid, progress)
    write_json(record, {"settings": settings, "key": key, "result": portable(result, out)})
    return result


def _run_chain(train_store: StoreLike, val_store: StoreLike, out: Path, cfg: ChainConfig,
               grid: tuple[int, ...] | None, progress: bool) -> dict:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    cache = None
    if cfg.backbone.cache:
        cache = ImageCache.build(train_store, train_store.keys,
                                 round(cfg.backbone.cache_factor * cfg.backbone.resolution), progress)
    seconds["decode_cache"] = time.perf_counter() - t0
    t = time.perf_counter()
    backbone = train_backbone(train_store, out / "backbone", cfg.backbone, cache=cache, progress=progress)
    seconds["backbone"] = time.perf_counter() - t
    t = time.perf_counter()
    # shard backbones share the full backbone's recipe; labels, scale model and evaluations share one grid
    scale_cfg = replace(cfg.scale, backbone=cfg.backbone, grid=grid)
    scale = train_scale(train_store, out / "scale", scale_cfg, cache=cache, progress=progress)
    seconds["scale"] = time.perf_counter() - t
    del cache
    t = time.perf_counter()
    eval_cfg = replace(cfg.eval, grid=scale_cfg.label_grid)
    run_static(backbone, val_store, out / "eval", eval_cfg, progress=progress)
    seconds["static"] = time.perf_counter() - t
    t = time.perf_counter()
    dynamic = run_dynamic(backbone, scale["scale_model"], val_store, out / "eval", cfg.dynamic, eval_cfg,
                          progress=progress)
    seconds["dynamic"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    return {"backbone": str(backbone), "scale_model": scale["scale_model"],
            "static": str(out / "eval" / "static.json"), "scale": str(out / "scale" / "scale.json"),
            "dynamic": str(out / "eval" / "dynamic.json"), "summary": dynamic["summary"], "seconds": seconds}
