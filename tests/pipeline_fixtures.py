"""Tiny store + tiny models shared by the engine tests (engine, serve, ray) and the pipeline and serve benchmarks:
seconds to build on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dynres.model.nets import Normalize
from dynres.runtime.runners import EagerRunner, ScaleStage

GRID = (32, 48, 64)
SCALE_RES = 32


def make_store(root: Path, per_class: int = 5, classes: tuple[str, ...] = ("cat", "dog")):
    """An ImageFolder of small noisy progressive-ready JPEGs, ingested into a store."""
    from dynres.io.ingest import IngestConfig, ingest
    from dynres.io.store import open_store

    rng = np.random.default_rng(0)
    src = root / "src"
    for c in classes:
        (src / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = int(rng.integers(80, 140)), int(rng.integers(80, 140))
            level = int(rng.integers(20, 236))  # brightness varies, so the scale model's choice does too
            arr = np.clip(level + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(src / c / f"{i}.jpg", quality=90)
    ingest(src, root / "store", IngestConfig(workers=1), progress=False)
    return open_store(root / "store")


def save_tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """A backbone (cat/dog, trained at 48 px) and a scale model over GRID that reads 2 scans, saved under ``root``
    as b.pt and s.pt: what the engines and benchmarks that load checkpoints from paths run."""
    from dynres.model.checkpoint import ModelMeta, save_checkpoint
    from dynres.model.nets import create_model

    torch.manual_seed(0)
    save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", ("cat", "dog"), 48), root / "b.pt")
    save_checkpoint(create_model("mobilenet_v2_tiny", len(GRID)),
                    ModelMeta("mobilenet_v2_tiny", (), SCALE_RES, task="scale", grid=GRID, scans=2), root / "s.pt")
    return root / "b.pt", root / "s.pt"


def tiny_classifier(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """Resolution-agnostic (global pooling) and cheap: conv → pool → linear, normalization inside."""
    torch.manual_seed(seed)
    return nn.Sequential(Normalize(), nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, num_classes)).eval()


def tiny_scale() -> ScaleStage:
    """A scale model over GRID that picks by brightness: bright → 32 px, mid → 48 px, dark → 64 px."""
    linear = nn.Linear(3, len(GRID))
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[4.0] * 3, [0.0] * 3, [-4.0] * 3]))
        linear.bias.copy_(torch.tensor([-6.0, 0.0, 6.0]))
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()
    return ScaleStage(EagerRunner(model), SCALE_RES, GRID, costs=(0.2, 0.5, 1.0), scans=2)


class StepPolicy:
    """More scans for larger resolutions: 1 scan per 16 px, at least 1."""

    def scans(self, key: str, resolution: int) -> int:
        return max(1, resolution // 16)
