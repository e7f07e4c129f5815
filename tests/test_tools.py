"""tools/: the script that makes the demo's shipped weights still runs end to end (tiny settings)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dynres.io.synth import PRETRAIN_SEED
from dynres.model.checkpoint import load_weights
from dynres.model.nets import build_backbone

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.slow
def test_pretrain_tool_writes_weights_the_demo_recipe_can_fine_tune_from(tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_demo", TOOLS / "pretrain_demo.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(tmp_path), "--epochs", "1", "--per-class", "2", "--val-per-class", "1"])
    info = json.loads((tmp_path / "resnet_tiny.json").read_text())
    assert info["synth"]["seed"] == PRETRAIN_SEED and info["train_images"] == 20
    assert {row["resolution"] for row in info["val_top1"]} == {56, 84, 112, 168, 224}
    assert json.loads((tmp_path / "resnet_micro.json").read_text())["recipe"]["resolution"] == 56  # the scale trunk
    net = build_backbone("resnet_tiny", len(info["classes"]))
    load_weights(net, tmp_path / "resnet_tiny.pt")
    assert torch.equal(net.conv1.weight, torch.load(tmp_path / "resnet_tiny.pt", weights_only=True)["conv1.weight"])
