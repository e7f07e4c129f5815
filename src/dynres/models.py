"""Backbones and the scale model: a name registry, checkpoints that carry their metadata, and FLOP counts.

Input convention (one place for normalization): every model built here starts with a :class:`Normalize` layer,
so it takes **float32 NCHW in [0, 1]** (``uint8 / 255``). Kernel backends and ONNX exports therefore see plain
float inputs and need nothing but :func:`load_checkpoint`.

FLOP convention: :func:`gflops` uses ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 x MACs
(conv and matmul only). The paper quotes MACs: ResNet-18 at 224 is 1.8 GMACs = 3.6 GFLOPs here.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from dynres.errors import CheckpointError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_VERSION = 1


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
    """NHWC weights, in place: oneDNN's preferred layout, measured 1.25-1.3x faster training and 1.3-1.6x faster
    batched evaluation of the demo's models on 2 cores. Same math; checkpoints load into either layout."""
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
    return sorted(set(_BUILDERS) | set(torchvision.models.list_models(module=torchvision.models)))


def build_backbone(arch: str, num_classes: int) -> nn.Module:
    """The bare network (no normalization) for ``arch``: a preset from this module or any torchvision name."""
    if arch in _BUILDERS:
        return _BUILDERS[arch](num_classes=num_classes)
    if arch in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    raise ConfigError(arch, "unknown architecture (see `list_architectures()`; torchvision classification names work)")


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
    """ResNet-10 shape at widths 8-16-32-64 (0.0036 GFLOPs at 56 px): a scale model made of dense convolutions,
    which train ~4x faster per sample on CPU than MobileNetV2's depthwise ones (the demo's scale model)."""
    return SlimResNet(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=num_classes)


@register_model("mobilenet_v2_tiny")
def mobilenet_v2_tiny(*, num_classes: int) -> nn.Module:
    """MobileNetV2 at width 0.25: a scale model that costs a small fraction of a demo backbone."""
    return torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=0.25)


# --- checkpoints ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild and use a checkpoint, so nothing downstream guesses.

    ``task`` is ``"classify"`` (outputs = ``classes``) or ``"scale"`` (outputs = one logit per ``grid``
    resolution, meaning "the backbone is right at this resolution"). ``scans`` is the prefix length a scale model
    reads (``None`` = all scans).
    """

    arch: str
    classes: tuple[str, ...]
    train_resolution: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    task: str = "classify"
    grid: tuple[int, ...] = ()
    scans: int | None = None
    recipe: dict = field(default_factory=dict)
    data_hash: str = ""
    epochs_done: int = 0
    version: int = META_VERSION

    @property
    def num_outputs(self) -> int:
        return len(self.grid) if self.task == "scale" else len(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: object = "") -> ModelMeta:
        try:
            data = dict(data)
            for name in ("classes", "mean", "std", "grid"):
                data[name] = tuple(data.get(name, ()))
            return cls(**data)
        except TypeError as err:
            raise CheckpointError(source, f"metadata does not match ModelMeta: {err}") from None


def meta_path(path: str | Path) -> Path:
    """The metadata JSON beside a checkpoint: ``model.pt`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def save_checkpoint(model: nn.Module, meta: ModelMeta, path: str | Path) -> Path:
    """Write the state_dict to ``path`` and the metadata to ``path.with_suffix('.json')``, atomically each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)  # the same file in either layout
    tmp.replace(path)
    tmp_meta = path.with_suffix(".json.tmp")
    tmp_meta.write_text(json.dumps(meta.to_dict(), indent=2))
    tmp_meta.replace(meta_path(path))
    return path


def read_meta(path: str | Path) -> ModelMeta:
    path = _resolve(path)
    mpath = meta_path(path)
    if not mpath.is_file():
        raise CheckpointError(mpath, "metadata JSON missing beside the checkpoint")
    try:
        data = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(mpath, f"unreadable metadata: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(mpath, "metadata must be a JSON object")
    if data.get("version", 0) > META_VERSION:
        raise CheckpointError(mpath, f"metadata version {data['version']} is newer than this dynres ({META_VERSION})")
    return ModelMeta.from_dict(data, mpath)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild a model from ``model.pt`` (+ ``model.json``) or a directory holding them; returns it in eval mode.

    The module takes float32 NCHW in [0, 1]; normalization is inside it.
    """
    path = _resolve(path)
    meta = read_meta(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / unsafe files
        raise CheckpointError(path, f"cannot load state_dict: {err}") from None
    model = create_model(meta.arch, meta.num_outputs, meta.mean, meta.std)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(path, f"weights do not fit {meta.arch} with {meta.num_outputs} outputs: {err}") from None
    return model.eval(), meta


def checkpoint_digest(path: str | Path) -> str:
    """sha256 (16 hex) of a checkpoint's weights file: tells results of different checkpoints apart."""
    import hashlib

    return hashlib.sha256(_resolve(path).read_bytes()).hexdigest()[:16]


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Initialise ``model`` (the bare network) from a local state_dict for fine-tuning; a mismatched head is
    skipped (different class count), anything else must fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(path, f"cannot load state_dict: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, "not a state_dict")
    if any(k.startswith("net.") for k in state):  # a dynres checkpoint: strip the wrapper prefix
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in skipped]:
        raise CheckpointError(path, f"weights do not fit the model (missing {list(missing)[:3]}, "
                                    f"unexpected {list(unexpected)[:3]})")


def demo_weights(arch: str) -> Path:
    """Shipped initial weights for a demo architecture (trained on synthetic images no demo uses; see
    ``tools/pretrain_demo.py`` and the JSON beside each file for the recipe and held-out accuracy)."""
    path = Path(__file__).parent / "assets" / f"{arch}.pt"
    if not path.is_file():
        raise CheckpointError(path, f"no shipped demo weights for {arch!r} (reinstall dynres?)")
    return path


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise CheckpointError(path, "checkpoint not found")
    return path


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
