"""A torch ``Dataset`` over a store: how many scans to read (policy) + how to decode (decode) for one resolution.

The three concerns stay separate, as in FFCV: the store knows bytes, a *scans policy* says how many scans of an
image to read at a resolution, and ``decode`` turns the prefix into a tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, Union, runtime_checkable

import torch
from torch.utils.data import Dataset

from dynres.decode import decode, decode_train


@runtime_checkable
class ScanPolicy(Protocol):
    """Anything that says how many scans of ``key`` to read for inference at ``resolution`` (None: all)."""

    def scans(self, key: str, resolution: int) -> int | None: ...


Scans = Union[None, int, Mapping[str, int], Callable[[str, int], Union[int, None]], ScanPolicy]


def scans_for(scans: Scans, key: str, resolution: int) -> int | None:
    """Resolve any accepted form of a scans policy for one image."""
    if scans is None or isinstance(scans, int):
        return scans
    if isinstance(scans, ScanPolicy):
        return scans.scans(key, resolution)
    if isinstance(scans, Mapping):
        return scans.get(key)
    return scans(key, resolution)


class StoreDataset(Dataset):
    """``(uint8 tensor 3xRxR, label)`` per image of ``store``.

    ``train=True`` gives RandomResizedCrop + flip views (always from all scans); otherwise a deterministic
    resize + center crop with side ratio ``crop`` from the policy's prefix.
    """

    def __init__(
        self,
        store,
        resolution: int,
        crop: float = 0.875,
        scans: Scans = None,
        keys: Sequence[str] | None = None,
        train: bool = False,
        train_scale: tuple[float, float] = (0.08, 1.0),
    ):
        self.store = store
        self.resolution = resolution
        self.crop = crop
        self.scans = scans
        self.keys = list(store.keys if keys is None else keys)
        self.train = train
        self.train_scale = train_scale

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        key = self.keys[index]
        if self.train:
            data = self.store.read(key)
            image = decode_train(data, self.resolution, scale=self.train_scale, name=key)
        else:
            data = self.store.read(key, scans=scans_for(self.scans, key, self.resolution))
            image = decode(data, self.resolution, self.crop, name=key)
        return image, self.store.label(key)
