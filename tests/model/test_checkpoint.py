"""Checkpoints: round trip with metadata, scale checkpoints, errors that name the file, fine-tuning weights, the
shipped demo weights."""

import json

import pytest
import torch

from dynres.errors import CheckpointError
from dynres.model.checkpoint import ModelMeta, load_checkpoint, load_weights, save_checkpoint
from dynres.model.nets import build_backbone, create_model


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet_tiny", 3).eval()
    meta = ModelMeta(arch="resnet_tiny", classes=("a", "b", "c"), train_resolution=64,
                     recipe={"lr": 0.1}, data_hash="abc", epochs_done=2)
    path = save_checkpoint(model, meta, tmp_path / "ckpt" / "model.pt")
    loaded, meta2 = load_checkpoint(tmp_path / "ckpt")  # a directory works too
    assert meta2 == meta
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["train_resolution"] == 64
    assert path.name == "model.pt"


def test_scale_checkpoint_has_one_output_per_grid_resolution(tmp_path):
    meta = ModelMeta(arch="mobilenet_v2_tiny", classes=(), train_resolution=32, task="scale", grid=(32, 48, 64))
    save_checkpoint(create_model("mobilenet_v2_tiny", 3), meta, tmp_path / "s.pt")
    model, _ = load_checkpoint(tmp_path / "s.pt")
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_a_scale_checkpoint_says_how_its_logits_become_probabilities(tmp_path):
    """Older checkpoints carry no activation and are read as the paper's per-resolution sigmoids."""
    from dynres.model.checkpoint import meta_path, scale_probs

    meta = ModelMeta(arch="resnet_micro", classes=(), train_resolution=32, task="scale", grid=(32, 64),
                     activation="softmax")
    save_checkpoint(create_model("resnet_micro", 2), meta, tmp_path / "s.pt")
    assert load_checkpoint(tmp_path / "s.pt")[1].activation == "softmax"
    old = json.loads(meta_path(tmp_path / "s.pt").read_text())
    del old["activation"]
    meta_path(tmp_path / "s.pt").write_text(json.dumps(old))
    assert load_checkpoint(tmp_path / "s.pt")[1].activation == "sigmoid"
    logits = torch.tensor([[2.0, 0.0]])
    assert scale_probs(logits, "softmax").sum().item() == pytest.approx(1.0)
    assert torch.equal(scale_probs(logits), torch.sigmoid(logits))
    with pytest.raises(CheckpointError, match="activation"):
        ModelMeta(arch="x", classes=(), train_resolution=32, activation="tanh")


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "m.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="metadata JSON missing"):
        load_checkpoint(tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({"arch": "resnet_tiny", "classes": ["a"], "train_resolution": 32}))
    with pytest.raises(CheckpointError, match="m.pt"):
        load_checkpoint(tmp_path / "m.pt")
    # weights from a different class count do not silently load
    meta = ModelMeta(arch="resnet_tiny", classes=("a", "b"), train_resolution=32)
    torch.save(create_model("resnet_tiny", 3).state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(meta.to_dict()))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "m.pt")


def test_fine_tune_weights_skip_a_mismatched_head(tmp_path):
    source = create_model("resnet_tiny", 7)
    save_checkpoint(source, ModelMeta(arch="resnet_tiny", classes=tuple("abcdefg"), train_resolution=32),
                    tmp_path / "src.pt")
    target = build_backbone("resnet_tiny", 3)
    load_weights(target, tmp_path / "src.pt")
    assert torch.equal(target.conv1.weight, source.net.conv1.weight)
    assert target.fc.out_features == 3
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(target, tmp_path / "other.pt")


def test_shipped_demo_weights_fit_their_architecture_and_name_their_provenance():
    from dynres.io.synth import CLASSES, PRETRAIN_SEED
    from dynres.model.checkpoint import demo_weights

    for arch in ("resnet_tiny", "resnet_micro"):  # the backbones' and the scale model's
        path = demo_weights(arch)
        info = json.loads(path.with_suffix(".json").read_text())
        assert info["synth"]["seed"] == PRETRAIN_SEED and info["classes"] == [c.name for c in CLASSES[:10]]
        assert info["arch"] == arch
        net = build_backbone(arch, 7)  # a scale model's head (7 resolutions) is new; the trunk must fit
        load_weights(net, path)
        first = next(iter(net.state_dict()))
        assert torch.equal(net.state_dict()[first], torch.load(path, weights_only=True)[first])
    with pytest.raises(CheckpointError, match="no shipped demo weights"):
        demo_weights("resnet50")
