"""Shared by the static and dynamic evaluation tests: a fixed tiny backbone and scale model on in-memory data."""

import pytest
import torch

from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from tiny_store import MemoryStore

SCALE_GRID = (16, 24, 32, 48)  # the scale model's grid (test_dynamic.GRID)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A fixed (seeded, untrained) backbone and scale model: the numbers only have to be reproducible."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    store = MemoryStore(per_class=3)
    backbone = save_checkpoint(create_model("resnet_tiny", 3),
                               ModelMeta(arch="resnet_tiny", classes=tuple(store.classes), train_resolution=32),
                               root / "backbone.pt")
    scale = save_checkpoint(create_model("mobilenet_v2_tiny", len(SCALE_GRID)),
                            ModelMeta(arch="mobilenet_v2_tiny", classes=(), train_resolution=16, task="scale",
                                      grid=SCALE_GRID, scans=2), root / "scale.pt")
    return store, backbone, scale
