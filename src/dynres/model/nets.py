"""Backbones and the scale model: a name registry of architectures, the input convention, and FLOP counts.

Input convention (one place for normalization): every model built here starts with a :class:`Normalize` layer,
so it takes **float32 NCHW in [0, 1]** (``uint8 / 255``). Kernel backends and ONNX exports therefore see plain
float inputs and need nothing but :func:`dynres.model.checkpoint.load_checkpoint`.

torchvision is imported by the builders that use it, not with this module: the command line reads the settings
of modules that import this one, and ``dynres --help`` should not pay for torchvision's import.

FLOP convention: :func:`gflops` uses ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 x MACs
(conv and matmul only). The paper quotes MACs: ResNet-18 at 224 is 1.8 GMACs = 3.6 GFLOPs here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dynres.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000  # the head of architectures built with random weights to measure speed


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; stored as buffers so the checkpoint carries them."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def to_input(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N,3,R,R) from decode -> the float [0, 1] tensor every model here expects."""
    x = images.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights, in place: oneDNN's preferred layout, faster for training and batched evaluation on CPU
    (docs/demo-config.md). Same math; checkpoints load into either layout."""
    return model.to(memory_format=torch.channels_last)


# --- registry ---------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder ``fn(*, num_classes) -> nn.Module`` under ``name`` (duplicates are an error)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ConfigError(name, "model name registered twice")
        _BUILDERS[name] = fn
        return fn

    return wrap


def list_architectures() -> list[str]:
    """The presets registered here plus every torchvision classification model."""
    import torchvision

    return sorted(set(_BUILDERS) | set(torchvision.models.list_models(module=torchvision.models)))


def check_architecture(arch: str) -> None:
    """Refuse an architecture name nothing here builds, when a recipe names it rather than when it trains."""
    if arch not in _BUILDERS and arch not in list_architectures():
        raise ConfigError("arch", f"unknown architecture {arch!r}: a preset ({', '.join(sorted(_BUILDERS))}) or a "
                                  "torchvision classification model name (`list_architectures()`)")


def build_backbone(arch: str, num_classes: int) -> nn.Module:
    """The bare network (no normalization) for ``arch``: a preset from this module or any torchvision name."""
    import torchvision

    if arch in _BUILDERS:
        return _BUILDERS[arch](num_classes=num_classes)
    if arch in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    raise ConfigError(arch, "unknown architecture (see `list_architectures()`; torchvision classification names work)")


def random_backbone(arch: str, num_classes: int, seed: int = 0) -> nn.Module:
    """``arch`` in eval mode with the same random weights for a ``seed`` on every run (it seeds torch's global RNG):
    what speed measurements use without a checkpoint, so a tuning cache keyed by the weights hits on a rerun."""
    torch.manual_seed(seed)
    return build_backbone(arch, num_classes).eval()


def create_model(arch: str, num_classes: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> nn.Sequential:
    """``Normalize`` followed by the network: takes float [0, 1] NCHW, returns logits."""
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=build_backbone(arch, num_classes)))


class SlimResNet(nn.Module):
    """torchvision's ResNet topology (7x7/2 stem, max-pool, four stages, output stride 32) at chosen widths.

    torchvision's ``ResNet`` hard-codes widths 64..512; CPU-sized demo runs need a quarter of that. Same
    blocks, same downsampling, so the scale behaviour (what the paper studies) is the same kind.
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int], num_classes: int):
        from torchvision.models.resnet import BasicBlock, conv1x1

        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, inplanes = [], widths[0]
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            stage = [BasicBlock(inplanes, width, stride, down)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block, as torchvision's zero_init_residual
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet_tiny")
def resnet_tiny(*, num_classes: int) -> nn.Module:
    """ResNet-10 shape at widths 16-32-64-128: a few-minute CPU training run for the demo."""
    return SlimResNet(layers=(1, 1, 1, 1), widths=(16, 32, 64, 128), num_classes=num_classes)


@register_model("resnet_small")
def resnet_small(*, num_classes: int) -> nn.Module:
    """ResNet-18 depth at half width (32-64-128-256)."""
    return SlimResNet(layers=(2, 2, 2, 2), widths=(32, 64, 128, 256), num_classes=num_classes)


@register_model("resnet_micro")
def resnet_micro(*, num_classes: int) -> nn.Module:
    """ResNet-10 shape at widths 8-16-32-64: a scale model of dense convolutions, which train faster per sample on
    CPU than MobileNetV2's depthwise ones (the demo's scale model; docs/demo-config.md)."""
    return SlimResNet(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=num_classes)


@register_model("mobilenet_v2_tiny")
def mobilenet_v2_tiny(*, num_classes: int) -> nn.Module:
    """MobileNetV2 at width 0.25: a scale model that costs a small fraction of a demo backbone."""
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=0.25)


# --- cost ---------------------------------------------------------------------------------------------------


def gflops(model: nn.Module, resolution: int) -> float:
    """GFLOPs (2 x MACs, FlopCounterMode) of one forward pass on one ``resolution`` x ``resolution`` image."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, resolution, resolution))
    model.train(was_training)
    return counter.get_total_flops() / 1e9
