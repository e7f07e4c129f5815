"""Make the demo's shipped initial weights (``src/dynres/assets/``): the demo's "ImageNet-pretrained" stand-in.

The demo fine-tunes its backbones (``resnet_tiny``) and its scale model (``resnet_micro``'s trunk) from these
weights instead of training from scratch, as users fine-tune from ImageNet weights: a from-scratch ``resnet_tiny``
reaches only ~39% top-1 in the demo's CPU budget, which leaves the per-resolution correctness labels mostly noise.
The weights are trained on synthetic images of seed ``PRETRAIN_SEED``, disjoint from every demo image (the demo
refuses that seed), so the shard backbones still never saw the samples they label.

    python tools/pretrain_demo.py OUT_DIR [--epochs 50] [--per-class 800]

Re-running with the same arguments on the same torch build reproduces the weights; the JSON beside each file
records the recipe, the data and the held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from dynres.io.ingest import IngestConfig, ingest
from dynres.io.store import open_store
from dynres.io.synth import PRETRAIN_SEED, SynthConfig, synth
from dynres.model.checkpoint import load_checkpoint
from dynres.model.train import TrainConfig, train_backbone
from dynres.study.static import EvalConfig, run_static

ASSETS = Path(__file__).resolve().parents[1] / "src" / "dynres" / "assets"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--per-class", type=int, default=800)
    ap.add_argument("--val-per-class", type=int, default=60)
    ap.add_argument("--install", action="store_true", help="copy the weights into src/dynres/assets")
    args = ap.parse_args(argv)
    data, store = args.out / "data", args.out / "store"
    cfg = SynthConfig(classes=10, train_per_class=args.per_class, val_per_class=args.val_per_class, seed=PRETRAIN_SEED,
                      min_size=300, max_size=640, workers=0)
    if not (store / "val" / "manifest.parquet").exists():
        synth(data, cfg)
        for split in ("train", "val"):
            ingest(data / split, store / split, IngestConfig(workers=0))
    train, val = open_store(store / "train"), open_store(store / "val")
    recipes = {
        "resnet_tiny": TrainConfig(arch="resnet_tiny", resolution=112, epochs=args.epochs, optimizer="sgd", lr=0.2,
                                   weight_decay=5e-5, crop_scale=(0.35, 1.0)),
        # the scale model's trunk, at the scale model's 56 px: a weak classifier there, but its features lift the
        # scale model (measured in docs/demo-config.md)
        "resnet_micro": TrainConfig(arch="resnet_micro", resolution=56, epochs=args.epochs, optimizer="sgd", lr=0.2,
                                    weight_decay=5e-5, crop_scale=(0.35, 1.0)),
    }
    for name, recipe in recipes.items():
        if (args.out / f"{name}.pt").is_file():
            continue
        ckpt = train_backbone(train, args.out / name, recipe)
        history = json.loads((args.out / name / "train_log.json").read_text())["history"]
        seconds = sum(epoch["seconds"] for epoch in history)  # of every epoch, also across a resumed training
        res = recipe.resolution
        static = run_static(ckpt, val, args.out / f"{name}_eval",
                            EvalConfig(grid=(res // 2, res * 3 // 4, res, res * 3 // 2, res * 2), crops=(0.25, 1.0)))
        model, meta = load_checkpoint(ckpt)
        weights = args.out / f"{name}.pt"
        torch.save(model.net.state_dict(), weights)
        info = {"arch": name, "classes": list(meta.classes), "recipe": asdict(recipe), "synth": asdict(cfg),
                "train_images": len(train.keys), "train_seconds": seconds, "val_top1": static["static"],
                "torch": torch.__version__}
        weights.with_suffix(".json").write_text(json.dumps(info, indent=2, default=str))
        print(name, f"{seconds:.0f} s", json.dumps(static["static"]), flush=True)
        if args.install:
            ASSETS.mkdir(exist_ok=True)
            shutil.copy(weights, ASSETS / weights.name)
            shutil.copy(weights.with_suffix(".json"), ASSETS / f"{name}.json")


if __name__ == "__main__":
    main()
