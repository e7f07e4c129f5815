"""Models: the registry, the input convention, reproducible random weights, FLOP counts."""

import pytest
import torch

from dynres.errors import ConfigError
from dynres.model.nets import build_backbone, create_model, gflops, list_architectures, random_backbone, to_input


def test_registry_has_presets_and_torchvision_names():
    names = list_architectures()
    assert {"resnet_tiny", "resnet18", "resnet50", "mobilenet_v2"} <= set(names)
    assert build_backbone("resnet_tiny", 5)(torch.zeros(2, 3, 64, 64)).shape == (2, 5)
    with pytest.raises(ConfigError, match="no_such_net"):
        build_backbone("no_such_net", 5)


def test_models_take_unit_range_floats_and_normalize_inside():
    model = create_model("resnet_tiny", 3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).eval()
    x = to_input(torch.full((1, 3, 32, 32), 255, dtype=torch.uint8))
    assert x.max() == 1.0
    assert torch.allclose(model.normalize(x), torch.full_like(x, 2.0))


def test_gflops_counts_two_flops_per_mac():
    # ResNet-18 at 224 is 1.8 GMACs in the paper's Table I -> 3.6 GFLOPs under FlopCounterMode's convention
    assert gflops(create_model("resnet18", 1000), 224) == pytest.approx(3.64, abs=0.03)
    tiny = create_model("resnet_tiny", 10)
    assert gflops(tiny, 128) == pytest.approx(4 * gflops(tiny, 64), rel=0.05)


def test_random_backbone_gives_the_same_weights_for_a_seed_in_eval_mode():
    a, b = random_backbone("resnet_tiny", 3), random_backbone("resnet_tiny", 3)
    assert not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = random_backbone("resnet_tiny", 3, seed=1)
    assert not torch.equal(a.conv1.weight, other.conv1.weight)
