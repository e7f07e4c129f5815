"""A torch ``Dataset`` over a store: a scans policy says how much to read, ``decode`` makes the tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from dynres.io.decode import decode, decode_train
from dynres.io.store import StoreLike
from dynres.paper import DEFAULT_CROP_SIDE
from dynres.policy.scans import Scans, scans_for


class StoreDataset(Dataset):
    """``(uint8 tensor 3xRxR, label)`` per image of ``store``.

    ``train=True`` gives RandomResizedCrop + flip views (always from all scans); otherwise a deterministic
    resize + center crop with side ratio ``crop_side`` from the policy's prefix.
    """

    def __init__(
        self,
        store: StoreLike,
        resolution: int,
        crop_side: float = DEFAULT_CROP_SIDE,
        scans: Scans = None,
        keys: Sequence[str] | None = None,
        train: bool = False,
        train_scale: tuple[float, float] = (0.08, 1.0),
    ):
        self.store = store
        self.resolution = resolution
        self.crop_side = crop_side
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
            image = decode(data, self.resolution, self.crop_side, name=key)
        return image, self.store.label(key)
