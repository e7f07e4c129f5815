"""Checkpoints that carry their own metadata: a ``state_dict`` (``model.pt``, loaded with ``weights_only=True``)
plus ``model.json`` (architecture, classes, train resolution, normalization, recipe, data hash)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynres.errors import CheckpointError
from dynres.model.nets import IMAGENET_MEAN, IMAGENET_STD, create_model

META_VERSION = 1
# how a scale model's logits become p(r) over its grid: "sigmoid", one independent "backbone right at r" per
# resolution (the paper's); "softmax", one distribution over the grid ("which resolution is best")
SCALE_ACTIVATIONS = ("sigmoid", "softmax")


def scale_probs(logits: torch.Tensor, activation: str = "sigmoid") -> torch.Tensor:
    """A scale model's p(r) (N, len(grid)) from its logits, by its checkpoint's ``activation``."""
    if activation == "softmax":
        return torch.softmax(logits.float(), dim=1)
    return torch.sigmoid(logits.float())


@dataclass(frozen=True)
class ModelMeta:
    """Everything needed to rebuild and use a checkpoint, so nothing downstream guesses.

    ``task`` is ``"classify"`` (outputs = ``classes``) or ``"scale"`` (outputs = one logit per ``grid``
    resolution, meaning "the backbone is right at this resolution"). ``scans`` is the prefix length a scale model
    reads (``None`` = all scans); ``activation`` how its logits become p(r) (:data:`SCALE_ACTIVATIONS`,
    :func:`scale_probs`).
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
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.activation not in SCALE_ACTIVATIONS:
            raise CheckpointError(self.arch, f"unknown scale activation {self.activation!r}: one of "
                                             f"{', '.join(SCALE_ACTIVATIONS)}")

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
    path = Path(__file__).parents[1] / "assets" / f"{arch}.pt"
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
